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

BACKENDS = ("triton", "cuda", "cpu", "cusparselt", "dense", "reference")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HALF_DTYPES = (torch.bfloat16, torch.float16)
# The oldest GPU generation the Triton and CUDA kernels are built and written for (bf16 tensor-core mma,
# cp.async): sm_80. Older devices fall back (auto) or get this reason (explicit backend).
MIN_COMPUTE_CAPABILITY = (8, 0)

# backend="auto" tries these in order (those the op has). On CUDA, triton comes first until an H200
# benchmark says otherwise (benchmarks/bench_distill_loss.py prints both); reference is the last resort.
# Ops may refine the choice by shape among the backends that can run (semi_structured_linear does, by M).
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


class BackendError(RuntimeError):
    """An explicitly requested backend cannot run these inputs here."""


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] | None  # None: any floating dtype
    native_op: str | None  # the extension op it needs, if any
    gpu_kernel: bool = False  # a kernel of ours on CUDA: needs MIN_COMPUTE_CAPABILITY


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


def _capability_reason(name: str, device_index: int | None) -> str | None:
    major, minor = torch.cuda.get_device_capability(device_index)
    if (major, minor) < MIN_COMPUTE_CAPABILITY:
        need = ".".join(map(str, MIN_COMPUTE_CAPABILITY))
        return (f"{name}: needs a GPU of compute capability >= {need} (sm_80+), "
                f"cuda:{torch.cuda.current_device() if device_index is None else device_index} has {major}.{minor}")
    return None


def _cusparselt_reason() -> str | None:
    if not torch.backends.cusparselt.is_available():
        return "cusparselt: this torch build has no cuSPARSELt"
    return None


# The extension op family each op's cpu/cuda backends run (default: the op's own name). The fused
# linear loss does its GEMMs through aten and its loss through the distill_loss kernels.
NATIVE_FAMILY = {"fused_linear_distill_loss": "distill_loss",
                 "fused_linear_topk_distill_loss": "topk_distill_loss",
                 "fused_linear_sampled_distill_loss": "sampled_distill_loss",
                 "block_sparse_linear": "block_sparse_linear_fwd",  # + _dx_/_dw_ ops, same backend
                 "int8_linear": "int8_linear_epilogue"}  # cuda: torch._int_mm + epilogue; cpu: + int8_linear_cpu

_ALL = ("triton", "cuda", "cpu", "reference")
# Which backends each op has. The 2:4 linear also runs PyTorch's cuSPARSELt GEMM ("cusparselt") and
# decompress + dense GEMM ("dense"); W8A16 has dequantize + dense GEMM ("dense": auto's route at large M on CUDA).
OP_BACKENDS = {"distill_loss": _ALL, "fused_linear_distill_loss": _ALL,
               "topk_distill_loss": _ALL, "fused_linear_topk_distill_loss": _ALL,
               "sampled_distill_loss": _ALL, "fused_linear_sampled_distill_loss": _ALL,
               "block_sparse_linear": _ALL,
               "semi_structured_linear": ("triton", "cuda", "cpu", "cusparselt", "dense", "reference"),
               "quantize_per_token": _ALL, "int8_linear": _ALL,
               "int8_weight_only_linear": ("triton", "cuda", "cpu", "dense", "reference")}
OPS = tuple(OP_BACKENDS)


def _table(op: str) -> dict[str, Backend]:
    native = NATIVE_FAMILY.get(op, op)
    every = {
        "triton": Backend("triton", ("cuda", "cpu"), KERNEL_DTYPES, None, gpu_kernel=True),
        "cuda": Backend("cuda", ("cuda",), KERNEL_DTYPES, f"{native}_cuda", gpu_kernel=True),
        "cpu": Backend("cpu", ("cpu",), KERNEL_DTYPES, f"{native}_cpu"),
        "cusparselt": Backend("cusparselt", ("cuda",), HALF_DTYPES, None),
        "dense": Backend("dense", ("cpu", "cuda"), KERNEL_DTYPES, None),
        "reference": Backend("reference", ("cuda", "cpu"), None, None),
    }
    return {name: every[name] for name in OP_BACKENDS[op]}


def reason(op: str, backend: str, device_type: str, dtypes: tuple[torch.dtype, ...] = (),
           device_index: int | None = None) -> str | None:
    """Why `backend` cannot run `op` on this device and these dtypes; None when it can."""
    table = _table(op)
    if backend not in table:
        return f"{backend}: {op} has no {backend} backend (it has {', '.join(table)})"
    b = table[backend]
    if device_type not in b.devices:
        return f"{backend}: runs on {'/'.join(b.devices)} tensors, got {device_type}"
    bad = [d for d in dtypes if b.dtypes is not None and d not in b.dtypes]
    if bad:
        names = ", ".join(str(d).removeprefix("torch.") for d in b.dtypes)
        return f"{backend}: dtype {bad[0]} not supported ({names})"
    if device_type == "cuda" and not torch.cuda.is_available():
        return f"{backend}: no CUDA device"
    if device_type == "cuda" and b.gpu_kernel:
        why = _capability_reason(backend, device_index)
        if why is not None:
            return why
    if backend == "triton":
        return _triton_reason(device_type)
    if backend == "cusparselt":
        return _cusparselt_reason()
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
            raise ValueError(f"backend: unknown {backend!r}; expected 'auto' or one of {tuple(OP_BACKENDS[op])}")
        why = reason(op, backend, device.type, dtypes, device.index)
        if why is not None:
            raise BackendError(f"{op}: backend {why}")
        return backend
    order = [name for name in AUTO_ORDER.get(device.type, ("reference",)) if name in OP_BACKENDS[op]]
    reasons = []
    for name in order:
        why = reason(op, name, device.type, dtypes, device.index)
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
        for name, b in _table(op).items():
            ops[op][name] = {dev: reason(op, name, dev) or "ok" for dev in b.devices}
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
