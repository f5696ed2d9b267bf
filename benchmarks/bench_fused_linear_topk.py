"""Benchmark of fastdistill.fused_linear_topk_distill_loss (and --kind sampled: fused_linear_sampled_distill_loss):
time and peak extra memory of forward + backward.

Providers, side by side and interleaved (--rounds: every provider once per round, each run in a fresh
subprocess): "materialized" (the student's full logits via F.linear, then the unfused loss on its best
backend: what users write without the fused op), "compile" (torch.compile of the materialized version with
the reference loss), and each fastdistill backend of the fused op that runs on the device. The teacher's
targets are fp16 (as a cache stores them). The floor is the matmul FLOPs (forward logits, d(hidden),
d(weight): 3 x 2·N·H·V) at the GEMM rate measured in the same run on a [tokens, H] x [H, V] matmul.

    python benchmarks/bench_fused_linear_topk.py     # CPU: 2048 tokens, H 1024, V 32000, fp32, k 64
    python benchmarks/bench_fused_linear_topk.py --device cuda --tokens 8192 --hidden 4096 --vocab 128256 \\
        --dtype bfloat16 --rounds 1
    python benchmarks/bench_fused_linear_topk.py --providers materialized fastdistill-cpu@80 fastdistill-cpu@320
        # a fused provider with "@<rows>" runs that chunk size (the auto size otherwise, or --chunk-size)
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


def providers(device: str) -> list[str]:
    fused = ["fastdistill-cpu"] if device == "cpu" else ["fastdistill-triton", "fastdistill-cuda"]
    return ["materialized", "compile"] + fused + ["fastdistill-reference"]


def loss_fn(provider: str, spec: dict):
    import torch.nn.functional as F

    from fastdistill.ops.fused_linear_sampled_distill_loss import fused_linear_sampled_distill_loss
    from fastdistill.ops.fused_linear_topk_distill_loss import fused_linear_topk_distill_loss
    from fastdistill.ops.sampled_distill_loss import sampled_distill_loss
    from fastdistill.ops.topk_distill_loss import topk_distill_loss
    from fastdistill.reference.sampled_distill_loss import sampled_distill_loss_ref
    from fastdistill.reference.topk_distill_loss import topk_distill_loss_ref

    T, topk = spec["temperature"], spec["kind"] == "topk"
    opts = dict(tail=spec["tail"], divergence=spec["divergence"], temperature=T) if topk else dict(temperature=T)
    if provider == "materialized":
        loss = topk_distill_loss if topk else sampled_distill_loss
        return lambda h, w, lp, ids: loss(F.linear(h, w), lp, ids, **opts)
    if provider == "compile":
        ref = topk_distill_loss_ref if topk else sampled_distill_loss_ref
        return torch.compile(lambda h, w, lp, ids: ref(F.linear(h, w), lp, ids, **opts))
    if provider.startswith("fastdistill-"):
        fused = fused_linear_topk_distill_loss if topk else fused_linear_sampled_distill_loss
        backend, _, rows = provider.split("-", 1)[1].partition("@")  # fastdistill-cpu@160: 160-row chunks
        chunk = int(rows) if rows else spec.get("chunk_size")
        return lambda h, w, lp, ids: fused(h, w, lp, ids, backend=backend, chunk_size=chunk, **opts)
    raise ValueError(f"unknown provider {provider}")


def targets(spec: dict, device: str):
    """fp16 top-k log-probs (or k sorted draws) of a random teacher at temperature T, and their ids."""
    from fastdistill.cache.sampling import sample_teacher_targets

    gen = torch.Generator(device="cpu").manual_seed(1)
    rows, ids = [], []
    for start in range(0, spec["tokens"], 1024):  # 1024 rows of teacher logits at a time
        teacher = torch.randn(min(1024, spec["tokens"] - start), spec["vocab"], generator=gen) * 2
        if spec["kind"] == "topk":
            lp, i = torch.log_softmax(teacher / spec["temperature"], -1).topk(spec["k"], -1)
        else:
            lp, i = sample_teacher_targets(teacher, spec["k"], spec["temperature"], generator=gen)
        rows.append(lp.half())
        ids.append(i.int())
    return torch.cat(rows).to(device), torch.cat(ids).to(device)


def gemm_tflops(device: str, dtype: torch.dtype, m: int, k: int, n: int) -> float:
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(n, k, device=device, dtype=dtype)
    times = harness.time_it(lambda _: a @ b.t(), device=device, warmup=2, reps=5)
    return 2 * m * k * n / (statistics.median(times) * 1e-3) / 1e12


def worker(spec: dict) -> dict:
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    n, h, v = spec["tokens"], spec["hidden"], spec["vocab"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    hs = (torch.randn(n, h, generator=gen)).to(device=device, dtype=dtype).requires_grad_(True)
    ws = (torch.randn(v, h, generator=gen) * 3 * h ** -0.5).to(device=device, dtype=dtype).requires_grad_(True)
    lp, ids = targets(spec, device)
    fn = loss_fn(spec["provider"], spec)
    for _ in range(2):  # compile / first touch outside the measured region
        fn(hs, ws, lp, ids).backward()
    hs.grad = ws.grad = None  # the measured peak includes the gradients each provider allocates

    def full(_):
        hs.grad = ws.grad = None
        fn(hs, ws, lp, ids).backward()
    with harness.PeakMemory(device) as peak:
        times = harness.time_it(full, device=device, warmup=1, reps=spec["reps"])
    return {"times": times, "peak_mem_mb": peak.extra / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kind", choices=("topk", "sampled"), default="topk")
    p.add_argument("--tokens", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--tail", default="renormalize")
    p.add_argument("--divergence", default="kl")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--providers", nargs="+")
    p.add_argument("--chunk-size", type=int, help="rows per chunk of the fused providers (default: auto)")
    p.add_argument("--reps", type=int)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every provider")
    p.add_argument("--out", help="CSV name under benchmarks/results (default fused_linear_<kind>_<device>)")
    p.add_argument("--csv-dir", help="also write the CSV here")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    gpu = args.device == "cuda"
    tokens, hidden = args.tokens or (8192 if gpu else 2048), args.hidden or (4096 if gpu else 1024)
    vocab, dtype = args.vocab or (128256 if gpu else 32000), args.dtype or ("bfloat16" if gpu else "float32")
    env = harness.environment(args.device)
    rate = gemm_tflops(args.device, DTYPES[dtype], tokens, hidden, vocab)
    floor_ms = 3 * 2 * tokens * hidden * vocab / rate / 1e9
    print(f"{env['device']} | torch {env['torch']} | {args.kind} k {args.k}, {tokens} tokens, H {hidden}, V {vocab} "
          f"{dtype} | GEMM {rate:.2f} TFLOP/s -> floor fwd+bwd {floor_ms:.1f} ms", flush=True)
    names = args.providers or providers(args.device)
    runs = {name: [] for name in names}
    for r in range(args.rounds):
        for provider in names:  # interleaved: machine load hits every provider alike
            spec = dict(provider=provider, kind=args.kind, tokens=tokens, hidden=hidden, vocab=vocab, k=args.k,
                        dtype=dtype, tail=args.tail, divergence=args.divergence, temperature=args.temperature,
                        device=args.device, reps=args.reps or (10 if gpu else 3), chunk_size=args.chunk_size)
            res = harness.run_worker(__file__, spec)
            runs[provider].append(res)
            shown = res if "error" in res else {**harness.summarize(res["times"]), **res}
            print(f"  round {r + 1} {provider:>22}: {harness.describe(shown)}", flush=True)
    results = []
    for provider, rs in runs.items():
        row = {**env, "op": f"fused_linear_{args.kind}_distill_loss", "kind": args.kind, "k": args.k,
               "tail": args.tail if args.kind == "topk" else "", "divergence": args.divergence, "tokens": tokens,
               "hidden": hidden, "vocab": vocab, "dtype": dtype, "provider": provider, "mode": "full",
               "chunk_size": args.chunk_size or "auto", "rounds": args.rounds}
        ok = [r for r in rs if "error" not in r]
        if not ok:
            row["error"] = rs[-1]["error"]
        else:  # all timed reps of all rounds; the largest peak of any round
            row.update(harness.summarize([t for r in ok for t in r["times"]]),
                       peak_mem_mb=max(r["peak_mem_mb"] for r in ok))
        results.append({**row, "gemm_tflops": rate, "floor_ms": floor_ms})
    base = next((r for r in results if r["provider"] == "materialized" and "median_ms" in r), None)
    for row in results:  # ratios within this run
        if "median_ms" not in row:
            continue
        if base is not None:
            row["x_materialized_time"] = row["median_ms"] / base["median_ms"]
            row["x_materialized_mem"] = row["peak_mem_mb"] / max(base["peak_mem_mb"], 1e-9)
            # Paired by round (each round's median over materialized's in the same round): robust to load
            # that changes between rounds on a shared machine.
            pairs = [statistics.median(a["times"]) / statistics.median(b["times"])
                     for a, b in zip(runs[row["provider"]], runs["materialized"]) if "times" in a and "times" in b]
            row["x_materialized_time_paired"] = statistics.median(pairs) if pairs else None
        row["x_floor"] = row["median_ms"] / row["floor_ms"]
    harness.finish(args.out or f"fused_linear_{args.kind}_{args.device}", results, args.csv_dir,
                   ["provider", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "x_materialized_time",
                    "x_materialized_time_paired", "x_materialized_mem", "x_floor"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
