"""Triton kernels of block_sparse_linear (BSR layout: csrc/ops.cpp): forward, dx and dw.

fwd: one program per (BLOCK_M rows of x, output block row); loops over that row's stored blocks only.
dx:  one program per (BLOCK_M rows of dy, input block column); loops over the column's blocks (CSC view),
     so every dx element has one writer (no atomics).
dw:  one program per stored block; dvalues[p] = dy[:, rows]ᵀ · x[:, cols] over M in a fixed order.
fp32 operands use IEEE products (no TF32); bf16/fp16 use tensor cores; fp32 accumulation everywhere.
Under TRITON_INTERPRET the launchers pick another configuration (16-bit tiles widened to fp32, smaller M
tiles: see _upcast and _block_m); GPU_CONFIG_IN_INTERPRETER = True makes them launch exactly what a GPU
runs instead (tests/test_sparse_triton_gpu_config.py; fp16 and fp32 only: see _upcast).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


GPU_CONFIG_IN_INTERPRETER = False  # tests only: run the GPU configuration in the interpreter too


def _interpreted() -> bool:
    """Whether the launchers pick the interpreter's configuration."""
    return os.environ.get("TRITON_INTERPRET") == "1" and not GPU_CONFIG_IN_INTERPRETER


def _prec(t: torch.Tensor) -> str | None:
    return "ieee" if t.dtype == torch.float32 else None  # None: the default (tensor cores) for 16-bit


def _upcast(t: torch.Tensor) -> bool:
    """The interpreter's tl.dot returns garbage for bf16 operands (triton 3.9, numpy has no bf16; fp16 works):
    there, 16-bit tiles are widened to fp32 first (the same exact products, fp32 accumulation)."""
    return _interpreted() and t.dtype != torch.float32


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _bsr_fwd_kernel(x_ptr, v_ptr, crow_ptr, col_ptr, b_ptr, y_ptr, M, K, N, HAS_BIAS: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    r = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    start = tl.load(crow_ptr + r)
    end = tl.load(crow_ptr + r + 1)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for p in range(start, end):
        c = tl.load(col_ptr + p).to(tl.int64)
        xt = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + c * BK + rk[None, :], mask=m_ok[:, None], other=0.0)
        w = tl.load(v_ptr + p * (BN * BK) + rn[:, None] * BK + rk[None, :])  # < 2**31: see _check_numel
        acc = _dot(xt, tl.trans(w), acc, PREC, UPCAST)
    cols = r * BN + rn
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None])


@triton.jit
def _bsr_dx_kernel(dy_ptr, v_ptr, ccol_ptr, row_ptr, perm_ptr, dx_ptr, M, K, N, BM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    c = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    start = tl.load(ccol_ptr + c)
    end = tl.load(ccol_ptr + c + 1)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for q in range(start, end):
        r = tl.load(row_ptr + q).to(tl.int64)
        b = tl.load(perm_ptr + q).to(tl.int64)
        g = tl.load(dy_ptr + rm[:, None].to(tl.int64) * N + r * BN + rn[None, :], mask=m_ok[:, None], other=0.0)
        w = tl.load(v_ptr + b * (BN * BK) + rn[:, None] * BK + rk[None, :])
        acc = _dot(g, w, acc, PREC, UPCAST)
    tl.store(dx_ptr + rm[:, None].to(tl.int64) * K + c * BK + rk[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None])


@triton.jit
def _bsr_dw_kernel(dy_ptr, x_ptr, crow_ptr, col_ptr, dv_ptr, M, K, N, R, SEARCH: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    p = tl.program_id(0)
    # Block row of p: the largest r < R with crow[r] <= p (binary search, SEARCH >= ceil(log2(R)) steps).
    lo = 0
    hi = R
    for _ in range(SEARCH):
        mid = (lo + hi) // 2
        go_up = tl.load(crow_ptr + mid) <= p
        lo = tl.where(go_up, mid, lo)
        hi = tl.where(go_up, hi, mid)
    r = lo.to(tl.int64)
    c = tl.load(col_ptr + p).to(tl.int64)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(0, M, BM):
        rm = m0 + tl.arange(0, BM)
        m_ok = rm < M
        g = tl.load(dy_ptr + rm[:, None].to(tl.int64) * N + r * BN + rn[None, :], mask=m_ok[:, None], other=0.0)
        xt = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + c * BK + rk[None, :], mask=m_ok[:, None], other=0.0)
        acc = _dot(tl.trans(g), xt, acc, PREC, UPCAST)
    tl.store(dv_ptr + p.to(tl.int64) * (BN * BK) + rn[:, None] * BK + rk[None, :], acc.to(dv_ptr.dtype.element_ty))


def _check_numel(values) -> None:
    if values.numel() >= 2**31:  # the loops index values with int32 offsets
        raise ValueError(f"values: {values.numel()} elements; the triton kernels take fewer than 2**31")


def _block_m(M: int, bn: int, bk: int) -> int:
    """Rows of x per program: small in the interpreter (its cost grows with the tile), 128 on a GPU once M
    allows (a [128, 64] fp32 accumulator per program; untuned on the H200 so far)."""
    if M <= 16:
        return 16
    if _interpreted():
        return 32 if M <= 32 or max(bn, bk) == 64 else 64
    return 64 if M <= 64 else 128


def bsr_fwd_triton(x, values, crow, col, bias, y) -> None:
    M, K = x.shape
    N = y.shape[1]
    bn, bk = values.shape[1], values.shape[2]
    _check_numel(values)
    if M == 0:
        return
    BM = _block_m(M, bn, bk)
    _bsr_fwd_kernel[(triton.cdiv(M, BM), N // bn)](
        x, values, crow, col, bias if bias is not None else x, y, M, K, N, HAS_BIAS=bias is not None,
        BM=BM, BN=bn, BK=bk, PREC=_prec(x), UPCAST=_upcast(x))


def bsr_dx_triton(dy, values, ccol, row, perm, dx) -> None:
    M, N = dy.shape
    K = dx.shape[1]
    bn, bk = values.shape[1], values.shape[2]
    if M == 0:
        return
    BM = _block_m(M, bn, bk)
    _bsr_dx_kernel[(triton.cdiv(M, BM), K // bk)](dy, values, ccol, row, perm, dx, M, K, N, BM=BM, BN=bn, BK=bk,
                                                  PREC=_prec(dy), UPCAST=_upcast(dy))


def bsr_dw_triton(dy, x, crow, col, dv) -> None:
    nnzb, bn, bk = dv.shape
    if nnzb == 0:
        return
    M, K = x.shape
    N = dy.shape[1]
    R = N // bn
    _bsr_dw_kernel[(nnzb,)](dy, x, crow, col, dv, M, K, N, R, SEARCH=max(1, (R - 1).bit_length()) + 1,
                            BM=32, BN=bn, BK=bk, PREC=_prec(x), UPCAST=_upcast(x))
