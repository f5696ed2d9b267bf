"""Command line: `fastdistill demo | run CONFIG.yaml | bench | info` (also `python -m fastdistill ...`).

Errors a user can fix (a bad config or checkpoint, an unwritable or full output disk, a missing
`pipeline` extra) print one line, `fastdistill: ...`, on stderr and exit with status 2; a run whose
training diverged (NonFiniteError) or whose --verify-repro check failed exits with status 1."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

# The pipeline's own dependencies: the `pipeline` extra (import name -> distribution name).
PIPELINE_DEPS = {"numpy": "numpy", "yaml": "pyyaml", "tqdm": "tqdm", "matplotlib": "matplotlib",
                 "sklearn": "scikit-learn"}


def _error(message, status: int = 2) -> int:
    """One line on stderr (torch and safetensors messages can span lines); returns the exit status."""
    print("fastdistill: " + " ".join(str(message).split()), file=sys.stderr)
    return status


def _missing_pipeline_deps() -> list[str]:
    import importlib

    missing = []
    for module, dist in PIPELINE_DEPS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    return missing


def _os_error(e: OSError, cfg) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"output_dir {cfg.output_dir}: {where}{e.strerror or e}"


def _demo(args) -> int:
    from fastdistill.pipeline import demo_config

    cfg = demo_config(args.seed)
    if args.output_dir:
        cfg.output_dir = args.output_dir
    return _run_pipeline(cfg, args)


def _run(args) -> int:
    from fastdistill.pipeline import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        return _error(f"config error: {e}")
    if args.output_dir:
        cfg.output_dir = args.output_dir
    return _run_pipeline(cfg, args)


def _run_pipeline(cfg, args) -> int:
    """Runs the built-in pipeline (under torchrun: one process of a DDP run), prints the table or JSON."""
    from fastdistill.pipeline import CheckpointError, ConfigError, NonFiniteError, run_builtin
    from fastdistill.pipeline.report import table

    try:
        rank = _init_distributed(cfg)
        summary = run_builtin(cfg, resume=args.resume, progress=not args.no_progress)
        verify = None
        if args.verify_repro:
            verify = _verify_repro(cfg, summary, progress=not args.no_progress)
    except (CheckpointError, ConfigError) as e:
        return _error(e)
    except OSError as e:  # read-only, full or missing output disk; an output_dir that is a file
        return _error(_os_error(e, cfg))
    except NonFiniteError as e:  # the run diverged: not a usage error
        return _error(e, status=1)
    if rank == 0:
        if args.json:
            out = {k: v for k, v in summary.items() if k not in ("weight_stats", "histories")}
            print(json.dumps({**out, "verify_repro": verify}, indent=2))
        else:
            print(table(summary))
            print(f"report: {os.path.join(cfg.output_dir, 'report.md')} ({summary['seconds']:.1f} s)")
            if verify is not None:
                print(verify["message"])
    return 0 if verify is None or verify["ok"] else 1


def _verify_repro(cfg, first: dict, progress: bool) -> dict:
    """Runs the same config again in <output_dir>/repro-check and compares every stage's weight hash."""
    import copy

    from fastdistill.pipeline import run_builtin

    again = copy.deepcopy(cfg)
    again.output_dir = os.path.join(cfg.output_dir, "repro-check")
    second = run_builtin(again, resume=False, progress=progress)
    a = {r["stage"]: r["weights_sha256"] for r in first["stages"]}
    b = {r["stage"]: r["weights_sha256"] for r in second["stages"]}
    differ = [s for s in a if a[s] != b.get(s)]
    msg = ("verify-repro: OK, every stage's weights hash matched on a second run" if not differ else
           f"verify-repro: FAILED, the weights differ between two runs after stage(s): {', '.join(differ)}")
    return {"ok": not differ, "differ": differ, "first": a, "second": b, "message": msg}


def _init_distributed(cfg) -> int:
    """Under torchrun (WORLD_SIZE > 1): gloo for a CPU run, nccl for a GPU run. Returns this process's rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch
    import torch.distributed as dist

    from fastdistill.pipeline import resolve_device

    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank()


def _info(args) -> int:
    import fastdistill

    print(json.dumps(fastdistill.info(), indent=2))
    return 0


def _bench(args) -> int:
    """Times every selected op and provider side by side; prints one table (progress on stderr)."""
    from fastdistill.bench import chart, report, runner

    if args.chart and chart.missing():
        return _error(f"--chart: {chart.missing()}")
    for option, path in (("--json", args.json), ("--csv", args.csv)):  # refuse before a long run, not after
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            return _error(f"{option} {path}: {folder} is not a writable directory")
    baseline = None
    if args.check:
        from fastdistill.bench import check

        args.margin = check.DEFAULT_MARGIN if args.margin is None else args.margin
        try:
            baseline = report.read_json(args.check)
        except (OSError, ValueError) as e:
            return _error(f"--check {args.check}: {getattr(e, 'strerror', None) or e}")
        if args.against:
            try:
                entries = check.compare(baseline, report.read_json(args.against), args.margin)
            except (OSError, ValueError) as e:
                return _error(f"--against {args.against}: {getattr(e, 'strerror', None) or e}")
            print(check.table(entries, args.margin))
            return 1 if check.failed(entries) else 0
        # measure what the baseline measured, unless told otherwise
        args.device = args.device or baseline.get("device")
        args.shapes = args.shapes or baseline.get("shapes")
        args.reps = args.reps or baseline.get("reps")
        args.op = args.op or list(dict.fromkeys(r["op"] for r in baseline["rows"]))
    elif args.against or args.margin is not None:
        return _error(f"{'--against' if args.against else '--margin'}: needs --check BASELINE")
    device = args.device or ("cuda" if _cuda_available() else "cpu")
    shapes = args.shapes or "small"
    try:
        pairs = runner.plan(args.op, device=device, shapes=shapes, providers=args.providers)
    except ValueError as e:  # runner messages start with the argument's name: op, device, shapes, providers
        return _error(f"--{e}")
    if args.list:
        for case, provider in pairs:
            print(f"{case.op}  [{case.name}]  {provider}  ({case.provider(provider).kind})")
        return 0

    def progress(row):
        took = f"failed: {row['error']}" if "error" in row else f"{row['ms']:.3g} ms"
        print(f"  {row['op']} [{row['case']}] {row['provider']}: {took}", file=sys.stderr, flush=True)

    result = runner.run(args.op, device=device, shapes=shapes, providers=args.providers, reps=args.reps,
                        isolate=args.isolate, progress=progress)
    print(report.table(result))
    status = 0
    if baseline is not None:
        try:
            entries = check.compare(baseline, result, args.margin)
        except ValueError as e:
            return _error(f"--check {args.check}: {e}")
        print()
        print(check.table(entries, args.margin))
        status = 1 if check.failed(entries) else 0
    for option, path, write in (("--json", args.json, report.write_json), ("--csv", args.csv, report.write_csv),
                                ("--chart", args.chart, chart.write_charts)):
        if path:
            try:
                written = write(path, result) if option != "--chart" else write(result, path)
            except OSError as e:
                return _error(f"{option} {path}: {e.strerror or e}")
            print(f"wrote {', '.join(written) if isinstance(written, list) else written}")
    return status


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


def _bench_options(p):
    p.add_argument("--op", nargs="+", metavar="NAME", help="ops to time (default: every op; see --list)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--shapes", choices=("small", "llm", "tiny"),
                   help="small: CPU-sized (default; with --check: the baseline's); llm: 8192 x 128256 bf16 losses, "
                        "8192^3 GEMMs (the GPU targets); tiny: a smoke test of every provider in seconds")
    p.add_argument("--providers", nargs="+", metavar="NAME",
                   help="only these providers (fastdistill-<backend>, eager, compile, peers such as torch-linear)")
    p.add_argument("--reps", type=_positive_int, help="timed calls per provider (default: 5 on CPU, 20 on CUDA)")
    p.add_argument("--isolate", choices=("case", "provider", "none"), default="case",
                   help="where to measure: a fresh process per case (default: each provider's peak memory is its "
                        "own), per provider (nothing shared, slowest), or none: in this process (fastest)")
    p.add_argument("--list", action="store_true", help="print the cases and providers that would run, and exit")
    p.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    p.add_argument("--json", metavar="PATH", help="also write the run (environment + rows) as JSON")
    p.add_argument("--chart", metavar="DIR", help="also write one PNG bar chart per op here (needs matplotlib)")
    p.add_argument("--check", metavar="BASELINE",
                   help="regression guard: measure what this baseline run (a --json file) measured and fail (exit 1) "
                        "where a fastdistill ratio fell below the baseline's by more than --margin")
    p.add_argument("--margin", type=_fraction,
                   help="with --check: the allowed drop of a ratio, as a fraction (default 0.4: check.DEFAULT_MARGIN)")
    p.add_argument("--against", metavar="RUN", help="with --check: compare this earlier --json run, measure nothing")


def _run_options(p):
    p.add_argument("--output-dir", help="override the config's output_dir")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    p.add_argument("--verify-repro", action="store_true",
                   help="run twice and fail unless every stage's weights hash matches")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastdistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the built-in distill -> prune -> quantize run on scikit-learn's bundled digits")
    p.add_argument("--seed", type=int, default=0)
    _run_options(p)
    p.set_defaults(fn=_demo)
    p = sub.add_parser("run", help="run the pipeline described by a YAML config (see examples/pipeline_digits.yaml)")
    p.add_argument("config")
    _run_options(p)
    p.set_defaults(fn=_run)
    p = sub.add_parser("bench", help="time every op against eager PyTorch, torch.compile and the best peer, "
                                    "side by side; prints one table")
    _bench_options(p)
    p.set_defaults(fn=_bench)
    p = sub.add_parser("info", help="backends, extension build and versions, as JSON")
    p.set_defaults(fn=_info)
    args = parser.parse_args(argv)
    if args.command in ("demo", "run"):
        missing = _missing_pipeline_deps()
        if missing:
            return _error(f"{args.command} needs {', '.join(missing)}: pip install 'fastdistill[pipeline]'")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
