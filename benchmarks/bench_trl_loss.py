"""TRL's distillation losses vs fastdistill.hf.trl's: time and peak extra memory of loss + backward.

The same problem for every provider: student and teacher final hidden states [tokens, H] and output heads
[V, H], TRL's generalized JSD with `beta` at `temperature`, every token in the completion mask, gradients
to the student's hidden states and head weight. Providers, side by side in one run, each in its own
subprocess (benchmarks/harness.py: RSS-sampled peak on CPU, allocator peak on CUDA):

    trl-gkd-logits         GKDTrainer.generalized_jsd_loss on materialized logits (what GKDTrainer does;
                           the teacher's logits under no_grad)
    trl-chunked            trl.trainer.distillation_trainer._chunked_divergence_loss (DistillationTrainer's
                           loss: Triton tiles on GPU, [4096, 32768] float32 torch tiles elsewhere)
    fastdistill            fastdistill.hf.trl.fused_chunked_divergence_loss (FastDistill*Trainer's loss)
                           with log_entropy=False
    fastdistill+entropy    the same with the entropy metric DistillationTrainer logs (the trainer's default)

    python benchmarks/bench_trl_loss.py          # CPU: 4096 tokens, H 1024, V 32000 fp32, beta 0.5, T 2
    python benchmarks/bench_trl_loss.py --device cuda --tokens 8192 --vocab 128256 --dtype bfloat16
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
PROVIDERS = ("trl-gkd-logits", "trl-chunked", "fastdistill", "fastdistill+entropy")


def loss_fn(provider: str, beta: float, temperature: float, backend: str):
    """fn(hs, ws, ht, wt, mask) -> scalar loss, mean over the masked tokens."""
    if provider == "trl-gkd-logits":
        from trl.experimental.gkd import GKDTrainer

        def fn(hs, ws, ht, wt, mask):
            with torch.no_grad():
                teacher = ht @ wt.t()
            labels = torch.where(mask != 0, 0, -100)
            return GKDTrainer.generalized_jsd_loss(hs @ ws.t(), teacher, labels, beta=beta, temperature=temperature)
        return fn
    if provider == "trl-chunked":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        return lambda hs, ws, ht, wt, mask: _chunked_divergence_loss(hs, ht, ws, wt, mask, beta,
                                                                     temperature=temperature)[0]
    if provider.startswith("fastdistill"):
        from fastdistill.hf.trl import fused_chunked_divergence_loss

        entropy = provider.endswith("+entropy")
        return lambda hs, ws, ht, wt, mask: fused_chunked_divergence_loss(
            hs, ht, ws, wt, mask, beta, temperature=temperature, backend=backend, log_entropy=entropy)[0]
    raise ValueError(f"unknown provider {provider}")


def worker(spec: dict) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    n, h, v = spec["tokens"], spec["hidden"], spec["vocab"]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)
    hs, ht = rand(n, h, scale=1.0).requires_grad_(True), rand(n, h, scale=1.0)
    ws, wt = rand(v, h, scale=3 * h ** -0.5).requires_grad_(True), rand(v, h, scale=3 * h ** -0.5)
    mask = torch.ones(n, dtype=torch.long, device=device)
    fn = loss_fn(spec["provider"], spec["beta"], spec["temperature"], spec["backend"])
    loss = fn(hs, ws, ht, wt, mask)  # first touch (imports, allocator) outside the measured region
    loss.backward()
    hs.grad = ws.grad = None  # the measured peak includes the gradients each provider allocates

    def full(_):
        hs.grad = ws.grad = None
        fn(hs, ws, ht, wt, mask).backward()
    with harness.PeakMemory(device) as peak:
        times = harness.time_it(full, device=device, warmup=0, reps=spec["reps"])
    return {**harness.summarize(times), "peak_mem_mb": peak.extra / 2**20, "loss": float(loss)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", help="CSV name under benchmarks/results (default trl_loss_<device>)")
    p.add_argument("--csv-dir", help="also write the CSV here")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    from importlib.metadata import version

    env = {**harness.environment(args.device), "trl": version("trl"), "transformers": version("transformers")}
    backend = "cpu" if args.device == "cpu" else "auto"
    print(f"{env['device']} | torch {env['torch']} | trl {env['trl']} | {args.tokens} tokens, H {args.hidden}, "
          f"V {args.vocab} {args.dtype}, beta {args.beta}, T {args.temperature}, loss + backward", flush=True)
    results = []
    for provider in args.providers:
        spec = dict(provider=provider, tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype,
                    beta=args.beta, temperature=args.temperature, device=args.device, reps=args.reps,
                    backend=backend)
        r = harness.run_worker(__file__, spec)
        results.append({**env, "op": "trl_distillation_loss", "tokens": args.tokens, "hidden": args.hidden,
                        "vocab": args.vocab, "dtype": args.dtype, "beta": args.beta,
                        "temperature": args.temperature, "provider": provider, "mode": "full", **r})
        print(f"  {provider:>20}: {harness.describe(r)}", flush=True)
    base = {r["provider"]: r for r in results if "median_ms" in r}
    for row in results:  # ratios within this run
        for ref in ("trl-gkd-logits", "trl-chunked"):
            if "median_ms" in row and ref in base:
                row[f"x_{ref}_time"] = row["median_ms"] / base[ref]["median_ms"]
                row[f"x_{ref}_mem"] = row["peak_mem_mb"] / max(base[ref]["peak_mem_mb"], 1e-9)
    harness.finish(args.out or f"trl_loss_{args.device}", results, args.csv_dir,
                   ["provider", "median_ms", "peak_mem_mb", "loss", "x_trl-gkd-logits_time", "x_trl-gkd-logits_mem",
                    "x_trl-chunked_time", "x_trl-chunked_mem"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
