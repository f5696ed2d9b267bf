"""The one backend table: what each backend of each op can run, and the choice for backend="auto".

`select(op, backend, device, dtypes)` returns a backend name or raises a BackendError that lists
why the requested backend (or every candidate for "auto") cannot run. FASTDISTILL_BACKEND in the
environment replaces "auto" with an explicit backend.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch

from fastdistill import _ext

BACKENDS = ("triton", "cuda", "cpu", "reference")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# backend="auto" tries these in order. On CUDA, triton comes first until an H200 benchmark says
# otherwise (benchmarks/bench_distill_loss.py prints both); reference is the last resort everywhere.
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


class BackendError(RuntimeError):
    """An explicitly requested backend cannot run these inputs here."""


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] | None  # None: any floating dtype
    native_op: str | None  # the extension op it needs, if any


def _triton_reason(device_type: str) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton: not installed (pip install triton)"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton: CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)"
    return None


def _extension_reason(backend: Backend, device_type: str) -> str | None:
    err = _ext.load_error()
    if err is not None:
        return f"{backend.name}: extension not built: {err}"
    key = "CUDA" if device_type == "cuda" else "CPU"
    if not _ext.has_kernel(backend.native_op, key):
        return f"{backend.name}: the extension was built without {key} kernels for {backend.native_op}"
    return None


# The extension op family each op's cpu/cuda backends run (default: the op's own name). The fused
# linear loss does its GEMMs through aten and its loss through the distill_loss kernels.
NATIVE_FAMILY = {"fused_linear_distill_loss": "distill_loss",
                 "block_sparse_linear": "block_sparse_linear_fwd",  # + _dx_/_dw_ ops, same backend
                 "int8_linear": "int8_linear_epilogue"}  # cuda: torch._int_mm + epilogue; cpu: + int8_linear_cpu


def _table(op: str) -> dict[str, Backend]:
    native = NATIVE_FAMILY.get(op, op)
    return {
        "triton": Backend("triton", ("cuda", "cpu"), KERNEL_DTYPES, None),
        "cuda": Backend("cuda", ("cuda",), KERNEL_DTYPES, f"{native}_cuda"),
        "cpu": Backend("cpu", ("cpu",), KERNEL_DTYPES, f"{native}_cpu"),
        "reference": Backend("reference", ("cuda", "cpu"), None, None),
    }


OPS = ("distill_loss", "fused_linear_distill_loss", "topk_distill_loss",
       "block_sparse_linear", "semi_structured_linear",
       "quantize_per_token", "int8_linear", "int8_weight_only_linear")


def reason(op: str, backend: str, device_type: str, dtypes: tuple[torch.dtype, ...] = ()) -> str | None:
    """Why `backend` cannot run `op` on this device and these dtypes; None when it can."""
    b = _table(op)[backend]
    if device_type not in b.devices:
        return f"{backend}: runs on {'/'.join(b.devices)} tensors, got {device_type}"
    bad = [d for d in dtypes if b.dtypes is not None and d not in b.dtypes]
    if bad:
        return f"{backend}: dtype {bad[0]} not supported (float32, bfloat16, float16)"
    if device_type == "cuda" and not torch.cuda.is_available():
        return f"{backend}: no CUDA device"
    if backend == "triton":
        return _triton_reason(device_type)
    if b.native_op is not None:
        return _extension_reason(b, device_type)
    return None


_warned: set[str] = set()


# Under torch.compile the choice is made once at trace time and baked into the graph.
@torch.compiler.assume_constant_result
def select(op: str, backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str:
    if backend == "auto":
        backend = os.environ.get("FASTDISTILL_BACKEND", "auto") or "auto"
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend: unknown {backend!r}; expected 'auto' or one of {BACKENDS}")
        why = reason(op, backend, device.type, dtypes)
        if why is not None:
            raise BackendError(f"{op}: backend {why}")
        return backend
    order = AUTO_ORDER.get(device.type, ("reference",))
    reasons = []
    for name in order:
        why = reason(op, name, device.type, dtypes)
        if why is None:
            if name == "reference" and reasons and op not in _warned:
                _warned.add(op)
                warnings.warn(f"fastdistill.{op}: using the slow reference backend ({'; '.join(reasons)})",
                              RuntimeWarning, stacklevel=3)
            return name
        reasons.append(why)
    raise BackendError(f"{op}: no backend can run on {device.type}: {'; '.join(reasons)}")


def info() -> dict:
    """Availability of every backend of every op on CPU and (if present) CUDA, with reasons."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ops = {}
    for op in OPS:
        ops[op] = {}
        for name in BACKENDS:
            ops[op][name] = {dev: reason(op, name, dev) or "ok" for dev in _table(op)[name].devices}
    auto = {}
    for dev in devices:
        auto[dev] = next((n for n in AUTO_ORDER[dev] if reason("distill_loss", n, dev) is None), None)
    return {
        "extension": {"loaded": _ext.is_available(), "error": _ext.load_error(),
                      "cuda_kernels": _ext.has_kernel("distill_loss_cuda", "CUDA")},
        "ops": ops,
        "auto": auto,
        "env": {"FASTDISTILL_BACKEND": os.environ.get("FASTDISTILL_BACKEND"),
                "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")},
    }
