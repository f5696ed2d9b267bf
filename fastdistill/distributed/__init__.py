"""fastdistill.distributed: training with torch.distributed.

`import fastdistill` loads only this file and vocab_parallel_route.py (the DTensor test of the loss ops).

Vocabulary-parallel losses (tensor parallel on the output head): fastdistill.distill_loss,
fused_linear_distill_loss and topk_distill_loss take DTensors placed Shard along the vocabulary, or local
slices plus group=; the functions below are what they route to (docs/sharded.md).

Names load on first access (PEP 562), so that the loss ops can import the cheap DTensor test of this package
without importing the rest of it.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "vocab_parallel_distill_loss": "fastdistill.distributed.vocab_parallel_loss",
    "vocab_parallel_topk_distill_loss": "fastdistill.distributed.vocab_parallel_topk",
    "vocab_parallel_fused_linear_distill_loss": "fastdistill.distributed.vocab_parallel_fused",
    "run_in_forward": "fastdistill.distributed.forward",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fastdistill.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
