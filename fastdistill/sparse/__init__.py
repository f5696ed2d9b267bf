"""Pruning, sparse formats, sparse ops and layers (prune → train → sparsify).

    prune_(model, sparsity, pattern=..., criterion=..., scope=...)   masks that survive training
    GradualPruner(model, final_sparsity, start_step=, end_step=, every=)   cubic schedule
    sparsify_(model)                                                    masked Linear → SparseLinear
    block_sparse_linear / semi_structured_linear                       the ops on compressed weights

Names resolve lazily. The dependency is one-way, fastdistill.nn -> fastdistill.ops -> fastdistill.sparse:
no module of this package imports fastdistill.nn or fastdistill.ops at module level (sparsify_ imports
SparseLinear when it runs), so the formats, checks and pruning load without the ops.
"""
import importlib

_WHERE = {
    "SparseLinear": "fastdistill.nn.sparse_linear",
    "block_sparse_linear": "fastdistill.ops.block_sparse_linear",
    "semi_structured_linear": "fastdistill.ops.semi_structured_linear",
    "BlockSparseWeight": "fastdistill.sparse.formats",
    "SemiStructuredWeight": "fastdistill.sparse.formats",
    "GradualPruner": "fastdistill.sparse.gradual",
    "PruneReport": "fastdistill.sparse.prune",
    "prune_": "fastdistill.sparse.prune",
    "re_arm": "fastdistill.sparse.masks",
    "reapply_masks": "fastdistill.sparse.prune",
    "remove_masks": "fastdistill.sparse.prune",
    "restore_masks": "fastdistill.sparse.prune",
    "report": "fastdistill.sparse.prune",
    "sparsify_": "fastdistill.sparse.sparsify",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'fastdistill.sparse' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
