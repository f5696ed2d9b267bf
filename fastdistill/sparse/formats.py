"""Compressed sparse weights: block-sparse (BSR + its CSC view) and 2:4 semi-structured.

Layouts are fixed by the schema comments in csrc/ops.cpp (the CUDA kernels work from them):
- BlockSparseWeight of W [N, K] with blocks [bn, bk]: values [nnzb, bn, bk]; crow_indices [N/bn + 1],
  col_indices [nnzb] (CSR over blocks, columns increasing); the CSC view ccol_indices [K/bk + 1],
  row_indices [nnzb], perm [nnzb] (values index of each block in column order) for dx without atomics;
  block_rows [nnzb] (the block row of each stored block, for Python-side gathers). Indices are int32.
- SemiStructuredWeight of W [N, K], K % 4 == 0: values [N, K/2] (the two kept elements of each group of
  four, in column order) and meta [N, ceil(K/8)] uint8 (per group a nibble i0 | i1 << 2, two groups a byte,
  the even group in the low nibble).
Conversions and the range checks of fastdistill.sparse.validate run once, when a weight is built (they
may sync); the ops never do. `trusted=True` skips the checks for tensors that were checked already (a
SparseLinear's own buffers, rebuilt into a bundle on every forward).
"""
from __future__ import annotations

from dataclasses import InitVar, dataclass, fields, replace

import torch

from fastdistill.sparse.validate import (BLOCK_SIZES, INDEX_DTYPE, csc_view, validate_block_sparse, validate_csr,
                                         validate_semi_structured)


def _tensor_fields(obj):
    return {f.name: getattr(obj, f.name) for f in fields(obj) if isinstance(getattr(obj, f.name), torch.Tensor)}


class _Bundle:
    """Shared by both formats: device/dtype moves (indices keep their dtype) and storage size."""

    def to(self, device=None, dtype=None):
        moved = {name: t.to(device=device, dtype=dtype if t.is_floating_point() else None)
                 for name, t in _tensor_fields(self).items()}
        return replace(self, **moved)  # checked again: the fields may have been reassigned since

    @property
    def nbytes(self) -> int:
        """Bytes held by the compressed tensors (what the storage actually costs)."""
        return sum(t.numel() * t.element_size() for t in _tensor_fields(self).values())

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device


@dataclass
class BlockSparseWeight(_Bundle):
    values: torch.Tensor
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    ccol_indices: torch.Tensor
    row_indices: torch.Tensor
    perm: torch.Tensor
    block_rows: torch.Tensor
    shape: tuple[int, int]
    trusted: InitVar[bool] = False

    def __post_init__(self, trusted: bool) -> None:
        if not trusted:
            validate_block_sparse(self.values, self.crow_indices, self.col_indices, self.ccol_indices,
                                  self.row_indices, self.perm, self.block_rows, self.shape)

    @classmethod
    def from_csr(cls, values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                 shape: tuple[int, int]) -> "BlockSparseWeight":
        """From the forward (CSR) indices alone: after their range checks, the CSC view and block_rows are
        rebuilt from them, so only crow/col need to come from a file."""
        R, C = validate_csr(values, crow_indices, col_indices, shape)
        rows, ccol, row_indices, perm = csc_view(crow_indices, col_indices, R, C)
        return cls(values, crow_indices, col_indices, ccol, row_indices, perm, rows, tuple(shape), trusted=True)

    @property
    def block_size(self) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def nnzb(self) -> int:
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        bn, bk = self.block_size
        return self.nnzb * bn * bk / max(1, self.shape[0] * self.shape[1])

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None,
                   block_size: tuple[int, int] = (32, 32)) -> "BlockSparseWeight":
        """Stores every block of `weight` where `mask` (default: weight != 0) has a nonzero. Elements of
        a stored block outside the mask are stored as zeros."""
        bn, bk = check_block_size(block_size)
        N, K = check_weight_2d(weight, "weight")
        if N % bn or K % bk:
            raise ValueError(f"weight: shape ({N}, {K}) is not divisible by block_size ({bn}, {bk})")
        if mask is None:
            mask = weight != 0
        elif mask.shape != weight.shape:
            raise ValueError(f"mask: shape {tuple(mask.shape)} does not match weight {tuple(weight.shape)}")
        mask = mask.to(device=weight.device, dtype=torch.bool)
        R, C = N // bn, K // bk
        blocks = (weight * mask).detach().reshape(R, bn, C, bk).transpose(1, 2)  # [R, C, bn, bk]
        bmask = mask.reshape(R, bn, C, bk).any(dim=3).any(dim=1)
        r, c = bmask.nonzero(as_tuple=True)  # row-major: CSR order
        values = blocks[r, c].contiguous()
        crow = torch.zeros(R + 1, dtype=torch.int64, device=weight.device)
        crow[1:] = torch.bincount(r, minlength=R).cumsum(0)
        perm = torch.argsort(c * R + r)  # column-major order of the same blocks
        ccol = torch.zeros(C + 1, dtype=torch.int64, device=weight.device)
        ccol[1:] = torch.bincount(c, minlength=C).cumsum(0)
        idx = lambda t: t.to(INDEX_DTYPE).contiguous()  # noqa: E731
        return cls(values, idx(crow), idx(c), idx(ccol), idx(r[perm]), idx(perm), idx(r), (N, K), trusted=True)

    def to_dense(self) -> torch.Tensor:
        """The dense W [N, K] (differentiable w.r.t. values)."""
        return bsr_to_dense(self.values, self.block_rows, self.col_indices, self.shape)


def bsr_to_dense(values, block_rows, col_indices, shape) -> torch.Tensor:
    """Dense [N, K] from stored blocks; index_put keeps it differentiable and free of host syncs."""
    N, K = shape
    bn, bk = values.shape[1], values.shape[2]
    dense = values.new_zeros(N // bn, K // bk, bn, bk)
    dense = dense.index_put((block_rows.long(), col_indices.long()), values)
    return dense.transpose(1, 2).reshape(N, K)


@dataclass
class SemiStructuredWeight(_Bundle):
    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, int]
    trusted: InitVar[bool] = False

    def __post_init__(self, trusted: bool) -> None:
        if not trusted:
            validate_semi_structured(self.values, self.meta, self.shape)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> "SemiStructuredWeight":
        """Compresses a 2:4 weight: `mask` (default weight != 0) may keep at most 2 of every 4 elements."""
        N, K = check_weight_2d(weight, "weight")
        if K % 4:
            raise ValueError(f"weight: 2:4 needs in_features (K = {K}) divisible by 4 (pad the layer's inputs)")
        if mask is None:
            mask = weight != 0
        elif mask.shape != weight.shape:
            raise ValueError(f"mask: shape {tuple(mask.shape)} does not match weight {tuple(weight.shape)}")
        groups = mask.to(device=weight.device, dtype=torch.bool).reshape(N, K // 4, 4)
        if bool((groups.sum(-1) > 2).any()):
            raise ValueError("mask: not 2:4 — some group of 4 consecutive inputs keeps more than 2 elements")
        # Kept positions first, then the lowest free ones, so every group names two distinct positions.
        score = groups.to(torch.int64) * 8 + (3 - torch.arange(4, device=weight.device))
        pos = score.topk(2, dim=-1).indices.sort(dim=-1).values  # [N, G, 2], i0 < i1
        masked = (weight * mask).detach().reshape(N, K // 4, 4)
        values = masked.gather(-1, pos).reshape(N, K // 2).contiguous()
        nib = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)  # [N, G]
        if nib.shape[1] % 2:
            nib = torch.cat([nib, nib.new_zeros(N, 1)], dim=1)
        meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()
        return cls(values, meta, (N, K), trusted=True)

    def to_dense(self) -> torch.Tensor:
        return semi_structured_to_dense(self.values, self.meta, self.shape[1])


def semi_structured_onehot(meta: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [N, K/4, 4] masks of the first and the second kept position of each group (uint8 math: no
    int64 index tensors, which cost 4x the dense weight's bytes)."""
    nib = torch.stack([meta & 15, meta >> 4], dim=-1).reshape(meta.shape[0], -1)[:, : K // 4, None]
    pos = torch.arange(4, dtype=torch.uint8, device=meta.device)
    return (nib & 3) == pos, (nib >> 2) == pos


def semi_structured_to_dense(values: torch.Tensor, meta: torch.Tensor, K: int) -> torch.Tensor:
    """Dense [N, K] from values + meta (differentiable w.r.t. values; no host syncs)."""
    N = values.shape[0]
    first, second = semi_structured_onehot(meta, K)
    v = values.reshape(N, K // 4, 2, 1)
    zero = values.new_zeros(())
    return torch.where(first, v[:, :, 0], torch.where(second, v[:, :, 1], zero)).reshape(N, K)


def semi_structured_gather(dense: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The kept elements [N, K/2] of a dense [N, K] (e.g. a gradient), in the values layout."""
    N, K = dense.shape
    first, second = semi_structured_onehot(meta, K)
    d = dense.reshape(N, K // 4, 4)
    zero = dense.new_zeros(())
    return torch.stack([torch.where(first, d, zero).sum(-1), torch.where(second, d, zero).sum(-1)],
                       dim=-1).reshape(N, K // 2)


def check_block_size(block_size) -> tuple[int, int]:
    if isinstance(block_size, int):
        block_size = (block_size, block_size)
    if len(block_size) != 2 or any(b not in BLOCK_SIZES for b in block_size):
        raise ValueError(f"block_size: expected (bn, bk) with each in {BLOCK_SIZES}, got {block_size}")
    return int(block_size[0]), int(block_size[1])


def check_weight_2d(weight, name: str) -> tuple[int, int]:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D floating-point tensor [out_features, in_features]")
    return int(weight.shape[0]), int(weight.shape[1])
