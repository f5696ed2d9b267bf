"""Benchmarks inside the package (`fastdistill bench`, no source tree needed).

    harness  the timing core (time_it, PeakMemory, subprocess workers, CSV); benchmarks/bench_<op>.py use it too
    cases    the registry: OPS, SHAPES, get_cases(op, device, shapes) -> [Case] with providers and a build function
    runner   plan(...) and run(...) -> {"environment", ..., "rows"} with ratios to the best baseline
    report   table(result), write_json / read_json, write_csv;  chart: write_charts(result, directory)
Importing this package imports nothing heavy beyond fastdistill itself.
"""
from fastdistill.bench.cases import OPS, SHAPES, Case, Provider, get_cases
from fastdistill.bench.runner import add_ratios, plan, run

__all__ = ["OPS", "SHAPES", "Case", "Provider", "add_ratios", "get_cases", "plan", "run"]
