"""fastdistill.int8_weight_only_linear_packed: CPU W8A16 on an int8 weight packed once (issue 14).

    pack_w8a16(w_int8, group_size=0) -> w_packed   a uint8 tensor: header + panels of 8 output channels, [K][8]
                                                   each, panel_stride(K) apart (csrc/include/fd_int8_w8a16.h)
    int8_weight_only_linear_packed(x, w_packed, w_scale, bias, smooth_inv)
        int8_weight_only_linear's result (fp32 accumulation, within the tolerance table; deterministic, the same
        bits for any thread count) with x * smooth_inv.to(x.dtype) (rounded to x's dtype) in place of x.
Custom ops: fastdistill::int8_pack_w8a16_cpu, fastdistill::int8_weight_only_linear_packed_cpu (C++, CPU only).
Forward-only inference kernels: Int8Linear owns autograd and keeps the portable int8 weight (the packed tensor is
never saved). FASTDISTILL_INT8_CPU_PATH=scalar forces the scalar tiles (the AVX2 tiles give the same bits).
"""
from __future__ import annotations

from typing import Optional

import torch

from fastdistill.ops.common import contiguous_rows, native, register_native
from fastdistill.ops.int8_linear import check_int8
from fastdistill.ops.int8_linear_packed import check_cpu, check_packed_inputs, require_extension

PACK_HEADER_BYTES = 64
PANEL = 8  # output channels per panel of the packed layout


def panel_stride(K: int) -> int:
    """Bytes from one panel to the next: K * 8 rounded up to a 64-byte line, plus one line (the panels a tile
    reads together then start in different L1 sets)."""
    return -(-K * PANEL // 64) * 64 + 64


def packed_w8a16_bytes(N: int, K: int) -> int:
    """Size of pack_w8a16's result for w_int8 [N, K]: header + ceil(N / 8) panels of [K][8] bytes."""
    return PACK_HEADER_BYTES + -(-N // PANEL) * panel_stride(K)


def _fake_pack(w_int8, group_size):
    return w_int8.new_empty((packed_w8a16_bytes(w_int8.shape[0], w_int8.shape[1]),), dtype=torch.uint8)


def _fake_linear(x, w_packed, w_scale, bias, smooth_inv):
    return x.new_empty((x.shape[0], w_scale.shape[0]))


register_native(("int8_pack_w8a16_cpu",), _fake_pack)
register_native(("int8_weight_only_linear_packed_cpu",), _fake_linear)


def pack_w8a16(w_int8: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """w_int8 [N, K] int8 (CPU) -> its packed form for int8_weight_only_linear_packed (a 1-D uint8 tensor).
    group_size: 0 for per-output-channel scales w_scale [N], else the scale group along K (dividing K) of
    w_scale [N, K // group_size]. Pack once per weight; never save it: the layout may change between versions."""
    check_int8("w_int8", w_int8, dim=2)
    check_cpu("w_int8", w_int8)
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size: expected an int, got {type(group_size).__name__}")
    K = w_int8.shape[1]
    if group_size < 0 or (group_size > 0 and K % group_size != 0):
        raise ValueError(f"group_size: {group_size} must be 0 (per channel) or a positive divisor of K = {K}")
    require_extension("pack_w8a16")
    return native("int8_pack_w8a16_cpu")(w_int8.detach().contiguous(), group_size)


def int8_weight_only_linear_packed(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                                   bias: Optional[torch.Tensor] = None,
                                   smooth_inv: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] float32/bf16/fp16 (CPU) times the packed weight (pack_w8a16 of w_int8 [N, K]) with w_scale
    float32 [N] (group_size 0) or [N, K // group_size], optional bias [N] (any float dtype) and smooth_inv [K]
    float32 (x * smooth_inv.to(x.dtype) is multiplied) -> [..., N] in x's dtype. inf/NaN in x propagate to their
    rows. Not differentiable (use Int8Linear to train)."""
    K, N = check_packed_inputs("pack_w8a16", x, w_packed, w_scale, bias, smooth_inv, scale_dims=(1, 2))
    require_extension("int8_weight_only_linear_packed")
    lead = x.shape[:-1]
    out = native("int8_weight_only_linear_packed_cpu")(
        contiguous_rows(x.detach()), w_packed.contiguous(), w_scale.detach().contiguous(),
        None if bias is None else bias.detach().contiguous(),
        None if smooth_inv is None else smooth_inv.detach().contiguous())
    return out.view(*lead, N)
