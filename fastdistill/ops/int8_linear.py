"""fastdistill.int8_linear: W8A8 matmul, exact int32 accumulation, fused dequantization epilogue.

out = ((float(x_int8 @ w_int8^T) * x_scale[m]) * w_scale[n]) + bias[n], cast to out_dtype; every backend
gives the same bits (formula in csrc/ops.cpp). Custom ops (same schema):
    fastdistill::int8_linear_cpu      C++: torch._int_mm + epilogue where oneDNN has VNNI/AMX, else its own GEMM
    fastdistill::int8_linear_cuda     torch._int_mm (cuBLASLt, padded to its shape rules) + the CUDA epilogue
    fastdistill::int8_linear_triton   one triton kernel: int8 tl.dot + epilogue
backend="auto" on CUDA follows W8A8_CUDA_ROUTES (below); elsewhere the dispatch table's order.
Not differentiable (int8 inputs); Int8Linear's straight-through estimator handles training.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from fastdistill import dispatch
from fastdistill.ops.common import (check_float, contiguous_rows, interpreting, launch_guard, native, new_output,
                                    register_native)
from fastdistill.reference.int8_linear import int8_linear_ref

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_K = (2**31 - 1) // (128 * 128)  # any int8 dot product of this length fits int32


# backend="auto" for W8A8 on CUDA: rows (largest M, route) per compute capability, the first that fits M.
# Source: benchmarks/results/int8_cuda_kernels_cuda.csv (H200, sm_90, 2026-11-28), 8192^3: quantize + _int_mm +
# our epilogue 1.365 ms = 1.19x bf16 F.linear (1.619 ms); _int_mm alone 1.267 ms, the epilogue pass 0.113 ms
# (~8% of the whole, under the 10% that would call for fusing it). The Triton kernel (epilogue fused) has never
# run on a GPU: cuda for every M until bench_int8_cuda_kernels.py, which times both per M, says otherwise.
# Other capabilities are not measured: they use the sm_90 rows.
W8A8_CUDA_ROUTES = {(9, 0): ((None, "cuda"),)}
MEASURED_CAPABILITY = (9, 0)


def route_by_m(table: dict, M: int, capability: tuple[int, int]) -> str:
    """The route of the first (largest M, route) row of table[capability] (or the measured one's) that fits M."""
    rows = table.get(tuple(capability), table[MEASURED_CAPABILITY])
    return next(route for limit, route in rows if limit is None or M <= limit)


def w8a8_cuda_route(M: int, N: int, K: int, capability: tuple[int, int]) -> str:
    """The auto route on CUDA for x_int8 [M, K] and w_int8 [N, K]: a pure function of shape and capability."""
    return route_by_m(W8A8_CUDA_ROUTES, M, capability)


@torch.compiler.assume_constant_result
def _auto_cuda(M: int, N: int, K: int, device: torch.device, out_dtype: torch.dtype, fallback: str) -> str:
    """W8A8_CUDA_ROUTES' choice where it can run here, else `fallback` (the dispatch table's)."""
    route = w8a8_cuda_route(M, N, K, torch.cuda.get_device_capability(device))
    ok = dispatch.reason("int8_linear", route, "cuda", (out_dtype,), device.index) is None
    return route if ok else fallback


def _out(x_int8, w_int8, out_dtype):
    return new_output((x_int8.shape[0], w_int8.shape[0]), like=x_int8, dtype=out_dtype)


@torch.library.custom_op("fastdistill::int8_linear_triton", mutates_args=())
def int8_linear_triton(x_int8: torch.Tensor, x_scale: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    from fastdistill.kernels.int8_linear import int8_linear_launch

    out = _out(x_int8, w_int8, out_dtype)
    with launch_guard(x_int8):
        int8_linear_launch(x_int8, w_int8, x_scale, w_scale, bias, out, interpret=interpreting())
    return out


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return t if t.shape == (rows, cols) else F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


@torch.library.custom_op("fastdistill::int8_linear_cuda", mutates_args=())
def int8_linear_cuda(x_int8: torch.Tensor, x_scale: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                     bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """cuBLASLt's int8 GEMM needs M > 16 and K, N multiples of 8: zero rows/columns are added where
    needed (zeros change no sum) and the [M, N] corner of the accumulator goes to the epilogue."""
    M, K = x_int8.shape
    N = w_int8.shape[0]
    Mp, Kp, Np = max(M, 17), max(-(-K // 8) * 8, 8), max(-(-N // 8) * 8, 8)  # K = 0 or N = 0: zero padding
    acc = torch._int_mm(_pad_to(x_int8, Mp, Kp), _pad_to(w_int8, Np, Kp).t())
    if (Mp, Np) != (M, N):
        acc = acc[:M, :N].contiguous()
    return native("int8_linear_epilogue_cuda")(acc, x_scale, w_scale, bias, out_dtype)


def _fake(x_int8, x_scale, w_int8, w_scale, bias, out_dtype):
    return x_int8.new_empty((x_int8.shape[0], w_int8.shape[0]), dtype=out_dtype)


def _fake_epilogue(acc, x_scale, w_scale, bias, out_dtype):
    return acc.new_empty(acc.shape, dtype=out_dtype)


for _name in ("fastdistill::int8_linear_triton", "fastdistill::int8_linear_cuda"):
    torch.library.register_fake(_name)(_fake)
register_native(("int8_linear_cpu",), _fake)
register_native(("int8_linear_epilogue_cpu", "int8_linear_epilogue_cuda"), _fake_epilogue)


def _check_scale(name: str, t, shape: tuple) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name}: expected float32, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def check_int8(name: str, t, dim: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int8:
        raise TypeError(f"{name}: expected int8, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")
    if dim is None and t.dim() < 1:
        raise ValueError(f"{name}: expected shape (..., K), got a 0-D tensor")


def check_bias(bias, N: int, device: torch.device) -> None:
    if bias is None:
        return
    check_float("bias", bias)
    if tuple(bias.shape) != (N,):
        raise ValueError(f"bias: expected shape ({N},), got {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"bias: on {bias.device}, the weight on {device}")


def int8_linear(x_int8: torch.Tensor, x_scale: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None, *,
                backend: str = "auto") -> torch.Tensor:
    """W8A8 linear: x_int8 [..., K] with per-row x_scale [...] (from quantize_per_token), w_int8 [N, K] with
    per-output-channel w_scale [N] (float32), optional bias [N] -> [..., N] in out_dtype (default float32).
    Accumulation is exact int32 (K <= MAX_K = 131071 keeps any int8 sum in range)."""
    check_int8("x_int8", x_int8)
    check_int8("w_int8", w_int8, dim=2)
    K = x_int8.shape[-1]
    N = w_int8.shape[0]
    if w_int8.shape[1] != K:
        raise ValueError(f"w_int8: expected shape (N, {K}) to match x_int8 (..., {K}), got {tuple(w_int8.shape)}")
    if K > MAX_K:
        raise ValueError(f"x_int8: K = {K} > {MAX_K}: int32 accumulators could overflow (split K)")
    _check_scale("x_scale", x_scale, x_int8.shape[:-1])
    _check_scale("w_scale", w_scale, (N,))
    check_bias(bias, N, w_int8.device)
    for name, t in (("x_scale", x_scale), ("w_int8", w_int8), ("w_scale", w_scale)):
        if t.device != x_int8.device:
            raise ValueError(f"{name}: on {t.device}, x_int8 on {x_int8.device}")
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {OUT_DTYPES}, got {out_dtype}")
    name = dispatch.select("int8_linear", backend, x_int8.device, (out_dtype,))
    if name == "reference":
        return int8_linear_ref(x_int8, x_scale, w_int8, w_scale, bias, out_dtype)
    lead = x_int8.shape[:-1]
    args = (contiguous_rows(x_int8), x_scale.reshape(-1).contiguous(), w_int8.contiguous(),
            w_scale.contiguous(), None if bias is None else bias.detach().contiguous(), out_dtype)
    if backend == "auto" and x_int8.is_cuda and not os.environ.get("FASTDISTILL_BACKEND"):
        name = _auto_cuda(args[0].shape[0], N, K, x_int8.device, out_dtype, name)
    if name == "triton":
        out = int8_linear_triton(*args)
    elif name == "cuda":
        out = int8_linear_cuda(*args)
    else:
        out = native("int8_linear_cpu")(*args)
    return out.view(*lead, N)
