"""Which cached teacher target should an offline distillation run store? An experiment at equal bytes.

The tiny LM of examples/distill_tiny_lm.py: a fixed teacher (random init, lm_head sharpened ×8) and one
student initialisation per seed; the student trains for the same steps, data, batches and optimizer with
each target, read from a cache built once (as fastdistill.TeacherCache builds it):
  full              distill_loss (KL) on the teacher's full logits, stored fp16: V × 2 bytes/token (upper bound)
  topk-renormalize  topk_distill_loss, tail="renormalize", on the teacher's top-k log-probs (fp16) + ids (int32)
  topk-bucket       topk_distill_loss, tail="bucket" (the mass outside the top k is one "rest" category)
  sampled           sampled_distill_loss on k draws per position from the teacher (RS-KD, estimator "counts",
                    fastdistill.cache.sampling), drawn ONCE per position with the cache's seeded generator
                    (sequence_seed(seed, sequence)), log-probs fp16 + ids int32
  ce                plain cross-entropy on the data's next tokens (no teacher), for scale
Every sparse target stores k × (fp16 + int32) = 6k bytes per token. After training: held-out
KL(teacher ‖ student) over the full vocabulary and top-1 agreement, mean ± std over seeds (student init and
sampling seed change together), and the time per training step (and of the loss call) of each target.

    python benchmarks/bench_offline_targets.py                  # V 4096, k 4 16 64, 3 seeds
    python benchmarks/bench_offline_targets.py --quick          # smoke test, a few seconds
Writes benchmarks/results/offline_targets_cpu.csv and docs/offline_targets.png; prints a markdown table.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import harness  # noqa: E402

import fastdistill  # noqa: E402
from fastdistill import dispatch  # noqa: E402
from fastdistill.cache.sampling import sample_teacher_targets, sequence_seed  # noqa: E402

TARGETS = ("full", "topk-renormalize", "topk-bucket", "sampled", "ce")
SPARSE = ("topk-renormalize", "topk-bucket", "sampled")
OPS = {"full": "distill_loss", "topk-renormalize": "topk_distill_loss", "topk-bucket": "topk_distill_loss",
       "sampled": "sampled_distill_loss", "ce": None}
CSV_NAME = "offline_targets_cpu"
SEQ = 32  # the example's sequence length (its TinyLM has max_len 64)


def load_tiny_lm():
    """TinyLM from examples/distill_tiny_lm.py (imported, not copied)."""
    spec = importlib.util.spec_from_file_location("distill_tiny_lm", os.path.join(ROOT, "examples",
                                                                                  "distill_tiny_lm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TinyLM


def bytes_per_token(target: str, k: int, vocab: int) -> int:
    if target == "full":
        return 2 * vocab  # fp16 logits
    if target == "ce":
        return 0  # the labels are the data itself
    return 6 * k  # fp16 value + int32 id per slot


@torch.no_grad()
def build_cache(teacher, data, ks, seeds, batch):
    """What a cache stores per training position: fp16 full logits, the top-max(k) fp16 log-probs and int32
    ids (a top-k cache with smaller k holds the first k of them), and per (seed, k) one set of k draws,
    drawn per sequence with a generator seeded by sequence_seed(seed, sequence) and then frozen."""
    full, top_lp, top_ids = [], [], []
    sampled = {(s, k): ([], []) for s in seeds for k in ks}
    kmax = max(ks)
    for start in range(0, len(data), batch):
        logits = teacher(data[start:start + batch]).float()
        full.append(logits.half())
        lp, ids = torch.log_softmax(logits, -1).topk(kmax, dim=-1)
        top_lp.append(lp.half())
        top_ids.append(ids.int())
        for (s, k), (lps, idss) in sampled.items():
            for i in range(logits.shape[0]):
                gen = torch.Generator().manual_seed(sequence_seed(s, start + i))
                slp, sids = sample_teacher_targets(logits[i], k, generator=gen)
                lps.append(slp.half())
                idss.append(sids.int())
    return {"full": torch.cat(full), "topk": (torch.cat(top_lp), torch.cat(top_ids)),
            "sampled": {key: (torch.stack(v[0]), torch.stack(v[1])) for key, v in sampled.items()}}


def make_loss(target, k, seed, cache):
    """loss(student_logits, batch_slice, ids) for one target; every fastdistill loss with backend="auto"."""
    if target == "full":
        teacher = cache["full"]
        return lambda z, sl, ids: fastdistill.distill_loss(z, teacher[sl].float(), backend="auto")
    if target.startswith("topk-"):
        lp, idx = cache["topk"]
        tail = target.split("-", 1)[1]
        return lambda z, sl, ids: fastdistill.topk_distill_loss(z, lp[sl, :, :k], idx[sl, :, :k], tail=tail,
                                                                backend="auto")
    if target == "sampled":
        lp, idx = cache["sampled"][(seed, k)]
        return lambda z, sl, ids: fastdistill.sampled_distill_loss(z, lp[sl], idx[sl], backend="auto")
    if target == "ce":  # next-token labels; the last position has none
        def ce(z, sl, ids):
            labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
            return F.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return ce
    raise ValueError(f"target: unknown {target!r}")


def backend_of(target: str) -> str:
    op = OPS[target]
    if op is None:
        return "aten"
    lp_dtype = torch.float32 if target == "full" else torch.float16
    return dispatch.select(op, "auto", torch.device("cpu"), (torch.float32, lp_dtype))


@torch.no_grad()
def evaluate(teacher_logits, student, heldout):
    z = student(heldout).float()
    kl = fastdistill.distill_loss(z, teacher_logits, backend="reference").item()
    top1 = (z.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()
    return kl, top1


def new_student(TinyLM, args, seed):
    torch.manual_seed(1 + seed)  # the student initialisation of this seed, the same for every target
    student = TinyLM(args.vocab, dim=48, layers=2, heads=4)
    return student, torch.optim.AdamW(student.parameters(), lr=args.lr)


def one_step(student, opt, loss_fn, data, step, batch):
    """One training step on the step-th batch: (loss, step ms, ms of the loss call alone)."""
    start = (step * batch) % len(data)
    sl = slice(start, start + batch)
    ids = data[sl]
    t0 = time.perf_counter()
    z = student(ids)
    t1 = time.perf_counter()
    loss = loss_fn(z, sl, ids)
    t2 = time.perf_counter()
    opt.zero_grad()
    loss.backward()
    opt.step()
    t3 = time.perf_counter()
    return loss, (t3 - t0) * 1e3, (t2 - t1) * 1e3


def train(TinyLM, args, target, k, seed, cache, data, heldout, teacher_logits):
    student, opt = new_student(TinyLM, args, seed)
    loss_fn = make_loss(target, k, seed, cache)
    step_ms = []
    for step in range(args.steps):
        loss, ms, _ = one_step(student, opt, loss_fn, data, step, args.batch)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{target} k={k} seed={seed}: non-finite loss at step {step}")
        step_ms.append(ms)
    kl, top1 = evaluate(teacher_logits, student, heldout)
    warm = min(3, args.steps - 1)  # the first steps allocate and warm caches
    return {"heldout_kl": kl, "top1_agreement": top1, "final_train_loss": loss.item(),
            "train_step_ms": statistics.median(step_ms[warm:])}


def time_steps(TinyLM, args, cache, data) -> dict:
    """Median step and loss-call ms of every (target, k), measured round-robin: each round runs one step of
    every target, in an order rotated per round, so load from other processes falls on all of them alike."""
    setups = []
    for target, k in runs(args):
        student, opt = new_student(TinyLM, args, args.seeds[0])
        setups.append(((target, k), student, opt, make_loss(target, k, args.seeds[0], cache)))
    times = {key: ([], []) for key, *_ in setups}
    warm = 2
    for r in range(args.timing_rounds + warm):
        shift = r % len(setups)
        for key, student, opt, loss_fn in setups[shift:] + setups[:shift]:
            _, step_ms, loss_ms = one_step(student, opt, loss_fn, data, r, args.batch)
            if r >= warm:
                times[key][0].append(step_ms)
                times[key][1].append(loss_ms)
    return {key: {"step_ms": statistics.median(a), "loss_ms": statistics.median(b)} for key, (a, b) in times.items()}


def runs(args):
    """(target, k) pairs: full and ce do not depend on k."""
    out = []
    for target in args.targets:
        if target in SPARSE:
            out += [(target, k) for k in args.k]
        else:
            out.append((target, None))
    return out


def mean_rows(rows, env, timing):
    means = []
    for target, k in dict.fromkeys((r["target"], r["k"]) for r in rows):
        group = [r for r in rows if r["target"] == target and r["k"] == k]
        keys = ("target", "k", "bytes_per_token", "backend", "threads", "vocab", "steps", "batch", "seq", "lr")
        m = {key: group[0][key] for key in keys}
        m.update(env, seed="mean", n_seeds=len(group))
        for key in ("heldout_kl", "top1_agreement", "train_step_ms"):
            vals = [r[key] for r in group]
            m[key] = statistics.fmean(vals)
            m[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        m.update(timing[(target, k)])
        means.append(m)
    ce = next((m for m in means if m["target"] == "ce"), None)
    for m in means:
        m["step_x_ce"] = m["step_ms"] / ce["step_ms"] if ce else None
    return means


def markdown_table(means, init_kl, args) -> str:
    lines = [f"Held-out KL(teacher ‖ student) and top-1 agreement after {args.steps} steps "
             f"(V {args.vocab}, mean ± std over {len(args.seeds)} seeds; untrained student: KL {init_kl:.3f})",
             "",
             "| target | k | bytes/token | held-out KL ↓ | top-1 agreement ↑ | step ms | × ce step | loss ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in means:
        x = "" if m["step_x_ce"] is None else f"{m['step_x_ce']:.2f}"
        lines.append(f"| {m['target']} | {m['k'] if m['k'] is not None else '-'} | {m['bytes_per_token']} | "
                     f"{m['heldout_kl']:.3f} ± {m['heldout_kl_std']:.3f} | "
                     f"{m['top1_agreement']:.3f} ± {m['top1_agreement_std']:.3f} | {m['step_ms']:.1f} | {x} | "
                     f"{m['loss_ms']:.2f} |")
    return "\n".join(lines)


def plot(means, init_kl, path, args) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"topk-renormalize": ("tab:orange", "s"), "topk-bucket": ("tab:green", "^"),
              "sampled": ("tab:blue", "o"), "full": ("black", "*")}
    for ax, key, label in ((axes[0], "heldout_kl", "held-out KL(teacher ‖ student)"),
                           (axes[1], "top1_agreement", "held-out top-1 agreement")):
        for target, (color, marker) in styles.items():
            pts = sorted((m for m in means if m["target"] == target), key=lambda m: m["bytes_per_token"])
            if pts:
                ax.errorbar([m["bytes_per_token"] for m in pts], [m[key] for m in pts],
                            yerr=[m[f"{key}_std"] for m in pts], color=color, marker=marker, capsize=3,
                            label=target if target != "full" else f"full logits (fp16, V={args.vocab})",
                            markersize=10 if marker == "*" else 6)
        if key == "heldout_kl":
            ax.axhline(init_kl, color="gray", linestyle="--", linewidth=0.8, label="untrained student")
        ax.set_xscale("log")
        ticks = sorted({m["bytes_per_token"] for m in means if m["target"] in styles})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("cache bytes per token (sparse: k × (fp16 + int32))")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    sparse_ks = sorted({m["k"] for m in means if m["k"] is not None})
    axes[0].set_title(f"lower is better; k = {', '.join(map(str, sparse_ks))}", fontsize=10)
    axes[1].set_title(f"higher is better; {args.steps} steps, {len(args.seeds)} seeds", fontsize=10)
    fig.suptitle("Offline distillation of a tiny LM: which cached teacher target (equal bytes per token)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--k", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--train-seqs", type=int, default=2048, help="distinct training sequences (400 steps: ~3 epochs)")
    p.add_argument("--heldout-seqs", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: a step is small, and on a shared CPU 2 threads time erratically)")
    p.add_argument("--timing-rounds", type=int, default=40, help="round-robin steps per target for the timings")
    p.add_argument("--quick", action="store_true", help="smoke test: V 512, 6 steps, 1 seed, k 4 8")
    p.add_argument("--csv-dir", default=harness.RESULTS)
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "offline_targets.png"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.k, args.vocab = 6, [0], [4, 8], 512
        args.train_seqs, args.heldout_seqs, args.batch, args.timing_rounds = 32, 8, 8, 3
    for name in ("steps", "batch", "train_seqs", "heldout_seqs", "vocab", "threads", "timing_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected >= 1")
    if any(not 1 <= k <= args.vocab for k in args.k):
        p.error(f"--k: expected values in [1, --vocab = {args.vocab}]")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    TinyLM = load_tiny_lm()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    load_start = os.getloadavg()[0]
    torch.manual_seed(0)
    teacher = TinyLM(args.vocab, dim=128, layers=4, heads=4, head_scale=8.0).eval()
    gen = torch.Generator().manual_seed(12345)
    data = torch.randint(0, args.vocab, (args.train_seqs, SEQ), generator=gen)
    heldout = torch.randint(0, args.vocab, (args.heldout_seqs, SEQ), generator=gen)
    with torch.no_grad():
        teacher_logits = teacher(heldout).float()
    ks = args.k if any(t in SPARSE for t in args.targets) else [1]
    cache = build_cache(teacher, data, ks, args.seeds if "sampled" in args.targets else [], args.batch)
    print(f"cache built in {time.perf_counter() - t_start:.1f} s ({args.train_seqs} × {SEQ} positions)")
    env = harness.environment("cpu")
    rows, init = [], []
    for seed in args.seeds:
        torch.manual_seed(1 + seed)
        init.append(evaluate(teacher_logits, TinyLM(args.vocab, dim=48, layers=2, heads=4), heldout)[0])
        for target, k in runs(args):
            t0 = time.perf_counter()
            result = train(TinyLM, args, target, k, seed, cache, data, heldout, teacher_logits)
            row = dict(env, target=target, k=k, seed=seed, bytes_per_token=bytes_per_token(target, k, args.vocab),
                       backend=backend_of(target), threads=args.threads, vocab=args.vocab, steps=args.steps,
                       batch=args.batch, seq=SEQ, lr=args.lr, **result, train_s=time.perf_counter() - t0,
                       loadavg_1m=os.getloadavg()[0])
            rows.append(row)
            print(f"seed {seed} {target:>16} k={k if k else '-':>3}: KL {result['heldout_kl']:.4f}  "
                  f"top-1 {result['top1_agreement']:.3f}  step {result['train_step_ms']:.1f} ms  "
                  f"({row['train_s']:.1f} s, load {row['loadavg_1m']:.2f})", flush=True)
    timing = time_steps(TinyLM, args, cache, data)
    means = mean_rows(rows, env, timing)
    init_kl = statistics.fmean(init)
    path = harness.write_csv(CSV_NAME, rows + means, args.csv_dir)
    plot(means, init_kl, args.plot, args)
    total = time.perf_counter() - t_start
    table = markdown_table(means, init_kl, args)
    print(f"\nwrote {path} and {args.plot}; {total:.0f} s total ({time.process_time() - cpu_start:.0f} s of CPU time, "
          f"{args.threads} thread(s)), 1-min load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at "
          f"the end\n")
    print(table)
    return {"rows": rows, "means": means, "init_kl": init_kl, "csv": path, "plot": args.plot, "table": table,
            "seconds": total}


if __name__ == "__main__":
    main()
