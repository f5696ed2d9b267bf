"""Benchmark cases of the sparse linears (forward, inference): block_sparse_linear (BSR) and
semi_structured_linear (2:4). Peers: the dense F.linear on the masked weight (what unstructured pruning
leaves), torch's BSR / CSR matmuls, and cuSPARSELt through torch's semi-structured tensors on CUDA.
flops counts the useful multiply-adds only (the stored weights), so a sparse kernel and the dense
matmul that computes the zeros too get the same work."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from fastdistill.bench.cases import (DTYPES, Case, backend_of, baseline_providers, fastdistill_providers,
                                     maybe_compile, unknown)

BSR_SHAPES = {"small": [dict(M=256, N=1024, K=1024, block=[32, 32], sparsity=0.9, dtype="float32")],
              "llm": [dict(M=8192, N=8192, K=8192, block=[64, 64], sparsity=0.9, dtype="bfloat16")],
              "tiny": [dict(M=16, N=64, K=64, block=[16, 16], sparsity=0.5, dtype="float32")]}
# 2:4: a decode-sized batch (the GEMV kernels) and a prefill-sized one (the GEMM path).
SEMI_SHAPES = {"small": [dict(M=8, N=1024, K=1024, dtype="float32"), dict(M=256, N=1024, K=1024, dtype="float32")],
               "llm": [dict(M=16, N=8192, K=8192, dtype="bfloat16"), dict(M=8192, N=8192, K=8192, dtype="bfloat16")],
               "tiny": [dict(M=4, N=32, K=64, dtype="float32")]}


def _weight(p: dict, device: str, kind: str):
    """(x, the masked dense weight, its mask), the same in every provider's process."""
    gen = torch.Generator().manual_seed(0)
    N, K = p["N"], p["K"]
    w = torch.randn(N, K, generator=gen) * K ** -0.5
    if kind == "bsr":
        bn, bk = p["block"]
        keep = torch.rand(N // bn, K // bk, generator=gen) >= p["sparsity"]
        mask = keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    else:
        mask = torch.rand(N, K // 4, 4, generator=gen).argsort(-1).argsort(-1).lt(2).reshape(N, K)
    dtype = DTYPES[p["dtype"]]
    x = torch.randn(p["M"], K, generator=gen).to(device=device, dtype=dtype)
    return x, (w * mask).to(device=device, dtype=dtype), mask.to(device)


def _inference(fn, x):
    def step():
        with torch.no_grad():
            return fn(x)
    return step


def build_block_sparse(p: dict, provider: str, device: str):
    from fastdistill import block_sparse_linear
    from fastdistill.reference.block_sparse_linear import block_sparse_linear_ref
    from fastdistill.sparse import BlockSparseWeight

    x, w, mask = _weight(p, device, "bsr")
    if provider == "torch-linear":
        return _inference(lambda a: F.linear(a, w), x)
    if provider in ("torch-bsr", "torch-csr"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse BSR tensor support is in beta state"
            ws = w.to_sparse_bsr(tuple(p["block"])) if provider == "torch-bsr" else w.to_sparse_csr()
        return _inference(lambda a: (ws @ a.t()).t(), x)
    W = BlockSparseWeight.from_dense(w, mask, tuple(p["block"]))
    if provider in ("eager", "compile"):
        return _inference(maybe_compile(provider, lambda a: block_sparse_linear_ref(a, W)), x)
    if provider.startswith("fastdistill-"):
        backend = backend_of(provider)
        return _inference(lambda a: block_sparse_linear(a, W, backend=backend), x)
    raise unknown("block_sparse_linear", provider)


def block_sparse_cases(device: str, shapes: str) -> list[Case]:
    out = []
    for s in BSR_SHAPES[shapes]:
        providers = (fastdistill_providers("block_sparse_linear", device, DTYPES[s["dtype"]]) +
                     baseline_providers("torch-linear", "torch-bsr", "torch-csr"))
        name = f"M {s['M']} N=K {s['N']} blocks {s['block'][0]}x{s['block'][1]} sparsity {s['sparsity']} {s['dtype']}"
        flops = round(2 * s["M"] * s["N"] * s["K"] * (1 - s["sparsity"]))
        out.append(Case("block_sparse_linear", name, dict(s, mode="fwd"), tuple(providers), build_block_sparse,
                        flops=flops))
    return out


def build_semi_structured(p: dict, provider: str, device: str):
    from fastdistill import semi_structured_linear
    from fastdistill.reference.semi_structured_linear import semi_structured_linear_ref
    from fastdistill.sparse import SemiStructuredWeight

    x, w, mask = _weight(p, device, "2:4")
    if provider == "torch-linear":
        return _inference(lambda a: F.linear(a, w), x)
    if provider == "torch-2:4":  # cuSPARSELt / CUTLASS through torch's semi-structured tensor
        from torch.sparse import to_sparse_semi_structured

        ws = to_sparse_semi_structured(w)
        return _inference(lambda a: F.linear(a, ws), x)
    W = SemiStructuredWeight.from_dense(w, mask)
    if provider in ("eager", "compile"):
        return _inference(maybe_compile(provider, lambda a: semi_structured_linear_ref(a, W)), x)
    if provider.startswith("fastdistill-"):
        backend = backend_of(provider)
        return _inference(lambda a: semi_structured_linear(a, W, backend=backend), x)
    raise unknown("semi_structured_linear", provider)


def semi_structured_cases(device: str, shapes: str) -> list[Case]:
    out = []
    for s in SEMI_SHAPES[shapes]:
        dtype = DTYPES[s["dtype"]]
        half = dtype in (torch.float16, torch.bfloat16)
        peers = ["torch-linear"] + (["torch-2:4"] if device == "cuda" and half else [])
        providers = (fastdistill_providers("semi_structured_linear", device, dtype,
                                           extra=("auto",) if device == "cuda" else ()) +
                     baseline_providers(*peers))
        name = f"M {s['M']} N=K {s['N']} {s['dtype']}"
        out.append(Case("semi_structured_linear", name, dict(s, mode="fwd"), tuple(providers),
                        build_semi_structured, flops=s["M"] * s["N"] * s["K"]))  # 2 * M*N*K / 2: half stored
    return out


CASES = {"block_sparse_linear": block_sparse_cases, "semi_structured_linear": semi_structured_cases}
