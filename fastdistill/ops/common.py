"""What the op modules share: the registry that gives the extension's ops their fake and autograd
implementations, output allocation, the Triton launch guard, and argument checks.

Registration happens when an op's module is imported (`import fastdistill` imports them all), never on
first call: registering inside a torch.compile trace fails, and the first call of an op may be traced.
Module import also runs under Python's import lock, so two threads cannot race to register.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os

import torch

from fastdistill import _ext

POISON_ENV = "FASTDISTILL_POISON"


def poison_enabled() -> bool:
    """Kernels' outputs start as NaN when FASTDISTILL_POISON=1 (tests set it), so unwritten elements fail."""
    return os.environ.get(POISON_ENV) == "1"


def new_output(shape, *, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised kernel output on `like`'s device (NaN-filled under FASTDISTILL_POISON=1)."""
    dtype = dtype or like.dtype
    if poison_enabled():
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def interpreting() -> bool:
    """Triton runs in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_guard(t: torch.Tensor):
    """Makes t's CUDA device current for a Triton launch (Triton launches on the current device, so a
    tensor on cuda:1 with device 0 current would be read by a kernel running on the wrong GPU)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# ---- the registry of the extension's ops -------------------------------------------------------------

def register_native(names, fake, autograd=None) -> None:
    """Registers `fake` (and `autograd` = (backward, setup_context)) for each extension op
    `fastdistill::<name>` that the loaded extension defines. Call at module level of the op's module."""
    if not _ext.is_available():
        return
    for name in names:
        qualname = f"fastdistill::{name}"
        if not torch._C._dispatch_has_kernel(qualname):  # an extension built before this op existed
            continue
        torch.library.register_fake(qualname)(fake)
        if autograd is not None:
            torch.library.register_autograd(qualname, autograd[0], setup_context=autograd[1])


def native(name: str):
    """torch.ops.fastdistill.<name> (registered at import by register_native)."""
    return getattr(torch.ops.fastdistill, name)


# ---- argument checks --------------------------------------------------------------------------------

def check_number(name, value, *, low=None, high=None, low_open=False) -> float:
    """A finite real number (not bool) within [low, high] (or (low, high] with low_open) as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name}: must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: must be <= {high}, got {value}")
    return value


def check_float(name: str, t, *, min_dim: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """validate=True: one host sync to refuse inf/NaN (they would give an inf/NaN scale for the row)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains inf or NaN (validate=True)")


def check_labels(labels, rows_like: torch.Tensor, rows_name: str, shape_hint: str) -> None:
    """labels: None, or integers of shape rows_like.shape[:-1] on rows_like's device."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor or None, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer tensor, got {labels.dtype}")
    if labels.shape != rows_like.shape[:-1]:
        raise ValueError(f"labels: expected shape {tuple(rows_like.shape[:-1])} ({shape_hint}), "
                         f"got {tuple(labels.shape)}")
    if labels.device != rows_like.device:
        raise ValueError(f"labels: on {labels.device}, {rows_name} on {rows_like.device}")


def row_view(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> [rows, V] with unit stride along V; a row stride is kept (kernels take it) so
    views with one leading stride are not copied."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _flat_view(x: torch.Tensor) -> torch.Tensor | None:
    """x as [rows, V] without a copy (one row stride, unit stride along V), or None."""
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        return None
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:  # the leading dims cannot be merged into one stride
        return None


def row_blocks(*xs: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Splits tensors that share their leading dims (..., V_i) into blocks of [rows, V_i] views without
    copying them: one block when every tensor flattens to one row stride; else one block per index of the
    first dim, recursively. The shifted causal-LM pattern `logits[:, :-1]` (two leading strides) thus costs
    one kernel call per sequence instead of a copy of the full logits. Tensors of one leading dim that
    still do not flatten (a stride along V) are made contiguous."""
    views = [_flat_view(x) for x in xs]
    if all(v is not None for v in views):
        return [tuple(views)]
    if xs[0].dim() <= 2 or xs[0].shape[0] == 0:
        return [tuple(v if v is not None else row_view(x) for v, x in zip(views, xs))]
    return [block for parts in zip(*(x.unbind(0) for x in xs)) for block in row_blocks(*parts)]


def contiguous_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> contiguous [M, K] (the GEMM ops' layout); K may be 0."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()


def as_int64(labels: torch.Tensor | None) -> torch.Tensor | None:
    """Labels of any integer dtype as int64 (what F.cross_entropy and the kernels take)."""
    return None if labels is None else labels.to(torch.int64)


def row_labels(labels: torch.Tensor | None) -> torch.Tensor | None:
    """Labels as the kernels read them: contiguous int64 [rows] (kernels index labels by row, so a
    strided column such as y[:, 0] or an expanded tensor must be materialised; it is rows × 8 bytes)."""
    return None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
