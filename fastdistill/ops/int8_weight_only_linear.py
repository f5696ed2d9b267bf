"""fastdistill.int8_weight_only_linear: W8A16 matmul, the int8 weight dequantized inside the kernel.

out = x @ (q * scale)^T (+ bias) with fp32 accumulation, in x's dtype. Custom ops (same schema):
    fastdistill::int8_weight_only_linear_cpu / _cuda   kernels in csrc/
    fastdistill::int8_weight_only_linear_triton        kernel in fastdistill/kernels/int8_linear.py
    fastdistill::int8_weight_only_linear_dense         dequantize to x's dtype in one pass, then torch's GEMM
                                                       (cuBLAS): the large-M route (any device)
backend="auto" on CUDA picks by M from W8A16_CUDA_ROUTES (below); elsewhere the dispatch
table's order.
Differentiable in x (dx = dy @ dequantized weight, an fp32 matmul of the materialized weight: backward is
not the inference hot path) and in bias; the int8 weight and scales get no gradient.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

from fastdistill import dispatch
from fastdistill.ops.int8_linear import check_bias, check_int8, route_by_m
from fastdistill.ops.common import (check_finite, check_float, contiguous_rows, interpreting, launch_guard, native,
                                    new_output, register_native)
from fastdistill.reference.int8_linear import dequantize_weight_ref, int8_weight_only_linear_ref


# backend="auto" for W8A16 on CUDA: rows (largest M, route) per compute capability, the first that fits M.
# Source: benchmarks/results/int8_cuda_kernels_cuda.csv (H200, sm_90, 2026-11-28; N = K = 8192, bf16; speed
# relative to bf16 F.linear, higher is faster):
#   cuda (our tensor-core GEMV kernel): M 1: 1.34x, M 8: 1.32x, M 16: 1.29x, M 64: 0.55x, M 4096: 0.23x.
#   dense (dequantize + cuBLAS): not measured yet; predicted from the same CSV as the one dequantization pass
#     (64 MB read + 128 MB written: ~0.05 ms at ~4 TB/s) plus bf16 F.linear: 0.096 ms at M 64 (0.48x: below
#     cuda's 0.55x, so cuda keeps M <= 64) and 0.84 ms at M 4096 (0.94x, against cuda's 0.23x).
#   triton (tiled, int8 tile dequantized in registers): never run on a GPU; bench_int8_cuda_kernels.py times
#     all three side by side per M, and this table follows its CSV.
# Other capabilities are not measured: they use the sm_90 rows. float32 x stays on the cuda kernel (fp32 FMAs):
# cuBLAS would run a float32 GEMM in TF32 where torch allows it, below the fp32 accuracy the op promises.
W8A16_CUDA_ROUTES = {(9, 0): ((64, "cuda"), (None, "dense"))}


def w8a16_cuda_route(M: int, N: int, K: int, capability: tuple[int, int],
                     dtype: torch.dtype = torch.bfloat16) -> str:
    """The auto route on CUDA for x [M, K] (dtype) and w [N, K]: a pure function of the shape, the compute
    capability and x's dtype (N and K do not move the crossover in the measurements so far)."""
    route = route_by_m(W8A16_CUDA_ROUTES, M, capability)
    return "cuda" if route == "dense" and dtype == torch.float32 else route


@torch.library.custom_op("fastdistill::int8_weight_only_linear_triton", mutates_args=())
def int8_weight_only_linear_triton(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                                   bias: Optional[torch.Tensor], group_size: int) -> torch.Tensor:
    from fastdistill.kernels.int8_linear import int8_weight_only_linear_launch

    out = new_output((x.shape[0], w_int8.shape[0]), like=x)
    with launch_guard(x):
        int8_weight_only_linear_launch(x, w_int8, w_scale, bias, out, group_size, interpret=interpreting())
    return out


@functools.lru_cache(maxsize=None)
def _triton_on(device: torch.device) -> bool:
    return dispatch.reason("int8_weight_only_linear", "triton", "cuda", (), device.index) is None


def dequantize_weight(w_int8: torch.Tensor, w_scale: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] in `dtype`: float32 q * scale rounded once to dtype (dequantize_weight_ref's values, rounded), in one
    pass: the Triton kernel on CUDA, torch.mul with a `dtype` output elsewhere (or without Triton)."""
    N, K = w_int8.shape
    out = torch.empty((N, K), dtype=dtype, device=w_int8.device)
    if K == 0:
        return out
    if w_int8.is_cuda and _triton_on(w_int8.device):
        from fastdistill.kernels.int8_linear import dequantize_weight_launch

        with launch_guard(w_int8):
            dequantize_weight_launch(w_int8, w_scale, out, group_size)
    elif group_size:
        G = K // group_size
        torch.mul(w_int8.view(N, G, group_size), w_scale.unsqueeze(-1), out=out.view(N, G, group_size))
    else:
        torch.mul(w_int8, w_scale.unsqueeze(-1), out=out)
    return out


@torch.library.custom_op("fastdistill::int8_weight_only_linear_dense", mutates_args=())
def int8_weight_only_linear_dense(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                                  bias: Optional[torch.Tensor], group_size: int) -> torch.Tensor:
    """The weight dequantized to x's dtype (float32 q * scale, rounded once), then torch's GEMM with fp32
    accumulation; the bias is added by the GEMM in x's dtype. float32 x on CUDA: torch's TF32 setting applies
    (auto never routes float32 here)."""
    w = dequantize_weight(w_int8, w_scale, group_size, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


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


for _name in ("fastdistill::int8_weight_only_linear_triton", "fastdistill::int8_weight_only_linear_dense"):
    torch.library.register_fake(_name)(_fake)
    torch.library.register_autograd(_name, _backward, setup_context=_setup_context)
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
    if backend == "auto" and x.is_cuda and not os.environ.get("FASTDISTILL_BACKEND"):
        name = _auto_cuda(args[0].shape[0], N, K, x.device, x.dtype, name)
    if name == "triton":
        out = int8_weight_only_linear_triton(*args)
    elif name == "dense":
        out = int8_weight_only_linear_dense(*args)
    else:
        out = native(f"int8_weight_only_linear_{name}")(*args)
    return out.view(*x.shape[:-1], N)


@torch.compiler.assume_constant_result
def _auto_cuda(M: int, N: int, K: int, device: torch.device, dtype: torch.dtype, fallback: str) -> str:
    """W8A16_CUDA_ROUTES' choice where it can run here, else `fallback` (the dispatch table's)."""
    route = w8a16_cuda_route(M, N, K, torch.cuda.get_device_capability(device), dtype)
    if route == "dense":
        return route  # torch ops (+ the Triton dequantization where Triton runs): always available
    ok = dispatch.reason("int8_weight_only_linear", route, "cuda", (dtype,), device.index) is None
    return route if ok else fallback
