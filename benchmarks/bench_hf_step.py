"""Benchmark of one Hugging Face distillation training step: time and peak extra memory.

One step = teacher forward (no_grad, eval mode) + student forward + loss + backward, on HF
LlamaForCausalLM models built from random configs (no download). Providers, side by side in one run:
  fused     fastdistill.hf.causal_lm_distill_loss: final hidden states + lm_head weights into
            fused_linear_distill_loss; no [tokens, V] logits tensor is materialized
  hf-logits what users write by hand: both models' logits, F.log_softmax of each, F.kl_div over the
            non-padding target tokens (KL(teacher || student), temperature 1)
Each measurement runs in its own subprocess (benchmarks/harness.py): the peak is the resident set
(CPU) or the caching allocator's peak (CUDA) over what the models and inputs already held, so it
includes activations, logits and the student's gradients.

    python benchmarks/bench_hf_step.py     # CPU: 4096 tokens (8 x 512), V 32000, fp32, student H 256, teacher H 512
    python benchmarks/bench_hf_step.py --device cuda --dtype bfloat16 --batch 8 --seq 1024 --vocab 128256 \
        --h-s 2048 --h-t 4096 --out hf_step_cuda      # GPU: 8192 tokens, V 128256, bf16
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
PROVIDERS = ("fused", "hf-logits")


def build_model(hidden: int, layers: int, vocab: int, seq: int, seed: int, device: str, dtype: torch.dtype):
    """A random-init LlamaForCausalLM, created on `device` (a GPU initializes the 128k-vocabulary heads in
    seconds, a CPU in tens of seconds) and then cast to `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64 or 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=seq, tie_word_embeddings=False)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype)


def hf_logits_kl(student, teacher, input_ids, attention_mask):
    """The hand-written baseline: full logits of both models, log_softmax, kl_div over target tokens."""
    import torch.nn.functional as F

    with torch.no_grad():
        t_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    s_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    keep = attention_mask[:, 1:].bool()
    s_logp = F.log_softmax(s_logits[keep].float(), dim=-1)
    t_logp = F.log_softmax(t_logits[keep].float(), dim=-1)
    return F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")


def worker(spec: dict) -> dict:
    from fastdistill.hf import causal_lm_distill_loss

    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    b, n, v = spec["batch"], spec["seq"], spec["vocab"]
    student = build_model(spec["h_s"], spec["layers"], v, n, seed=0, device=device, dtype=dtype).train()
    teacher = build_model(spec["h_t"], spec["layers"], v, n, seed=1, device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, v, (b, n), generator=gen).to(device)
    attention_mask = torch.ones(b, n, dtype=torch.long)
    attention_mask[0, n - n // 8:] = 0  # one right-padded row: the mask path is part of the step
    attention_mask = attention_mask.to(device)
    if spec["provider"] == "fused":
        def loss_fn():
            return causal_lm_distill_loss(student, teacher, input_ids, attention_mask)
    else:
        def loss_fn():
            return hf_logits_kl(student, teacher, input_ids, attention_mask)

    def step(_):
        student.zero_grad(set_to_none=True)
        loss_fn().backward()
    step(None)  # first touch outside the measured region; the gradients it made are freed next
    student.zero_grad(set_to_none=True)
    with harness.PeakMemory(device) as peak:
        times = harness.time_it(step, device=device, warmup=1, reps=spec["reps"])
    return {**harness.summarize(times), "peak_mem_mb": peak.extra / 2**20, "loss": float(loss_fn().detach())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--h-s", type=int, default=256, help="student hidden size")
    p.add_argument("--h-t", type=int, default=512, help="teacher hidden size")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of each model")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", help="CSV name under benchmarks/results (default hf_step_<device>)")
    p.add_argument("--csv-dir", help="also write the CSV here")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    env = harness.environment(args.device)
    tokens = args.batch * args.seq
    print(f"{env['device']} | torch {env['torch']} | {args.batch} x {args.seq} = {tokens} tokens, V {args.vocab}, "
          f"{args.dtype}, student H {args.h_s} / teacher H {args.h_t}, {args.layers} layers each", flush=True)
    results = []
    for provider in args.providers:
        spec = dict(provider=provider, device=args.device, dtype=args.dtype, batch=args.batch, seq=args.seq,
                    vocab=args.vocab, h_s=args.h_s, h_t=args.h_t, layers=args.layers, reps=args.reps)
        r = harness.run_worker(__file__, spec)
        results.append({**env, "op": "hf_distill_step", "tokens": tokens, "batch": args.batch, "seq": args.seq,
                        "vocab": args.vocab, "dtype": args.dtype, "h_s": args.h_s, "h_t": args.h_t,
                        "layers": args.layers, "provider": provider, "mode": "full", **r})
        print(f"  {provider:>10}: {harness.describe(r)}", flush=True)
    base = next((r for r in results if r["provider"] == "hf-logits" and "median_ms" in r), None)
    for row in results:  # ratios within this run
        if base and "median_ms" in row:
            row["x_hf_time"] = row["median_ms"] / base["median_ms"]
            row["x_hf_mem"] = row["peak_mem_mb"] / max(base["peak_mem_mb"], 1e-9)
    harness.finish(args.out or f"hf_step_{args.device}", results, args.csv_dir,
                   ["tokens", "vocab", "provider", "median_ms", "peak_mem_mb", "loss", "x_hf_time", "x_hf_mem"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
