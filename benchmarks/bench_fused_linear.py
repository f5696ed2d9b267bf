"""Benchmark of fastdistill.fused_linear_distill_loss: time and peak extra memory, forward and fwd+bwd.

Providers, side by side in one run: "eager" (both heads' full logits materialized in the inputs'
dtype, then the reference loss — what users write without fastdistill), the same under
torch.compile, each fastdistill backend that runs on the device, and liger-kernel's
LigerFusedLinearJSD when installed (GPU; jsd/kl/reverse_kl only). The floor is the matmul FLOPs
(forward: both heads; backward: the student's d(hidden) and d(weight)) at the GEMM rate measured in
the same run on a [tokens, H_s] x [H_s, V] matmul of the same dtype.

    python benchmarks/bench_fused_linear.py          # CPU: 1024 tokens, H 1024, V 32000 fp32
    python benchmarks/bench_fused_linear.py --device cuda --tokens 8192 1024
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("fwd", "full")


def providers(device: str, divergence: str) -> list[str]:
    out = ["eager", "compile", "fastdistill-reference"]
    out += ["fastdistill-cpu"] if device == "cpu" else ["fastdistill-triton", "fastdistill-cuda"]
    if device == "cuda" and divergence in ("kl", "reverse_kl", "jsd") and harness.liger_installed():
        out.append("liger-fused-linear-jsd")
    return out


def loss_fn(provider: str, spec: dict):
    from fastdistill import fused_linear_distill_loss
    from fastdistill.reference.distill_loss import distill_loss_ref
    from fastdistill.reference.fused_linear_distill_loss import pad_vocab

    T, div = spec["temperature"], spec["divergence"]
    if provider in ("eager", "compile"):
        def fn(hs, ws, ht, wt):
            s, t = hs @ ws.t(), ht @ wt.t()
            v = max(s.shape[-1], t.shape[-1])
            return distill_loss_ref(pad_vocab(s, v), pad_vocab(t, v), divergence=div, temperature=T)
        return torch.compile(fn) if provider == "compile" else fn
    if provider.startswith("fastdistill-"):
        backend, _, rows = provider.split("-", 1)[1].partition("@")  # fastdistill-cpu@512: 512-row chunks
        chunk = int(rows) if rows else None
        return lambda hs, ws, ht, wt: fused_linear_distill_loss(hs, ws, ht, wt, divergence=div, temperature=T,
                                                                backend=backend, chunk_size=chunk)
    if provider == "liger-fused-linear-jsd":
        from liger_kernel.transformers import LigerFusedLinearJSD

        beta = {"kl": 0.0, "reverse_kl": 1.0}.get(div, 0.5)
        jsd = LigerFusedLinearJSD(jsd_beta=beta, temperature=T)
        return lambda hs, ws, ht, wt: jsd(hs, ws, ht, wt)
    raise ValueError(f"unknown provider {provider}")


def gemm_tflops(device: str, dtype: torch.dtype, m: int, k: int, n: int) -> float:
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(n, k, device=device, dtype=dtype)
    times = harness.time_it(lambda _: a @ b.t(), device=device, warmup=2, reps=5)
    return 2 * m * k * n / (statistics.median(times) * 1e-3) / 1e12


def worker(spec: dict) -> dict:
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    n, h_s, h_t, v = spec["tokens"], spec["h_s"], spec["h_t"], spec["vocab"]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)
    hs, ht = rand(n, h_s, scale=1.0), rand(n, h_t, scale=1.0)
    ws, wt = rand(v, h_s, scale=3 * h_s ** -0.5).requires_grad_(True), rand(v, h_t, scale=3 * h_t ** -0.5)
    hs.requires_grad_(True)
    fn = loss_fn(spec["provider"], spec)
    for _ in range(2):  # compile / first touch outside the measured region
        fn(hs, ws, ht, wt).backward()
    hs.grad = ws.grad = None  # the measured peak includes the gradients each provider allocates
    with harness.PeakMemory(device) as peak:
        if spec["mode"] == "fwd":
            times = harness.time_it(lambda _: fn(hs, ws, ht, wt), device=device, warmup=1, reps=spec["reps"])
        else:
            def full(_):
                hs.grad = ws.grad = None
                fn(hs, ws, ht, wt).backward()
            times = harness.time_it(full, device=device, warmup=1, reps=spec["reps"])
    return {**harness.summarize(times), "peak_mem_mb": peak.extra / 2**20, "times_ms": times}


def _merge(rounds: list[dict]) -> dict:
    """One provider's rounds as one result: quantiles over every rep, the median peak (first error if any)."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return rounds[0]
    times = [t for r in ok for t in r["times_ms"]]
    return {**harness.summarize(times), "peak_mem_mb": statistics.median(r["peak_mem_mb"] for r in ok),
            "rounds": len(ok)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, nargs="+")
    p.add_argument("--h-s", type=int)
    p.add_argument("--h-t", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--divergence", default="kl")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--providers", nargs="+")
    p.add_argument("--reps", type=int)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every provider this many times in turn (interleaved: a shared machine's load "
                        "falls on all alike); times are the median over all rounds' reps, memory the median peak")
    p.add_argument("--out", help="CSV name under benchmarks/results (default fused_linear_<device>)")
    p.add_argument("--csv-dir", help="also write the CSV here")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    gpu = args.device == "cuda"
    h_s, h_t = args.h_s or (2048 if gpu else 1024), args.h_t or (4096 if gpu else 1024)
    vocab, dtype = args.vocab or (128256 if gpu else 32000), args.dtype or ("bfloat16" if gpu else "float32")
    reps = args.reps or (10 if gpu else 3)
    env = harness.environment(args.device)
    results = []
    for tokens in args.tokens or ([8192, 1024] if gpu else [1024]):
        rate = gemm_tflops(args.device, DTYPES[dtype], tokens, h_s, vocab)
        flops = {"fwd": 2 * tokens * vocab * (h_s + h_t)}
        flops["full"] = flops["fwd"] + 2 * 2 * tokens * vocab * h_s
        print(f"{env['device']} | torch {env['torch']} | {tokens} tokens, H_s {h_s}, H_t {h_t}, V {vocab} {dtype} "
              f"| GEMM {rate:.2f} TFLOP/s -> floor fwd {flops['fwd'] / rate / 1e9:.1f} ms, "
              f"full {flops['full'] / rate / 1e9:.1f} ms", flush=True)
        runs = {}
        for _ in range(args.rounds):
            for provider in args.providers or providers(args.device, args.divergence):
                for mode in args.modes:
                    spec = dict(provider=provider, mode=mode, tokens=tokens, h_s=h_s, h_t=h_t, vocab=vocab,
                                dtype=dtype, divergence=args.divergence, temperature=args.temperature,
                                device=args.device, reps=reps)
                    runs.setdefault((provider, mode), []).append(harness.run_worker(__file__, spec))
                    print(f"  {provider:>24} {mode:>4}: {harness.describe(runs[provider, mode][-1])}", flush=True)
        for (provider, mode), rs in runs.items():
            r = _merge(rs)
            floor_ms = flops[mode] / rate / 1e9
            row = {**env, "op": "fused_linear_distill_loss", "divergence": args.divergence, "tokens": tokens,
                   "h_s": h_s, "h_t": h_t, "vocab": vocab, "dtype": dtype, "provider": provider, "mode": mode,
                   **r, "gemm_tflops": rate, "floor_ms": floor_ms}
            results.append(row)
            if args.rounds > 1:
                print(f"  {provider:>24} {mode:>4}: {harness.describe(r)} (all {len(rs)} rounds)", flush=True)
    for row in results:  # ratios within this run
        if "median_ms" not in row:
            continue
        same = {r["provider"]: r for r in results if r["tokens"] == row["tokens"] and r["mode"] == row["mode"]}
        eager = same.get("eager", {})
        if "median_ms" in eager:
            row["x_eager_time"] = row["median_ms"] / eager["median_ms"]
            row["x_eager_mem"] = row["peak_mem_mb"] / max(eager["peak_mem_mb"], 1e-9)
        if "median_ms" in same.get("compile", {}):
            row["x_compile_time"] = row["median_ms"] / same["compile"]["median_ms"]
        row["x_floor"] = row["median_ms"] / row["floor_ms"]
    harness.finish(args.out or f"fused_linear_{args.device}", results, args.csv_dir,
                   ["tokens", "provider", "mode", "median_ms", "peak_mem_mb", "x_eager_time", "x_eager_mem",
                    "x_compile_time", "x_floor"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
