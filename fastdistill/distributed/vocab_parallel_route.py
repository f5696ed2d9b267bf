"""Whether a loss call is vocabulary-sharded: the one cheap test the public loss functions make.

No import of torch.distributed.tensor here: when that module was never imported, no DTensor can exist.
"""
from __future__ import annotations

import sys


def is_dtensor(t) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def any_dtensor(*tensors) -> bool:
    return any(is_dtensor(t) for t in tensors)
