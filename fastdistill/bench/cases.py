"""The registry of benchmark cases: every op, its shapes ("small": CPU CI sizes, "llm": the GPU targets of the
issues, "tiny": a smoke test of every provider in seconds) and the providers that run it on a device.

A Case is data plus a build function: build(params, provider, device) returns a function of no arguments that
runs the op once (forward, or forward + backward for the losses' "full" mode). Providers are
    fastdistill-<backend>  each backend of the op that runs on the device (triton only on CUDA: interpreted
                           Triton on a CPU measures the interpreter), fastdistill-auto where the op routes by shape;
    eager                  the op's reference (fastdistill.reference.*), the PyTorch a user would write;
    compile                torch.compile of the same reference;
    peers                  the best thing PyTorch or a peer library offers on that device (torch-*, liger-*).
Every provider that is not fastdistill is a baseline: the runner's ratio is to the fastest baseline of the case.
The cases of one (op, device, shapes) are deterministic, so a subprocess worker finds its case again by name.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

OPS = ("distill_loss", "fused_linear_distill_loss", "topk_distill_loss", "block_sparse_linear",
       "semi_structured_linear", "int8_linear", "int8_weight_only_linear", "quantize_per_token")
SHAPES = ("small", "llm", "tiny")  # tiny: seconds for every provider (smoke tests)
DEVICES = ("cpu", "cuda")
KINDS = ("fastdistill", "eager", "compile", "peer")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Provider:
    name: str
    kind: str  # one of KINDS

    @property
    def baseline(self) -> bool:
        return self.kind != "fastdistill"


@dataclass(frozen=True)
class Case:
    """One measured problem of an op. bytes: the bytes a call must move at least (for GB/s); flops: the
    useful floating/int operations of a call (for TFLOP/s); either may be None."""
    op: str
    name: str
    params: dict
    providers: tuple[Provider, ...]
    build: Callable[[dict, str, str], Callable[[], Any]] = field(repr=False, compare=False)
    bytes: Optional[int] = None
    flops: Optional[int] = None

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise ValueError(f"provider: {self.op} [{self.name}] has no provider {name!r} "
                         f"(it has {', '.join(p.name for p in self.providers)})")

    @property
    def baselines(self) -> tuple[Provider, ...]:
        return tuple(p for p in self.providers if p.baseline)


def fastdistill_providers(op: str, device: str, dtype: torch.dtype, extra: tuple[str, ...] = ()) -> list[Provider]:
    """fastdistill-<backend> for each backend of `op` that runs here (the one dispatch table decides), without
    the reference (that is "eager"); `extra` adds backends the table lists for other ops (e.g. "auto")."""
    from fastdistill import dispatch

    out = []
    for backend in dispatch.OP_BACKENDS[op]:
        if backend == "reference" or (backend == "triton" and device != "cuda"):
            continue
        if dispatch.reason(op, backend, device, (dtype,)) is None:
            out.append(Provider(f"fastdistill-{backend}", "fastdistill"))
    return out + [Provider(f"fastdistill-{b}", "fastdistill") for b in extra]


def baseline_providers(*peers: str) -> list[Provider]:
    return [Provider("eager", "eager"), Provider("compile", "compile")] + [Provider(p, "peer") for p in peers]


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def backend_of(provider: str) -> str:
    """fastdistill-cpu -> cpu."""
    return provider.split("-", 1)[1]


def maybe_compile(provider: str, fn: Callable) -> Callable:
    return torch.compile(fn) if provider == "compile" else fn


def unknown(case_op: str, provider: str):
    return ValueError(f"provider: {case_op} has no provider {provider!r}")


def _builders() -> dict[str, Callable[[str, str], list[Case]]]:
    from fastdistill.bench import cases_int8, cases_losses, cases_sparse

    return {**cases_losses.CASES, **cases_sparse.CASES, **cases_int8.CASES}


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"device: expected one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda is not available here (torch.cuda.is_available() is False)")


def get_cases(op: str, device: str = "cpu", shapes: str = "small") -> list[Case]:
    """The cases of one op on a device at a shape set, each with the providers that run there."""
    if op not in OPS:
        raise ValueError(f"op: unknown {op!r}; expected one of {', '.join(OPS)}")
    if shapes not in SHAPES:
        raise ValueError(f"shapes: expected one of {SHAPES}, got {shapes!r}")
    check_device(device)
    return _builders()[op](device, shapes)


def find_case(op: str, name: str, device: str, shapes: str) -> Case:
    for case in get_cases(op, device, shapes):
        if case.name == name:
            return case
    raise ValueError(f"case: {op} has no case {name!r} at shapes {shapes!r} on {device}")
