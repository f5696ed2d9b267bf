"""The README's benchmark-suite tables are generated from the committed runs (benchmarks/update_readme.py), never
hand-edited: this fails when the two disagree."""
from __future__ import annotations

import importlib.util
import os

import pytest

from fastdistill.bench import runner, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _updater():
    spec = importlib.util.spec_from_file_location("update_readme", os.path.join(ROOT, "benchmarks", "update_readme.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_matches_the_committed_runs():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert _updater().render(readme) == readme, "README.md is out of date: run python benchmarks/update_readme.py"


def test_the_cpu_block_is_generated_from_the_cpu_run():
    text = _updater().block("cpu")
    assert "`benchmarks/results/bench_cpu_small.json`" in text and "| op | case | fastdistill |" in text
    assert text.endswith("![fastdistill vs the fastest baseline, cpu](docs/bench_cpu.png)")
    assert os.path.exists(os.path.join(ROOT, "docs", "bench_cpu.png"))


def test_render_needs_both_markers():
    with pytest.raises(ValueError, match="^README.md: no '<!-- bench:cpu start -->'"):
        _updater().render("# nothing here\n")


def test_markdown_lists_fastdistills_fastest_provider_per_case():
    rows = [{"op": "op", "case": "c", "provider": p, "kind": k, "ms": ms, "peak_mb": mb}
            for p, k, ms, mb in (("fastdistill-cpu", "fastdistill", 2.0, 1.0), ("fastdistill-triton", "fastdistill",
                                 8.0, 3.0), ("eager", "eager", 10.0, 9.0), ("compile", "compile", 5.0, 4.0))]
    rows.append({"op": "op", "case": "dead", "provider": "fastdistill-cpu", "kind": "fastdistill", "error": "x"})
    result = {"device": "cpu", "shapes": "small", "reps": 5, "environment": {"device": "Some CPU", "torch": "2.x",
                                                                               "date": "2026-11-30"},
              "rows": runner.add_ratios(rows)}
    assert summary.best_rows(result) == [dict(op="op", case="c", provider="fastdistill-cpu", ms=2.0, peak_mb=1.0,
                                              baseline="compile", baseline_ms=5.0, baseline_peak_mb=4.0, ratio=2.5)]
    text = summary.markdown(result, "x.json")
    assert text.splitlines()[0].startswith("Some CPU, torch 2.x, small shapes, median of 5 calls, 2026-11-30 (`x.json`")
    assert text.splitlines()[-1] == "| op | c | fastdistill-cpu | 2 | 1.0 | compile | 5 | 4.0 | 2.5x |"


def test_summary_chart(tmp_path):
    pytest.importorskip("matplotlib")
    from fastdistill.bench import chart

    rows = [{"op": "op", "case": c, "provider": p, "kind": k, "ms": ms}
            for c in ("a", "b") for p, k, ms in (("fastdistill-cpu", "fastdistill", 1.0 if c == "a" else 9.0),
                                                  ("eager", "eager", 3.0))]
    result = {"device": "cpu", "shapes": "small", "rows": runner.add_ratios(rows)}
    path = chart.write_summary(result, str(tmp_path / "sub" / "s.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="^result: no case has both"):
        chart.write_summary({"rows": rows[1:2]}, str(tmp_path / "t.png"))
