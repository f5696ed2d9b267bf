"""Command line: `fastdistill demo | info | bench` (also `python -m fastdistill ...`)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def _demo(args) -> int:
    from fastdistill.demo import DemoConfig, format_report, run_demo

    cfg = DemoConfig(seed=args.seed)
    report = run_demo(cfg)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _info(args) -> int:
    import fastdistill

    print(json.dumps(fastdistill.info(), indent=2))
    return 0


def _bench(args) -> int:
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "bench_distill_loss.py")
    if not os.path.exists(script):
        print(f"fastdistill bench: {script} not found (benchmarks ship with the source tree)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, script, *args.rest])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastdistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="distill a digits classifier (scikit-learn's bundled data) and report accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(fn=_demo)
    p = sub.add_parser("info", help="backends, extension build and versions, as JSON")
    p.set_defaults(fn=_info)
    p = sub.add_parser("bench", help="run benchmarks/bench_distill_loss.py (arguments are passed through)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
