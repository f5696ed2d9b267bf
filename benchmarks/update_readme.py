"""Regenerates the README's benchmark-suite tables (and their charts under docs/) from the committed runs:
    benchmarks/results/bench_cpu_small.json   <- make bench BENCH_ARGS="--json benchmarks/results/bench_cpu_small.json"
    benchmarks/results/bench_cuda_llm.json    <- benchmarks/gpu_check.sh (copied from its output folder)
Each goes between `<!-- bench:<name> start -->` and `<!-- bench:<name> end -->` in README.md; a missing run says
so. tests/test_bench_readme.py fails when the README and the committed runs disagree.

    python benchmarks/update_readme.py            # rewrite README.md and the charts
    python benchmarks/update_readme.py --check    # exit 1 when README.md is out of date
"""
from __future__ import annotations

import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fastdistill.bench import report, summary  # noqa: E402

RUNS = {"cpu": ("benchmarks/results/bench_cpu_small.json", "docs/bench_cpu.png"),
        "cuda": ("benchmarks/results/bench_cuda_llm.json", "docs/bench_cuda.png")}


def block(name: str) -> str:
    """The generated text of one README block."""
    source, chart = RUNS[name]
    path = os.path.join(ROOT, source)
    if not os.path.exists(path):
        return f"No {name} run committed yet (`{source}`)."
    text = summary.markdown(report.read_json(path), source)
    if os.path.exists(os.path.join(ROOT, chart)):
        text += f"\n\n![fastdistill vs the fastest baseline, {name}]({chart})"
    return text


def render(readme: str) -> str:
    """README text with every bench block regenerated; ValueError when a block's markers are missing."""
    for name in RUNS:
        pattern = re.compile(rf"(<!-- bench:{name} start -->\n)(?:.*?\n)?(<!-- bench:{name} end -->)", re.S)
        if not pattern.search(readme):
            raise ValueError(f"README.md: no '<!-- bench:{name} start -->' ... '<!-- bench:{name} end -->' block")
        readme = pattern.sub(lambda m: m.group(1) + block(name) + "\n" + m.group(2), readme)
    return readme


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md is out of date; write nothing")
    args = parser.parse_args(argv)
    readme_path = os.path.join(ROOT, "README.md")
    with open(readme_path) as f:
        readme = f.read()
    if not args.check:
        from fastdistill.bench import chart

        for source, png in RUNS.values():
            if os.path.exists(os.path.join(ROOT, source)):
                print("wrote", chart.write_summary(report.read_json(os.path.join(ROOT, source)),
                                                   os.path.join(ROOT, png)))
    new = render(readme)
    if args.check:
        if new != readme:
            print("README.md is out of date: run python benchmarks/update_readme.py", file=sys.stderr)
            return 1
        return 0
    with open(readme_path, "w") as f:
        f.write(new)
    print("wrote README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
