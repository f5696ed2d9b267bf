"""Triton kernel of semi_structured_linear: y = x · Wᵀ (+ bias) with W in 2:4 form (layout: csrc/ops.cpp).

Each program computes a [BM, BN] tile of y. Per K step it rebuilds the dense [BN, BK] weight tile in
registers from the compressed values + meta: dense column k of row n loads values[n, 2g + (k%4 == i1)]
only where k%4 is one of the group's two kept positions (other lanes are masked, so only the stored
values and the meta bytes are read: half the weight bytes), then one tl.dot with fp32 accumulation.
The tiles are the same interpreted or not; only _upcast differs (see kernels/block_sparse_linear.py and
tests/test_sparse_triton_gpu_config.py, which runs the GPU's choice in the interpreter).
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastdistill.kernels.block_sparse_linear import _dot, _prec, _upcast


@triton.jit
def _semi_structured_kernel(x_ptr, v_ptr, meta_ptr, b_ptr, y_ptr, M, N, K, MB, HAS_BIAS: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                            UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        g = rk // 4
        pos = rk % 4
        ok = n_ok[:, None] & k_ok[None, :]
        byte = tl.load(meta_ptr + rn64[:, None] * MB + (g // 2)[None, :], mask=ok, other=0).to(tl.int32)
        nib = (byte >> (4 * (g % 2))[None, :]) & 15
        i0 = nib & 3
        i1 = nib >> 2
        second = pos[None, :] == i1
        keep = ok & ((pos[None, :] == i0) | second)
        w = tl.load(v_ptr + rn64[:, None] * (K // 2) + (2 * g)[None, :] + second.to(tl.int32), mask=keep, other=0.0)
        xt = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                     other=0.0)
        acc = _dot(xt, tl.trans(w), acc, PREC, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def semi_structured_linear_triton_launch(x, values, meta, bias, y) -> None:
    M, K = x.shape
    N = values.shape[0]
    if M == 0 or N == 0:
        return
    BM = 16 if M <= 16 else 64
    BN, BK = 64, 64
    _semi_structured_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        x, values, meta, bias if bias is not None else x, y, M, N, K, meta.shape[1], HAS_BIAS=bias is not None,
        BM=BM, BN=BN, BK=BK, PREC=_prec(x), UPCAST=_upcast(x))
