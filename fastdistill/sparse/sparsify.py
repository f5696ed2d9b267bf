"""sparsify_: pruned nn.Linear layers → SparseLinear layers with storage that actually shrinks.

"block" masks become BSR (values + block indices), "2:4" masks values + 2-bit metadata. Unstructured
masks stay masked dense: measured on the dev CPU (x 512 × 4096, W 4096 × 4096 fp32, torch CSR matmul vs
dense F.linear) CSR only wins above ~97-98% sparsity (3.1x slower at 90%, 2.0x at 95%, 0.69x at 98%,
0.44x at 99%), and unstructured CSR has no trainable fast path here; see UNSTRUCTURED_NOTE.

The dependency is one-way (nn -> ops -> sparse): SparseLinear is imported when sparsify_ runs, so the
sparse package imports nothing from fastdistill.nn or fastdistill.ops at module level.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from torch import nn

from fastdistill.sparse.prune import check_model, remove_masks

if TYPE_CHECKING:
    from fastdistill.nn.sparse_linear import SparseLinear

UNSTRUCTURED_NOTE = ("unstructured masks stay masked dense (a CSR matmul only beats dense F.linear above ~98% "
                     "sparsity on CPU); prune with pattern='block' or '2:4' for compressed storage and speed")


def sparsify_(model: nn.Module, *, backend: str = "auto") -> "dict[str, SparseLinear]":
    """Replaces every Linear pruned by prune_ with pattern "block" or "2:4" by a SparseLinear (in place).
    Returns the converted layers by name. Warns and changes nothing when the model has no pruned layer;
    unstructured layers keep their masks (see UNSTRUCTURED_NOTE)."""
    from fastdistill.nn.sparse_linear import SparseLinear  # lazily: see the module docstring

    check_model(model)
    pruned = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and hasattr(m, "weight_mask")]
    if not pruned:
        warnings.warn("sparsify_: the model has no pruned layers (run fastdistill.sparse.prune_ first); "
                      "nothing changed", UserWarning, stacklevel=2)
        return {}
    converted = {}
    for name, mod in pruned:
        pattern, block_size = mod._fd_prune_pattern
        if pattern == "unstructured":
            continue
        sparse = SparseLinear.from_linear(mod, mod.weight_mask, pattern=pattern, block_size=block_size or (32, 32),
                                          backend=backend)
        remove_masks(mod)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, sparse)
        converted[name] = sparse
    if len(converted) < len(pruned):
        warnings.warn(f"sparsify_: {len(pruned) - len(converted)} unstructured layer(s) left as is: "
                      f"{UNSTRUCTURED_NOTE}", UserWarning, stacklevel=2)
    return converted
