"""Loads the compiled extension fastdistill._C once and remembers why it failed, if it did."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None when fastdistill._C is loaded (its ops are registered), else the load error as text."""
    try:
        from fastdistill import _C  # noqa: F401  (importing registers torch.ops.fastdistill.*)
    except Exception as exc:  # ImportError, OSError (undefined symbols, ABI mismatch), ...
        return f"{type(exc).__name__}: {exc}"
    return None


def is_available() -> bool:
    return load_error() is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered `fastdistill::<op>` for a dispatch key ("CPU", "CUDA")."""
    if not is_available() or not torch._C._dispatch_has_kernel(f"fastdistill::{op}"):  # not even defined
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdistill::{op}", dispatch_key)
