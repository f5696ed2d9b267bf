"""Teacher cache build cost on this machine: tokens/s of TeacherCache.build with top-k vs sampled targets,
and bytes per token on disk, measured from the shard files (file sizes / tokens).

    python benchmarks/bench_teacher_cache.py [--teachers tiny v32000] [--k 8 16 32 64] [--reps 3] [--threads N]

Teachers: the TinyLM of examples/distill_tiny_lm.py as the example builds it (V 512, dim 128, 4 layers) and
the same network with a V 32000 head. Each (teacher, targets, k) is built `reps` times from scratch
(overwrite=True) into a temporary directory; the time is the wall-clock median. `teacher_tok_s` is the
teacher's forward alone over the same batches (the ceiling of any build). fp16 values, int32 ids.
Writes benchmarks/results/teacher_cache_cpu.csv (device, versions, date, torch threads and the 1-minute load
average at the start of each row: on a shared machine, more torch threads than idle cores slow every op down).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "examples")]

from distill_tiny_lm import TinyLM  # noqa: E402
from harness import environment, print_table, write_csv  # noqa: E402

from fastdistill.cache import TeacherCache  # noqa: E402

# Published, not measured here: DistillKit's README (github.com/arcee-ai/DistillKit, "Logit Compression",
# recommended configuration: k=128 with exact_k=16 bf16 log-probabilities + a polynomial tail) says it
# "takes ~300 bytes/token"; its "budget pick" is ~114 bytes/token.
DISTILLKIT_BYTES_PER_TOKEN = 300

TEACHERS = {"tiny": 512, "v32000": 32000}  # name -> vocabulary; the example's TinyLM otherwise
SEQUENCES, SEQ_LEN, BATCH, SHARD = 256, 32, 16, 64


def make_teacher(vocab: int) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(vocab, dim=128, layers=4, heads=4, head_scale=8.0).eval()


def teacher_seconds(teacher, data) -> float:
    """The teacher's forward over the build's batches, nothing else."""
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(data), BATCH):
            teacher(data[lo:lo + BATCH])
    return time.perf_counter() - start


def build_seconds(path, teacher, seqs, targets: str, k: int) -> float:
    start = time.perf_counter()
    TeacherCache.build(path, teacher, seqs, targets=targets, k=k, seed=0, dtype=torch.float16, batch_size=BATCH,
                       shard_size=SHARD, progress=False, overwrite=True)
    return time.perf_counter() - start


def disk_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.startswith("shard-"))


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    p.add_argument("--k", nargs="+", type=int, default=[8, 16, 32, 64])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--name", default="teacher_cache_cpu")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    env = environment("cpu")
    rows = []
    for name in args.teachers:
        vocab = TEACHERS[name]
        teacher = make_teacher(vocab)
        data = torch.randint(0, vocab, (SEQUENCES, SEQ_LEN), generator=torch.Generator().manual_seed(1))
        seqs, tokens = list(data), data.numel()
        teacher_seconds(teacher, data)  # warm up
        floor = statistics.median(teacher_seconds(teacher, data) for _ in range(args.reps))
        for k in args.k:
            for targets in ("topk", "sampled"):
                load = os.getloadavg()[0]
                with tempfile.TemporaryDirectory() as tmp:
                    times = [build_seconds(tmp, teacher, seqs, targets, k) for _ in range(args.reps)]
                    on_disk = disk_bytes(tmp)
                    cache = TeacherCache(tmp)
                    assert cache.num_tokens == tokens
                    formula = cache.bytes_per_token
                    full = cache.full_vocab_bytes_per_token
                median = statistics.median(times)
                rows.append({**env, "teacher": f"TinyLM-{name}", "vocab": vocab, "tokens": tokens, "targets": targets,
                             "k": k, "dtype": "float16", "threads": torch.get_num_threads(),
                             "load_avg_1min": round(load, 2), "reps": args.reps, "median_s": round(median, 4),
                             "min_s": round(min(times), 4), "tok_s": round(tokens / median),
                             "teacher_tok_s": round(tokens / floor),
                             "disk_bytes_per_token": round(on_disk / tokens, 2),
                             "target_bytes_per_token": formula, "full_vocab_bytes_per_token": full,
                             "distillkit_published_bytes_per_token": DISTILLKIT_BYTES_PER_TOKEN})
                print(f"{name} {targets:>7} k={k:<3} {tokens / median:>10.0f} tok/s  "
                      f"{on_disk / tokens:7.2f} B/token on disk", flush=True)
    path = write_csv(args.name, rows)
    print_table(rows, ["teacher", "targets", "k", "tok_s", "teacher_tok_s", "disk_bytes_per_token",
                       "target_bytes_per_token", "full_vocab_bytes_per_token"])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
