"""Input checks shared by the sparse ops (clear errors naming the argument, raised before any kernel)."""
from __future__ import annotations

import torch


def check_activation(x, K: int, weight) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x: expected shape (..., {K}) (the weight's in_features), got {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} differs from x's {x.dtype} (convert with weight.to(dtype=...))")
    if weight.device != x.device:
        raise ValueError(f"weight: on {weight.device}, x on {x.device}")


def check_bias(bias, N: int, x: torch.Tensor) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
    if bias.shape != (N,):
        raise ValueError(f"bias: expected shape ({N},), got {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"bias: dtype {bias.dtype} differs from x's {x.dtype}")
    if bias.device != x.device:
        raise ValueError(f"bias: on {bias.device}, x on {x.device}")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> contiguous [M, K] (the ops' layout)."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def bias_grad(dy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum of dy over rows in fp32, one rounding to the bias dtype."""
    return dy.sum(0, dtype=torch.float32).to(dtype)
