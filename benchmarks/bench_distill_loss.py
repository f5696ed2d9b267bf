"""Benchmark of fastdistill.distill_loss: forward, backward and forward+backward; time and peak memory.

Providers, side by side in one run: the eager reference (fastdistill.reference, fp32 math), the
same under torch.compile, the hand-written PyTorch formula users write (kl only), each fastdistill
backend that runs on the device, and liger-kernel's JSD (log-softmax + LigerJSD) when installed.
The floor is one read of both logits plus one write of the gradient at the copy bandwidth
measured in the same run.

    python benchmarks/bench_distill_loss.py                      # device defaults (CPU: 2048 x 32000 fp32)
    python benchmarks/bench_distill_loss.py --rows 512 --divergence kl jsd tvd
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("fwd", "bwd", "full")


def providers(device: str, divergence: str) -> list[str]:
    out = ["eager", "compile"] + (["torch_formula"] if divergence == "kl" else [])
    out += ["fastdistill-cpu"] if device == "cpu" else ["fastdistill-triton", "fastdistill-cuda"]
    if device == "cuda" and divergence in ("kl", "reverse_kl", "jsd") and harness.liger_installed():
        out.append("liger-jsd")
    return out


def loss_fn(provider: str, spec: dict):
    from fastdistill import distill_loss
    from fastdistill.reference import distill_loss_ref

    T, div = spec["temperature"], spec["divergence"]
    if provider in ("eager", "compile"):
        fn = lambda s, t: distill_loss_ref(s, t, divergence=div, temperature=T)  # noqa: E731
        return torch.compile(fn) if provider == "compile" else fn
    if provider == "torch_formula":
        return lambda s, t: F.kl_div(F.log_softmax(s.float() / T, -1), F.softmax(t.float() / T, -1),
                                     reduction="batchmean") * T * T
    if provider.startswith("fastdistill-"):
        backend = provider.split("-", 1)[1]
        return lambda s, t: distill_loss(s, t, divergence=div, temperature=T, backend=backend)
    if provider == "liger-jsd":
        from liger_kernel.transformers import LigerJSD

        beta = {"kl": 0.0, "reverse_kl": 1.0}.get(div, 0.5)
        jsd = LigerJSD(beta=beta)
        return lambda s, t: jsd(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)) * T * T
    raise ValueError(f"unknown provider {provider}")


def worker(spec: dict) -> dict:
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (spec["rows"], spec["vocab"])
    student = (torch.randn(shape, generator=gen) * 3).to(device=device, dtype=dtype)
    teacher = (torch.randn(shape, generator=gen) * 3).to(device=device, dtype=dtype)
    fn = loss_fn(spec["provider"], spec)
    x = student.clone().requires_grad_(True)
    mode = spec["mode"]
    for _ in range(2):  # compile / autotune / first-touch outside the measured region
        fn(x, teacher).backward()
    x.grad = None
    with harness.PeakMemory(device) as peak:
        if mode == "fwd":
            times = harness.time_it(lambda _: fn(x, teacher), device=device, warmup=1, reps=spec["reps"])
        elif mode == "bwd":
            def forward():
                x.grad = None
                return fn(x, teacher)
            times = harness.time_it(lambda loss: loss.backward(), setup=forward, device=device, warmup=1,
                                    reps=spec["reps"])
        else:
            def full(_):
                x.grad = None
                fn(x, teacher).backward()
            times = harness.time_it(full, device=device, warmup=1, reps=spec["reps"])
    return {**harness.summarize(times), "peak_mem_mb": peak.extra / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--divergence", nargs="+")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--providers", nargs="+", help="subset of providers to run")
    p.add_argument("--reps", type=int)
    p.add_argument("--out", help="CSV name under benchmarks/results (default distill_loss_<device>)")
    p.add_argument("--csv-dir", help="also write the CSV here")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    gpu = args.device == "cuda"
    rows, vocab = args.rows or (8192 if gpu else 2048), args.vocab or (128256 if gpu else 32000)
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    divergences = args.divergence or (["kl", "jsd"] if gpu else ["kl"])
    reps = args.reps or (20 if gpu else 5)
    env = harness.environment(args.device)
    elem = torch.empty((), dtype=DTYPES[dtype]).element_size()
    io_bytes = 3 * rows * vocab * elem  # read student + teacher, write the gradient
    bandwidth = harness.copy_bandwidth_gbps(args.device, rows * vocab * elem)
    floor_ms = io_bytes / (bandwidth * 1e9) * 1e3
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {rows} x {vocab} {dtype}, "
          f"T={args.temperature} | copy bandwidth {bandwidth:.1f} GB/s -> floor {floor_ms:.2f} ms", flush=True)

    results = []
    for div in divergences:
        for provider in args.providers or providers(args.device, div):
            for mode in args.modes:
                spec = dict(provider=provider, mode=mode, rows=rows, vocab=vocab, dtype=dtype, divergence=div,
                            temperature=args.temperature, device=args.device, reps=reps)
                r = harness.run_worker(__file__, spec)
                row = {**env, "op": "distill_loss", "divergence": div, "rows": rows, "vocab": vocab, "dtype": dtype,
                       "temperature": args.temperature, "provider": provider, "mode": mode, **r,
                       "copy_gbps": bandwidth, "floor_ms": floor_ms}
                results.append(row)
                print(f"  {div:>10} {provider:>20} {mode:>4}: {harness.describe(r)}", flush=True)

    for row in results:  # ratios within this run
        same = {r["provider"]: r for r in results if r["divergence"] == row["divergence"] and r["mode"] == row["mode"]}
        if "median_ms" not in row:
            continue
        for ref in ("eager", "compile"):
            if "median_ms" in same.get(ref, {}):
                row[f"x_{ref}"] = row["median_ms"] / same[ref]["median_ms"]
        if row["mode"] == "full":
            row["x_floor"] = row["median_ms"] / floor_ms
    harness.finish(args.out or f"distill_loss_{args.device}", results, args.csv_dir,
                   ["divergence", "provider", "mode", "median_ms", "peak_mem_mb", "x_eager", "x_compile", "x_floor"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
