"""Reference block-sparse linear: the masked dense matmul y = x · Wᵀ (+ bias), float32 accumulation.

Fallback backend, test oracle (in float64) and benchmark baseline. Differentiable w.r.t. x, values and
bias through autograd (the dense weight is built from the stored blocks, so dW lands on the pattern).
"""
from __future__ import annotations

import torch

from fastdistill.sparse.formats import BlockSparseWeight, bsr_to_dense


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_sparse_linear_ref(x: torch.Tensor, weight: BlockSparseWeight, bias: torch.Tensor | None = None,
                            values: torch.Tensor | None = None) -> torch.Tensor:
    """`values` overrides weight.values (e.g. a Parameter the gradient should reach)."""
    values = weight.values if values is None else values
    acc = _acc_dtype(x.dtype)
    w = bsr_to_dense(values.to(acc), weight.block_rows, weight.col_indices, weight.shape)
    y = torch.nn.functional.linear(x.to(acc), w, None if bias is None else bias.to(acc))
    return y.to(x.dtype)
