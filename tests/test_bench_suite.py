"""The pytest-benchmark suite (benchmarks/suite, `make bench`) on tiny shapes: one benchmark per provider with peak
memory and speed-ups in extra_info, fastdistill bench's table at the end, and a JSON run that bench --check reads."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from fastdistill.bench import check, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_suite_on_tiny_shapes(tmp_path):
    run, bench = tmp_path / "run.json", tmp_path / "pytest_benchmark.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/suite",
                           "--bench-shapes", "tiny", "--bench-op", "quantize_per_token", "--bench-reps", "3",
                           f"--bench-json={run}", f"--benchmark-json={bench}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fastdistill bench: every op, ratio to the fastest baseline of this session" in proc.stdout
    benchmarks = json.loads(bench.read_text())["benchmarks"]
    names = sorted(b["name"].rsplit("]-", 1)[1].rstrip("]") for b in benchmarks)
    assert names == ["compile", "eager", "fastdistill-cpu"], names
    assert {b["group"] for b in benchmarks} == {"quantize_per_token [16x64 float32]"}
    ours = next(b for b in benchmarks if b["name"].endswith("fastdistill-cpu]"))
    assert ours["stats"]["rounds"] == 3
    assert ours["extra_info"]["peak_mb"] >= 0
    assert {"speedup_vs_eager", "speedup_vs_compile"} <= set(ours["extra_info"])
    eager = next(b for b in benchmarks if b["name"].endswith("eager]"))
    assert abs(ours["extra_info"]["speedup_vs_eager"] - eager["stats"]["median"] / ours["stats"]["median"]) < 1e-9
    result = report.read_json(str(run))
    assert {r["provider"] for r in result["rows"]} == {"fastdistill-cpu", "eager", "compile"}
    assert not check.failed(check.compare(result, result))
