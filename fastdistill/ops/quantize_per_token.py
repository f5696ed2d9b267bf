"""fastdistill.quantize_per_token: symmetric per-row int8 quantization (fused absmax + round + cast).

Custom ops (same schema, same bits; formula in csrc/ops.cpp):
    fastdistill::quantize_per_token_cpu / _cuda   kernels in csrc/
    fastdistill::quantize_per_token_triton        kernel in fastdistill/kernels/int8_linear.py
Not differentiable (int8 output); Int8Linear's straight-through estimator handles training.
"""
from __future__ import annotations

import math
import os

import torch

from fastdistill import _ext, dispatch
from fastdistill.reference.int8_linear import quantize_per_token_ref
from fastdistill.testing import new_output, poison_enabled


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _outputs(x):
    # int8 cannot hold the NaN poison: -128, which the symmetric quantizer never writes
    q = torch.full(x.shape, -128, dtype=torch.int8, device=x.device) if poison_enabled() else torch.empty_like(
        x, dtype=torch.int8)
    return q, new_output(x.shape[:1], like=x, dtype=torch.float32)


@torch.library.custom_op("fastdistill::quantize_per_token_triton", mutates_args=())
def quantize_per_token_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from fastdistill.kernels.int8_linear import quantize_per_token_launch

    q, scale = _outputs(x)
    quantize_per_token_launch(x, q, scale, interpret=interpreting())
    return q, scale


def _fake(x):
    return torch.empty(x.shape, dtype=torch.int8, device=x.device), torch.empty(x.shape[:1], device=x.device)


torch.library.register_fake("fastdistill::quantize_per_token_triton")(_fake)

_registered: set[str] = set()


def native_op(name: str, backend: str, fake, autograd=None, backends=("cpu", "cuda")) -> object:
    """torch.ops.fastdistill.<name>_<backend>, with `fake` (and `autograd`: (backward, setup_context))
    registered once for the extension's ops <name>_<b>, b in `backends`."""
    if name not in _registered:
        _ext.load_error()  # imports fastdistill._C, which defines the ops
        for b in backends:
            if torch._C._dispatch_has_kernel(f"fastdistill::{name}_{b}"):
                torch.library.register_fake(f"fastdistill::{name}_{b}")(fake)
                if autograd is not None:
                    torch.library.register_autograd(f"fastdistill::{name}_{b}", autograd[0],
                                                    setup_context=autograd[1])
        _registered.add(name)
    return getattr(torch.ops.fastdistill, f"{name}_{backend}")


def check_float(name: str, t, *, min_dim: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """validate=True: one host sync to refuse inf/NaN (they would give an inf/NaN scale for the row)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains inf or NaN (validate=True)")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()  # not -1: K may be 0


def quantize_per_token(x: torch.Tensor, *, backend: str = "auto", validate: bool = False):
    """x [..., K] float32/bf16/fp16 -> (int8 [..., K], float32 scale [...]) with scale = max|row| / 127 and
    q = round_half_even(x * (127 / max|row|)) clamped to ±127. All-zero rows give scale 0 and zeros.
    Rows with inf/NaN give an inf/NaN scale and unspecified int8 values; validate=True raises instead."""
    check_float("x", x)
    if validate:
        check_finite("x", x)
    x = x.detach()
    name = dispatch.select("quantize_per_token", backend, x.device, (x.dtype,))
    if name == "reference":
        return quantize_per_token_ref(x)
    rows = as_rows(x)
    op = quantize_per_token_triton if name == "triton" else native_op("quantize_per_token", name, _fake)
    q, scale = op(rows)
    return q.view(x.shape), scale.view(x.shape[:-1])
