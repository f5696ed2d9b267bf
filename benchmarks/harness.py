"""The timing core of benchmarks/bench_<op>.py: a re-export of fastdistill/bench/harness.py, the one copy
that `fastdistill bench` uses too (the scripts keep `import harness` unchanged)."""
from __future__ import annotations

import os

from fastdistill.bench import harness as _core
from fastdistill.bench.harness import (PeakMemory, copy_bandwidth_gbps, describe, device_name, environment, finish,
                                       liger_installed, print_table, run_module_worker, run_worker, summarize,
                                       time_it, write_csv, write_rows_csv)

__all__ = ["PeakMemory", "RESULTS", "copy_bandwidth_gbps", "describe", "device_name", "environment", "finish",
           "liger_installed", "print_table", "run_module_worker", "run_worker", "summarize", "time_it", "write_csv",
           "write_rows_csv"]

# The scripts' CSVs go beside them, even when fastdistill itself is imported from an installed copy.
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
if _core.RESULTS is None:
    _core.RESULTS = RESULTS
