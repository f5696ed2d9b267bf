"""fastdistill.int8_weight_only_linear: W8A16 matmul, the int8 weight dequantized inside the kernel.

out = x @ (q * scale)^T (+ bias) with fp32 accumulation, in x's dtype. Custom ops (same schema):
    fastdistill::int8_weight_only_linear_cpu / _cuda   kernels in csrc/
    fastdistill::int8_weight_only_linear_triton        kernel in fastdistill/kernels/int8_linear.py
Differentiable in x (dx = dy @ dequantized weight, an fp32 matmul of the materialized weight: backward is
not the inference hot path) and in bias; the int8 weight and scales get no gradient.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastdistill import dispatch
from fastdistill.ops.int8_linear import check_bias, check_int8
from fastdistill.ops.common import (check_finite, check_float, contiguous_rows, interpreting, launch_guard, native,
                                    new_output, register_native)
from fastdistill.reference.int8_linear import dequantize_weight_ref, int8_weight_only_linear_ref


@torch.library.custom_op("fastdistill::int8_weight_only_linear_triton", mutates_args=())
def int8_weight_only_linear_triton(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                                   bias: Optional[torch.Tensor], group_size: int) -> torch.Tensor:
    from fastdistill.kernels.int8_linear import int8_weight_only_linear_launch

    out = new_output((x.shape[0], w_int8.shape[0]), like=x)
    with launch_guard(x):
        int8_weight_only_linear_launch(x, w_int8, w_scale, bias, out, group_size, interpret=interpreting())
    return out


def _fake(x, w_int8, w_scale, bias, group_size):
    return x.new_empty((x.shape[0], w_int8.shape[0]))


def _setup_context(ctx, inputs, output):
    x, w_int8, w_scale, bias, group_size = inputs
    ctx.save_for_backward(w_int8, w_scale)
    ctx.group_size = group_size
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    w_int8, w_scale = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0]:
        dx = (grad.float() @ dequantize_weight_ref(w_int8, w_scale, ctx.group_size)).to(ctx.x_dtype)
    db = grad.float().sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
    return dx, None, None, db, None


torch.library.register_fake("fastdistill::int8_weight_only_linear_triton")(_fake)
torch.library.register_autograd("fastdistill::int8_weight_only_linear_triton", _backward,
                                setup_context=_setup_context)
register_native(("int8_weight_only_linear_cpu", "int8_weight_only_linear_cuda"), _fake, (_backward, _setup_context))


def group_size_of(w_int8: torch.Tensor, w_scale) -> int:
    """0 for per-channel scales [N]; K // G for per-group scales [N, G] (G must divide K)."""
    N, K = w_int8.shape
    if not isinstance(w_scale, torch.Tensor):
        raise TypeError(f"w_scale: expected a torch.Tensor, got {type(w_scale).__name__}")
    if w_scale.dtype != torch.float32:
        raise TypeError(f"w_scale: expected float32, got {w_scale.dtype}")
    if w_scale.dim() == 1 and w_scale.shape[0] == N:
        return 0
    if w_scale.dim() == 2 and w_scale.shape[0] == N and w_scale.shape[1] >= 1:
        G = w_scale.shape[1]
        if K % G != 0:
            raise ValueError(f"w_scale: {G} groups per row do not divide K = {K} (group_size must divide K)")
        return K // G
    raise ValueError(f"w_scale: expected shape ({N},) (per channel) or ({N}, K // group_size) (per group), "
                     f"got {tuple(w_scale.shape)}")


def int8_weight_only_linear(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                            bias: Optional[torch.Tensor] = None, *, backend: str = "auto",
                            validate: bool = False) -> torch.Tensor:
    """W8A16 linear: x [..., K] float32/bf16/fp16, w_int8 [N, K], w_scale float32 [N] (per output channel)
    or [N, K // group_size] (per group of input channels), bias [N] -> [..., N] in x's dtype.
    inf/NaN in x propagate to the output rows; validate=True raises instead (one host sync)."""
    check_float("x", x)
    check_int8("w_int8", w_int8, dim=2)
    K = x.shape[-1]
    N = w_int8.shape[0]
    if w_int8.shape[1] != K:
        raise ValueError(f"w_int8: expected shape (N, {K}) to match x (..., {K}), got {tuple(w_int8.shape)}")
    group_size = group_size_of(w_int8, w_scale)
    check_bias(bias, N, w_int8.device)
    for name, t in (("w_int8", w_int8), ("w_scale", w_scale)):
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, x on {x.device}")
    if validate:
        check_finite("x", x)
    name = dispatch.select("int8_weight_only_linear", backend, x.device, (x.dtype,))
    if name == "reference":
        return int8_weight_only_linear_ref(x, w_int8, w_scale, bias, group_size)
    args = (contiguous_rows(x), w_int8.contiguous(), w_scale.contiguous(), None if bias is None else bias.contiguous(),
            group_size)
    if name == "triton":
        out = int8_weight_only_linear_triton(*args)
    else:
        out = native(f"int8_weight_only_linear_{name}")(*args)
    return out.view(*x.shape[:-1], N)
