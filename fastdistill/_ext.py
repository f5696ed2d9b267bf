"""Loads the compiled extension fastdistill._C once and remembers why it failed, if it did.

No extension at all is a legitimate pure-Python install (every op has its reference backend) and stays
quiet. An extension that exists but does not load (built against another torch: undefined symbols, ABI
mismatch) warns loudly at `import fastdistill`, since the quiet fallback would make every op slow.
"""
from __future__ import annotations

import functools
import importlib.util
import warnings

import torch


def build_info() -> dict | None:
    """What setup.py built (fastdistill/_build_info.py): torch version, CUDA or not and why, archs."""
    try:
        from fastdistill._build_info import BUILD
    except ImportError:  # not built by setup.py (pure-Python install, or an older build)
        return None
    return dict(BUILD)


def _extension_present() -> bool:
    try:
        return importlib.util.find_spec("fastdistill._C") is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None when fastdistill._C is loaded (its ops are registered), else the load error as text."""
    if not _extension_present():
        return "fastdistill._C is not built (pure-Python install: reference backends only)"
    try:
        from fastdistill import _C  # noqa: F401  (importing registers torch.ops.fastdistill.*)
    except Exception as exc:  # ImportError, OSError (undefined symbols, ABI mismatch), ...
        error = f"{type(exc).__name__}: {exc}"
        built = (build_info() or {}).get("torch")
        against = f"built against torch {built}, " if built else ""
        warnings.warn(
            f"fastdistill: the compiled extension exists but failed to load ({error}); {against}running torch "
            f"{torch.__version__}. Falling back to the slow reference backends. Fix: rebuild it against this torch "
            "(`pip install --no-build-isolation --force-reinstall --no-deps fastdistill` from source, or "
            "`make build` in a checkout).", RuntimeWarning, stacklevel=2)
        return error
    return None


def is_available() -> bool:
    return load_error() is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered `fastdistill::<op>` for a dispatch key ("CPU", "CUDA")."""
    if not is_available() or not torch._C._dispatch_has_kernel(f"fastdistill::{op}"):  # not even defined
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdistill::{op}", dispatch_key)
