"""fastdistill.int8_linear_dynamic: CPU W8A8 on a weight packed once (issue 14).

    pack_w8a8(w_int8) -> w_packed        a uint8 tensor: header + the u8 x s8 GEMM's tile layout
                                         (csrc/include/fd_int8_pack.h, csrc/include/fd_int8_gemm.h)
    int8_linear_dynamic(x, w_packed, w_scale, bias, smooth_inv, out_dtype)
        per-token quantization of x fused into the GEMM's packing of A, the GEMM and the epilogue: the same bits as
        quantize_per_token(x * smooth_inv.to(x.dtype)) then int8_linear(q, scale, w_int8, w_scale, bias, out_dtype).
Custom ops: fastdistill::int8_pack_w8a8_cpu, fastdistill::int8_linear_dynamic_cpu (C++, CPU only). Forward-only
inference kernels: Int8Linear owns autograd and keeps the portable int8 weight (the packed tensor is never saved).
FASTDISTILL_INT8_CPU_PATH = auto | scalar | avx2 | vnni forces one kernel path (every path gives the same bits).
"""
from __future__ import annotations

from typing import Optional

import torch

from fastdistill import _ext
from fastdistill.ops.common import check_float, contiguous_rows, native, register_native
from fastdistill.ops.int8_linear import MAX_K, OUT_DTYPES, check_bias, check_int8

PACK_HEADER_BYTES = 64
PANEL = 16  # output columns per panel of the packed layout


def packed_w8a8_bytes(N: int, K: int) -> int:
    """Size of pack_w8a8's result for w_int8 [N, K]: header, panels of 16 columns x K padded to 4, column sums."""
    n16 = -(-N // PANEL) * PANEL
    return PACK_HEADER_BYTES + n16 * (-(-K // 4) * 4) + 4 * n16


def _fake_pack(w_int8):
    return w_int8.new_empty((packed_w8a8_bytes(w_int8.shape[0], w_int8.shape[1]),), dtype=torch.uint8)


def _fake_dynamic(x, w_packed, w_scale, bias, smooth_inv, out_dtype):
    return x.new_empty((x.shape[0], w_scale.shape[0]), dtype=out_dtype)


register_native(("int8_pack_w8a8_cpu",), _fake_pack)
register_native(("int8_linear_dynamic_cpu",), _fake_dynamic)


_EXT_ERROR = _ext.load_error()  # read once at import (a cached call inside a torch.compile trace warns)


def require_extension(op: str) -> None:
    """The packed ops (w8a8 here, w8a16 in int8_weight_only_packed) exist only in the compiled extension."""
    if _EXT_ERROR is not None:
        raise RuntimeError(f"{op}: needs the compiled extension fastdistill._C ({_EXT_ERROR})")


def check_cpu(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor (packed int8 weights are CPU-only), got {t.device}")


def check_packed_inputs(pack: str, x, w_packed, w_scale, bias, smooth_inv, scale_dims) -> tuple[int, int]:
    """The argument checks shared by the packed int8 ops (the kernels check the header); returns (K, N)."""
    check_float("x", x)
    if x.dtype not in OUT_DTYPES:
        raise TypeError(f"x: expected one of {OUT_DTYPES}, got {x.dtype}")
    if not isinstance(w_packed, torch.Tensor):
        raise TypeError(f"w_packed: expected a torch.Tensor from {pack}, got {type(w_packed).__name__}")
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 1:
        raise ValueError(f"w_packed: expected a 1-D uint8 tensor from {pack}, got {w_packed.dtype} of shape "
                         f"{tuple(w_packed.shape)}")
    if not isinstance(w_scale, torch.Tensor):
        raise TypeError(f"w_scale: expected a torch.Tensor, got {type(w_scale).__name__}")
    if w_scale.dtype != torch.float32:
        raise TypeError(f"w_scale: expected float32, got {w_scale.dtype}")
    if w_scale.dim() not in scale_dims:
        want = "(N,)" if scale_dims == (1,) else "(N,) or (N, K // group_size)"
        raise ValueError(f"w_scale: expected shape {want}, got {tuple(w_scale.shape)}")
    K, N = x.shape[-1], w_scale.shape[0]
    check_bias(bias, N, x.device)
    if smooth_inv is not None:
        if not isinstance(smooth_inv, torch.Tensor):
            raise TypeError(f"smooth_inv: expected a torch.Tensor or None, got {type(smooth_inv).__name__}")
        if smooth_inv.dtype != torch.float32:
            raise TypeError(f"smooth_inv: expected float32, got {smooth_inv.dtype}")
        if tuple(smooth_inv.shape) != (K,):
            raise ValueError(f"smooth_inv: expected shape ({K},) to match x (..., {K}), got {tuple(smooth_inv.shape)}")
    for name, t in (("x", x), ("w_packed", w_packed), ("w_scale", w_scale), ("smooth_inv", smooth_inv)):
        if t is not None:
            check_cpu(name, t)
    return K, N


def pack_w8a8(w_int8: torch.Tensor) -> torch.Tensor:
    """w_int8 [N, K] int8 (CPU) -> its packed form for int8_linear_dynamic (a 1-D uint8 tensor). Pack once per
    weight (when a layer is quantized, frozen or loaded); never save it: the layout may change between versions."""
    check_int8("w_int8", w_int8, dim=2)
    check_cpu("w_int8", w_int8)
    if w_int8.shape[1] > MAX_K:
        raise ValueError(f"w_int8: K = {w_int8.shape[1]} > {MAX_K}: int32 accumulators could overflow (split K)")
    require_extension("pack_w8a8")
    return native("int8_pack_w8a8_cpu")(w_int8.detach().contiguous())


def int8_linear_dynamic(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, smooth_inv: Optional[torch.Tensor] = None,
                        out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """x [..., K] float32/bf16/fp16 (CPU) times the packed weight (pack_w8a8 of w_int8 [N, K]) with per-output-channel
    w_scale [N] float32, optional bias [N] and smooth_inv [K] float32 (x * smooth_inv.to(x.dtype) is quantized)
    -> [..., N] in out_dtype (default x.dtype). Bitwise equal to quantize_per_token + int8_linear on the same weight.
    Not differentiable (use Int8Linear to train)."""
    K, N = check_packed_inputs("pack_w8a8", x, w_packed, w_scale, bias, smooth_inv, scale_dims=(1,))
    if K > MAX_K:
        raise ValueError(f"x: K = {K} > {MAX_K}: int32 accumulators could overflow (split K)")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {OUT_DTYPES}, got {out_dtype}")
    require_extension("int8_linear_dynamic")
    lead = x.shape[:-1]
    out = native("int8_linear_dynamic_cpu")(
        contiguous_rows(x.detach()), w_packed.contiguous(), w_scale.detach().contiguous(),
        None if bias is None else bias.detach().contiguous(),
        None if smooth_inv is None else smooth_inv.detach().contiguous(), out_dtype)
    return out.view(*lead, N)
