"""Benchmark of fastdistill.topk_distill_loss: forward, backward and forward+backward; time and peak memory.

Providers, side by side in one run: the eager reference of distill_loss on the full teacher logits
(what users do without a top-k cache; the same for every tail), the eager top-k reference
(fastdistill.reference.topk_distill_loss), the same under torch.compile, and each fastdistill
backend that runs on the device. The teacher's top-k log-probs are fp16 (as a cache stores them).
The floor is one read of the student logits and the top-k entries plus one write of the gradient
at the copy bandwidth measured in the same run.

    python benchmarks/bench_topk.py                          # device defaults (CPU: 2048 x 32000, k=64, fp32)
    python benchmarks/bench_topk.py --rows 512 --k 16 128 --tail bucket
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
MODES = ("fwd", "bwd", "full")
TAILS = ("renormalize", "bucket")
FULL = "eager-full-logits"  # tail-independent: measured once per k


def providers(device: str) -> list[str]:
    return ["eager", "compile"] + (["fastdistill-cpu"] if device == "cpu" else ["fastdistill-triton"])


def loss_fn(provider: str, spec: dict):
    from fastdistill import topk_distill_loss
    from fastdistill.reference import distill_loss_ref
    from fastdistill.reference.topk_distill_loss import topk_distill_loss_ref

    T, div, tail = spec["temperature"], spec["divergence"], spec["tail"]
    if provider == FULL:
        return lambda s, teacher, lp, ids: distill_loss_ref(s, teacher, divergence=div, temperature=T)
    if provider in ("eager", "compile"):
        fn = lambda s, teacher, lp, ids: topk_distill_loss_ref(s, lp, ids, tail=tail, divergence=div,  # noqa: E731
                                                               temperature=T)
        return torch.compile(fn) if provider == "compile" else fn
    if provider.startswith("fastdistill-"):
        backend = provider.split("-", 1)[1]
        return lambda s, teacher, lp, ids: topk_distill_loss(s, lp, ids, tail=tail, divergence=div, temperature=T,
                                                             backend=backend)
    raise ValueError(f"unknown provider {provider}")


def worker(spec: dict) -> dict:
    """Times every mode of one (provider, tail) in this process: torch.compile compiles once, and
    each mode's peak memory is its own (measured over what is held when its block starts)."""
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (spec["rows"], spec["vocab"])
    student = (torch.randn(shape, generator=gen) * 3).to(device=device, dtype=dtype)
    teacher = (torch.randn(shape, generator=gen) * 3).to(device=device, dtype=dtype)
    lp, ids = torch.log_softmax(teacher.float() / spec["temperature"], -1).topk(spec["k"], -1)
    lp = lp.to(DTYPES[spec["lp_dtype"]])
    if spec["provider"] != FULL:
        teacher = None  # a top-k run holds only the cache's entries
    fn = loss_fn(spec["provider"], spec)
    x = student.clone().requires_grad_(True)
    for _ in range(2 if spec["provider"] == "compile" else 1):  # compile / first-touch outside the measurement
        fn(x, teacher, lp, ids).backward()
    x.grad = None

    def forward():
        x.grad = None
        return fn(x, teacher, lp, ids)

    def full(_):
        forward().backward()

    timed = {"fwd": (lambda _: fn(x, teacher, lp, ids), None), "bwd": (lambda loss: loss.backward(), forward),
             "full": (full, None)}
    out = {}
    for i, mode in enumerate(spec["modes"]):
        call, setup = timed[mode]
        with harness.PeakMemory(device) as peak:  # later modes run warm: no extra warmup call
            times = harness.time_it(call, setup=setup, device=device, warmup=int(i == 0), reps=spec["reps"])
        x.grad = None
        out[mode] = {**harness.summarize(times), "peak_mem_mb": peak.extra / 2**20}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--k", type=int, nargs="+", default=[64])
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--lp-dtype", choices=DTYPES, default="float16", help="dtype of the cached log-probs")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--divergence", default="kl")
    p.add_argument("--tail", nargs="+", default=list(TAILS), choices=TAILS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--providers", nargs="+", help="subset of providers to run")
    p.add_argument("--reps", type=int)
    p.add_argument("--out", help="CSV file name (no directory) under benchmarks/results "
                   "(default topk_distill_loss_<device>)")
    p.add_argument("--csv-dir", help="also write the CSV here")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    gpu = args.device == "cuda"
    rows, vocab = args.rows or (8192 if gpu else 2048), args.vocab or (128256 if gpu else 32000)
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    reps = args.reps or (20 if gpu else 3)
    env = harness.environment(args.device)
    elem = torch.empty((), dtype=DTYPES[dtype]).element_size()
    lp_elem = torch.empty((), dtype=DTYPES[args.lp_dtype]).element_size()
    bandwidth = harness.copy_bandwidth_gbps(args.device, rows * vocab * elem)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {rows} x {vocab} {dtype}, "
          f"k={args.k} ({args.lp_dtype} log-probs, int64 ids), T={args.temperature}, {args.divergence} | "
          f"copy bandwidth {bandwidth:.1f} GB/s", flush=True)

    results = []
    for k in args.k:
        # read the student + the top-k entries, write the gradient
        floor_ms = (2 * rows * vocab * elem + rows * k * (lp_elem + 8)) / (bandwidth * 1e9) * 1e3
        runs = [(FULL, "-")] if not args.providers or FULL in args.providers else []
        runs += [(prov, tail) for tail in args.tail for prov in args.providers or providers(args.device)
                 if prov != FULL]
        for provider, tail in runs:
            # The kernels take milliseconds: more repetitions against page-fault noise (fresh gradient buffers).
            n = reps if args.reps or gpu or not provider.startswith("fastdistill") else 4 * reps
            spec = dict(provider=provider, modes=args.modes, rows=rows, vocab=vocab, k=k, dtype=dtype,
                        lp_dtype=args.lp_dtype, tail=tail, divergence=args.divergence,
                        temperature=args.temperature, device=args.device, reps=n)
            by_mode = harness.run_worker(__file__, spec)
            for mode in args.modes:
                r = by_mode.get(mode, by_mode if "error" in by_mode else {"error": "no result"})
                row = {**env, "op": "topk_distill_loss", "divergence": args.divergence, "tail": tail, "rows": rows,
                       "vocab": vocab, "k": k, "dtype": dtype, "lp_dtype": args.lp_dtype,
                       "temperature": args.temperature, "provider": provider, "mode": mode, **r,
                       "copy_gbps": bandwidth, "floor_ms": floor_ms}
                results.append(row)
                print(f"  k={k:<5} {tail:>11} {provider:>20} {mode:>4}: {harness.describe(r)}", flush=True)

    for row in results:  # ratios within this run
        if "median_ms" not in row:
            continue
        same = {r["provider"]: r for r in results if r["k"] == row["k"] and r["mode"] == row["mode"]
                and r["tail"] in (row["tail"], "-")}
        for ref in (FULL, "eager", "compile"):
            if "median_ms" in same.get(ref, {}):
                row[f"x_{ref}"] = row["median_ms"] / same[ref]["median_ms"]
        if row["mode"] == "full":
            row["x_floor"] = row["median_ms"] / row["floor_ms"]
    harness.finish(args.out or f"topk_distill_loss_{args.device}", results, args.csv_dir,
                   ["k", "tail", "provider", "mode", "median_ms", "peak_mem_mb", f"x_{FULL}", "x_eager", "x_compile",
                    "x_floor"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
