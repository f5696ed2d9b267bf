"""Benchmark of the sparse ops: block_sparse_linear (BSR) and semi_structured_linear (2:4), fwd and fwd+bwd.

Providers, side by side in one run: "dense" (F.linear on the masked dense weight — what pruning with
torch.nn.utils.prune gives), torch's own sparse matmuls ("torch-bsr" / "torch-csr" for block sparsity,
"torch-2:4" = torch.sparse.to_sparse_semi_structured on CUDA), and each fastdistill backend that runs on
the device. Ratios are to "dense" in the same run.

    python benchmarks/bench_sparse.py                  # CPU: x 512x4096, W 4096x4096 fp32, 32x32 blocks
    python benchmarks/bench_sparse.py --device cuda    # H200: bf16 8192x8192, M 8192, 90% 64x64; 2:4 M 8192, 1..16
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("fwd", "full")


def providers(kind: str, device: str) -> list[str]:
    ours = ["fastdistill-cpu"] if device == "cpu" else ["fastdistill-triton", "fastdistill-cuda"]
    if kind == "bsr":
        return ["dense", "torch-bsr", "torch-csr"] + ours
    # fastdistill-auto on CUDA: cuSPARSELt for M > 16, the cuda GEMV kernel for M <= 16 (ops/semi_structured_linear)
    return ["dense"] + (["torch-2:4", "fastdistill-auto"] if device == "cuda" else []) + ours


def build(spec: dict):
    """(x, the weight as the provider consumes it, a function y = f(x, w), the tensors that get grads)."""
    from fastdistill.sparse import BlockSparseWeight, SemiStructuredWeight, block_sparse_linear, semi_structured_linear

    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    M, N, K, provider = spec["M"], spec["N"], spec["K"], spec["provider"]
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=gen) * K ** -0.5
    if spec["kind"] == "bsr":
        bn, bk = spec["block"]
        keep = torch.rand(N // bn, K // bk, generator=gen) >= spec["sparsity"]
        mask = keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    else:
        mask = torch.rand(N, K // 4, 4, generator=gen).argsort(-1).argsort(-1).lt(2).reshape(N, K)
    w = (w * mask).to(device=device, dtype=dtype)
    x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype).requires_grad_(spec["mode"] == "full")
    if provider == "dense":
        w = w.requires_grad_(spec["mode"] == "full")
        return x, w, torch.nn.functional.linear, [x, w]
    if provider in ("torch-bsr", "torch-csr"):
        ws = w.to_sparse_bsr(tuple(spec["block"])) if provider == "torch-bsr" else w.to_sparse_csr()
        return x, ws, lambda a, b: (b @ a.t()).t(), [x]
    if provider == "torch-2:4":
        from torch.sparse import to_sparse_semi_structured

        ws = to_sparse_semi_structured(w)
        return x, ws, torch.nn.functional.linear, [x]
    backend = provider.split("-", 1)[1]
    if spec["kind"] == "bsr":
        W = BlockSparseWeight.from_dense(w, mask.to(device), tuple(spec["block"]))
        fn = lambda a, b: block_sparse_linear(a, b, backend=backend)  # noqa: E731
    else:
        W = SemiStructuredWeight.from_dense(w, mask.to(device))
        fn = lambda a, b: semi_structured_linear(a, b, backend=backend)  # noqa: E731
    W.values.requires_grad_(spec["mode"] == "full")
    return x, W, fn, [x, W.values]


def worker(spec: dict) -> dict:
    device = spec["device"]
    x, w, fn, leaves = build(spec)
    dy = torch.randn(spec["M"], spec["N"], device=device, dtype=DTYPES[spec["dtype"]])
    if spec["mode"] == "fwd":
        def step(_):
            with torch.no_grad():
                fn(x, w)
    else:
        def step(_):
            for t in leaves:
                t.grad = None
            fn(x, w).backward(dy)
    step(0)
    for t in leaves:  # the measured peak includes the gradients each provider allocates
        t.grad = None
    with harness.PeakMemory(device) as peak:
        times = harness.time_it(step, device=device, warmup=1, reps=spec["reps"])
    return {**harness.summarize(times), "peak_mem_mb": peak.extra / 2**20}


def cases(device: str, args) -> list[dict]:
    gpu = device == "cuda"
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    n = args.n or (8192 if gpu else 4096)
    out = []
    if "bsr" in args.kinds:
        block = args.block or ([64, 64] if gpu else [32, 32])
        for s in args.sparsity or ([0.9] if gpu else [0.5, 0.9]):
            out.append(dict(kind="bsr", M=args.m or (8192 if gpu else 512), N=n, K=n, block=block, sparsity=s,
                            dtype=dtype))
    if "2:4" in args.kinds:
        for m in args.m_24 or ([1, 4, 16, 8192] if gpu else [1, 4, 8]):
            out.append(dict(kind="2:4", M=m, N=n, K=n, block=None, sparsity=0.5, dtype=dtype))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kinds", nargs="+", default=["bsr", "2:4"], choices=["bsr", "2:4"])
    p.add_argument("--m", type=int, help="rows of x for the block-sparse cases")
    p.add_argument("--m-24", type=int, nargs="+", help="rows of x for the 2:4 cases")
    p.add_argument("--n", type=int, help="N = K of the weight")
    p.add_argument("--block", type=int, nargs=2)
    p.add_argument("--sparsity", type=float, nargs="+")
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--providers", nargs="+")
    p.add_argument("--reps", type=int)
    p.add_argument("--reps-24", type=int, help="repetitions of the (fast, small-M) 2:4 cases")
    p.add_argument("--out", help="CSV name under benchmarks/results (default sparse_<device>)")
    p.add_argument("--csv-dir", help="also write the CSV here")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    env = harness.environment(args.device)
    reps = args.reps or (20 if args.device == "cuda" else 5)
    results = []
    for case in cases(args.device, args):
        label = (f"{case['kind']} M {case['M']} N=K {case['N']} {case['dtype']}" +
                 (f" blocks {case['block']} sparsity {case['sparsity']}" if case["kind"] == "bsr" else ""))
        print(f"{env['device']} | torch {env['torch']} | {label}", flush=True)
        for provider in [q for q in providers(case["kind"], args.device) if not args.providers or q in args.providers]:
            for mode in args.modes:
                spec = dict(case, provider=provider, mode=mode, device=args.device,
                            reps=reps if case["kind"] == "bsr" else (args.reps_24 or reps))
                r = harness.run_worker(__file__, spec)
                results.append({**env, "op": case["kind"], **{k: v for k, v in spec.items() if k != "device"}, **r})
                print(f"  {provider:>20} {mode:>4}: {harness.describe(r)}", flush=True)
    for row in results:  # ratios to dense within this run
        same = [r for r in results if r["op"] == row["op"] and r["M"] == row["M"] and r["mode"] == row["mode"]
                and r["sparsity"] == row["sparsity"] and r["provider"] == "dense" and "median_ms" in r]
        if same and "median_ms" in row:
            row["x_dense_time"] = row["median_ms"] / same[0]["median_ms"]
            row["x_dense_mem"] = row["peak_mem_mb"] / max(same[0]["peak_mem_mb"], 1e-9)
    harness.finish(args.out or f"sparse_{args.device}", results, args.csv_dir,
                   ["op", "M", "sparsity", "provider", "mode", "median_ms", "peak_mem_mb", "x_dense_time"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
