"""Command line for the teacher cache:

    python -m fastdistill.cache build --teacher MODULE:ATTR --data MODULE:ATTR --out DIR
        [--targets topk|sampled] [--k 64] [--temperature 1.0] [--seed 0] [--dtype float16|bfloat16]
        [--batch-size 8] [--shard-size N]
        [--device cpu] [--teacher-name NAME] [--teacher-hash HASH] [--overwrite] [--no-progress]
    python -m fastdistill.cache info DIR [--json] [--verify]

MODULE:ATTR imports MODULE (the current directory and PYTHONPATH are searched) and takes its
attribute ATTR (dots allowed: `pkg.models:zoo.tiny`). Then:
  --teacher  an nn.Module instance is used as is. Any other callable whose signature has no
             required parameters (a class, a factory function) is called once with no arguments
             and its result is the teacher. Anything else callable is the teacher itself (a
             function of the token batch; it needs --teacher-hash).
  --data     an object with len() and indexing (a list, a Dataset) is used as is. Otherwise a
             callable with no required parameters is called once and its result is the dataset
             (an iterable result, e.g. from a generator function, is read into a list).
With --device, an nn.Module teacher is moved there and token batches are sent there.
Errors print one line to stderr and exit with status 2; a rerun of an interrupted build resumes.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys

from fastdistill.cache.manifest import TeacherCacheError

PROG = "python -m fastdistill.cache"


class _UsageError(Exception):
    pass


def _no_required_params(obj) -> bool:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in sig.parameters.values())


def _load(spec: str, what: str):
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise _UsageError(f"--{what}: expected MODULE:ATTR, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # `python -m` puts the cwd first already; keep it so
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise _UsageError(f"--{what}: cannot import module {module_name!r} ({e})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise _UsageError(f"--{what}: {module_name!r} has no attribute {attr!r}") from None
    return obj


def _resolve_teacher(spec: str):
    import torch

    obj = _load(spec, "teacher")
    if isinstance(obj, torch.nn.Module):
        return obj
    if not callable(obj):
        raise _UsageError(f"--teacher: {spec} is a {type(obj).__name__}, not a callable or nn.Module")
    if _no_required_params(obj):
        return obj()
    if isinstance(obj, type):
        raise _UsageError(f"--teacher: class {spec} needs constructor arguments; point to an instance or to a "
                          f"factory function with no required arguments")
    return obj


def _resolve_data(spec: str):
    obj = _load(spec, "data")
    if hasattr(obj, "__len__") and hasattr(obj, "__getitem__"):
        return obj
    if callable(obj) and _no_required_params(obj):
        obj = obj()
    if hasattr(obj, "__len__") and hasattr(obj, "__getitem__"):
        return obj
    try:
        return list(obj)
    except TypeError:
        raise _UsageError(f"--data: {spec} gave a {type(obj).__name__}, not a dataset (len() and indexing) or an "
                          f"iterable of token sequences") from None


def _build(args) -> int:
    import torch

    from fastdistill.cache.build import build_cache

    teacher = _resolve_teacher(args.teacher)
    data = _resolve_data(args.data)
    if args.device is not None and isinstance(teacher, torch.nn.Module):
        teacher = teacher.to(args.device)
    cache = build_cache(args.out, teacher, data, targets=args.targets, k=args.k, temperature=args.temperature,
                        seed=args.seed, dtype=args.dtype,
                        batch_size=args.batch_size, shard_size=args.shard_size, teacher_name=args.teacher_name,
                        teacher_hash=args.teacher_hash, device=args.device, progress=not args.no_progress,
                        overwrite=args.overwrite)
    print(cache.summary())
    return 0


def _info(args) -> int:
    from fastdistill.cache import manifest as mf
    from fastdistill.cache.dataset import TeacherCache

    m = mf.read_manifest(args.dir)
    if args.verify and m["complete"]:
        TeacherCache(args.dir, verify=True)  # raises on a missing or corrupt shard
    print(json.dumps(m, indent=2) if args.json else mf.summarize(m, args.dir))
    if args.verify and m["complete"] and not args.json:
        print("  verified      every shard's sha256 matches the manifest")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Teacher logit cache (top-k or sampled targets) for offline distillation.",
        epilog="See `python -m pydoc fastdistill.cache.__main__` for the MODULE:ATTR rule.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="run a teacher over a token dataset and cache k targets per position")
    p.add_argument("--teacher", required=True, metavar="MODULE:ATTR",
                   help="nn.Module, factory (called with no arguments) or logits function")
    p.add_argument("--data", required=True, metavar="MODULE:ATTR",
                   help="dataset of 1-D token id tensors, or a factory of one")
    p.add_argument("--out", required=True, metavar="DIR", help="cache directory (created; resumed if present)")
    p.add_argument("--targets", choices=["topk", "sampled"], default="topk",
                   help="topk: the k most likely ids; sampled: k seeded draws (RS-KD, unbiased)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (--targets sampled)")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=1024, help="sequences per shard (default 1024)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: the teacher's device)")
    p.add_argument("--teacher-name", default=None)
    p.add_argument("--teacher-hash", default=None, help="required when the teacher is not an nn.Module")
    p.add_argument("--overwrite", action="store_true", help="delete an existing cache in DIR and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=_build)
    p = sub.add_parser("info", help="print a cache's manifest summary (complete or not)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the manifest itself")
    p.add_argument("--verify", action="store_true", help="also check every shard's sha256")
    p.set_defaults(fn=_info)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (_UsageError, TeacherCacheError, ValueError, TypeError, OSError) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
