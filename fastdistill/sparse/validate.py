"""Range checks of the compressed sparse formats, run once where a weight enters (construction of a
BlockSparseWeight / SemiStructuredWeight / SparseLinear, load_state_dict, unpickling), never per call.

The kernels index memory with these tensors and check nothing (the C++ checks are shapes only), so an
out-of-range index from a state dict or a crafted file would read out of bounds (SIGSEGV) or give
garbage. Every check names the tensor. They may sync a device: they run on the host side, once.
Imports nothing from fastdistill (the formats and the ops both depend on this module, not the reverse).
"""
from __future__ import annotations

import torch

BLOCK_SIZES = (16, 32, 64)
INDEX_DTYPE = torch.int32


def check_shape(shape, name: str = "shape") -> tuple[int, int]:
    """(out_features, in_features): two non-negative Python ints."""
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
        raise TypeError(f"{name}: expected (out_features, in_features) as two ints, got {shape!r}")
    if shape[0] < 0 or shape[1] < 0:
        raise ValueError(f"{name}: feature counts must be >= 0, got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def _check_values(values, dims: int) -> None:
    if not isinstance(values, torch.Tensor) or not values.is_floating_point() or values.dim() != dims:
        raise ValueError(f"values: expected a {dims}-D floating-point tensor, got "
                         f"{getattr(values, 'dtype', type(values).__name__)} "
                         f"{tuple(values.shape) if isinstance(values, torch.Tensor) else ''}".rstrip())


def _check_index(t, name: str, numel: int, values: torch.Tensor, dtype=INDEX_DTYPE, dims: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.dim() != dims or (dims == 1 and t.numel() != numel):
        raise ValueError(f"{name}: expected shape ({numel},), got {tuple(t.shape)}")
    if t.device != values.device:
        raise ValueError(f"{name}: on {t.device}, values on {values.device}")
    if not t.is_contiguous():  # the kernels read it as a dense array
        raise ValueError(f"{name}: must be contiguous")


def csc_view(crow: torch.Tensor, col: torch.Tensor, R: int, C: int):
    """(block_rows, ccol_indices, row_indices, perm) implied by a valid CSR (crow, col): the derived
    indices are rebuilt from the forward ones, never trusted on their own."""
    counts = (crow[1:] - crow[:-1]).long()
    r = torch.repeat_interleave(torch.arange(R, device=crow.device), counts)
    c = col.long()
    perm = torch.argsort(c * max(R, 1) + r)  # (c, r) pairs are unique: a total order, no ties
    ccol = torch.zeros(C + 1, dtype=torch.int64, device=crow.device)
    ccol[1:] = torch.bincount(c, minlength=C).cumsum(0)
    idx = lambda t: t.to(INDEX_DTYPE).contiguous()  # noqa: E731
    return idx(r), idx(ccol), idx(r[perm]), idx(perm)


def validate_csr(values, crow_indices, col_indices, shape) -> tuple[int, int]:
    """The forward (CSR) half: crow monotone from 0 to nnzb, columns in [0, K/bk) strictly increasing
    within each block row (the reference's index_put would keep one of two duplicates while the kernels
    add both). Returns (R, C), the block rows and columns."""
    N, K = check_shape(shape)
    _check_values(values, 3)
    nnzb, bn, bk = (int(s) for s in values.shape)
    if bn not in BLOCK_SIZES or bk not in BLOCK_SIZES:
        raise ValueError(f"values: block size ({bn}, {bk}) not supported; each must be in {BLOCK_SIZES}")
    if N % bn or K % bk:
        raise ValueError(f"shape: ({N}, {K}) is not divisible by the block size ({bn}, {bk}) of values")
    R, C = N // bn, K // bk
    _check_index(crow_indices, "crow_indices", R + 1, values)
    _check_index(col_indices, "col_indices", nnzb, values)
    crow = crow_indices.long()
    if int(crow[0]) != 0 or int(crow[-1]) != nnzb:
        raise ValueError(f"crow_indices: must start at 0 and end at nnzb = {nnzb}, got {int(crow[0])} .. "
                         f"{int(crow[-1])}")
    if bool((crow[1:] < crow[:-1]).any()):
        raise ValueError("crow_indices: must be non-decreasing")
    col = col_indices.long()
    if nnzb and (int(col.min()) < 0 or int(col.max()) >= C):
        raise ValueError(f"col_indices: values must lie in [0, {C}) (K / bk), got [{int(col.min())}, "
                         f"{int(col.max())}]")
    if nnzb > 1:
        row_start = torch.zeros(nnzb, dtype=torch.bool, device=col.device)
        row_start[crow[:-1][crow[:-1] < nnzb]] = True  # the first block of each non-empty row
        if bool(((col[1:] <= col[:-1]) & ~row_start[1:]).any()):
            raise ValueError("col_indices: must be strictly increasing within each block row (sorted, no "
                             "duplicates)")
    return R, C


def validate_block_sparse(values, crow_indices, col_indices, ccol_indices, row_indices, perm, block_rows,
                          shape) -> None:
    """BSR invariants (layout: fastdistill.sparse.formats): the CSR checks, then the CSC view and
    block_rows must equal what crow/col imply."""
    R, C = validate_csr(values, crow_indices, col_indices, shape)
    nnzb = int(values.shape[0])
    for name, t, n in (("ccol_indices", ccol_indices, C + 1), ("row_indices", row_indices, nnzb),
                       ("perm", perm, nnzb), ("block_rows", block_rows, nnzb)):
        _check_index(t, name, n, values)
    derived = csc_view(crow_indices, col_indices, R, C)
    for name, given, want in zip(("block_rows", "ccol_indices", "row_indices", "perm"),
                                 (block_rows, ccol_indices, row_indices, perm), derived):
        if not torch.equal(given, want):
            raise ValueError(f"{name}: inconsistent with crow_indices/col_indices (rebuild the weight with "
                             f"BlockSparseWeight.from_dense or .from_csr)")


def validate_semi_structured(values, meta, shape) -> None:
    """2:4 invariants: values [N, K/2], meta uint8 [N, ceil(K/8)], each group naming two distinct kept
    positions in increasing order (i0 < i1, as from_dense writes them; the kernels and the reference
    disagree on a group with i0 == i1)."""
    N, K = check_shape(shape)
    if K % 4:
        raise ValueError(f"shape: 2:4 needs in_features (K = {K}) divisible by 4")
    _check_values(values, 2)
    if tuple(values.shape) != (N, K // 2):
        raise ValueError(f"values: expected shape ({N}, {K // 2}), got {tuple(values.shape)}")
    G = K // 4
    if not isinstance(meta, torch.Tensor):
        raise TypeError(f"meta: expected a torch.Tensor, got {type(meta).__name__}")
    if meta.dtype != torch.uint8:
        raise TypeError(f"meta: expected dtype torch.uint8, got {meta.dtype}")
    if tuple(meta.shape) != (N, (G + 1) // 2):
        raise ValueError(f"meta: expected shape ({N}, {(G + 1) // 2}), got {tuple(meta.shape)}")
    _check_index(meta, "meta", -1, values, dtype=torch.uint8, dims=2)
    nib = torch.stack([meta & 15, meta >> 4], dim=-1).reshape(N, -1)[:, :G]
    if bool(((nib & 3) >= (nib >> 2)).any()):
        raise ValueError("meta: every group must name two distinct kept positions i0 < i1 (nibble i0 | i1 << 2)")
