"""Reference 2:4 linear: decompress to the dense W and y = x · Wᵀ (+ bias), float32 accumulation."""
from __future__ import annotations

import torch

from fastdistill.reference.block_sparse_linear import _acc_dtype
from fastdistill.sparse.formats import SemiStructuredWeight, semi_structured_to_dense


def semi_structured_linear_ref(x: torch.Tensor, weight: SemiStructuredWeight, bias: torch.Tensor | None = None,
                               values: torch.Tensor | None = None) -> torch.Tensor:
    values = weight.values if values is None else values
    acc = _acc_dtype(x.dtype)
    w = semi_structured_to_dense(values.to(acc), weight.meta, weight.shape[1])
    y = torch.nn.functional.linear(x.to(acc), w, None if bias is None else bias.to(acc))
    return y.to(x.dtype)
