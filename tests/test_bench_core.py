"""fastdistill.bench: the case registry, the runner's rows and ratios, the report files, the charts and the shared
harness. Timed numbers are never asserted (speed targets live in benchmarks/); runs use the "tiny" shapes."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

from fastdistill.bench import cases as registry
from fastdistill.bench import harness, report, runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The ops issue 15 names; each must be in the registry with a fastdistill provider and a baseline.
ISSUE_OPS = {"distill_loss", "fused_linear_distill_loss", "topk_distill_loss", "block_sparse_linear",
             "semi_structured_linear", "int8_linear", "int8_weight_only_linear", "quantize_per_token"}
DIVERGENCES = {"kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "mse"}


@pytest.mark.parametrize("shapes", registry.SHAPES)
def test_registry_covers_every_op_with_fastdistill_and_baseline_providers(shapes):
    assert set(registry.OPS) == ISSUE_OPS
    for op in registry.OPS:
        cases = registry.get_cases(op, "cpu", shapes)
        assert cases, op
        for case in cases:
            kinds = {p.kind for p in case.providers}
            assert "fastdistill" in kinds and kinds & {"eager", "compile", "peer"}, (op, case.name, kinds)
            assert {"eager", "compile"} <= kinds, (op, case.name)  # the reference and its compiled form
            assert case.bytes or case.flops, (op, case.name)
            names = [p.name for p in case.providers]
            assert len(names) == len(set(names)), names
            assert all(p.kind in registry.KINDS for p in case.providers)
            assert "fastdistill-triton" not in names  # interpreted Triton on a CPU times the interpreter
            json.dumps(case.params)  # a worker process rebuilds the case from JSON
        assert len({c.name for c in cases}) == len(cases), op  # find_case looks cases up by name


def test_distill_loss_has_one_case_per_divergence():
    cases = registry.get_cases("distill_loss", "cpu", "small")
    assert {c.params["divergence"] for c in cases} == DIVERGENCES


def test_cpu_peers_of_the_int8_and_sparse_ops():
    def names(op):
        return {p.name for c in registry.get_cases(op, "cpu", "small") for p in c.providers}
    assert {"torch-quantize_dynamic", "torch-int_mm", "torch-linear"} <= names("int8_linear")
    assert {"torch-int8pack_mm", "torch-linear"} <= names("int8_weight_only_linear")
    assert {"torch-bsr", "torch-csr", "torch-linear"} <= names("block_sparse_linear")


def test_llm_shapes_are_the_gpu_targets():
    (kl,) = [c for c in registry.get_cases("distill_loss", "cpu", "llm") if c.params["divergence"] == "kl"]
    assert (kl.params["rows"], kl.params["vocab"], kl.params["dtype"]) == (8192, 128256, "bfloat16")
    (w8a8,) = registry.get_cases("int8_linear", "cpu", "llm")
    assert (w8a8.params["M"], w8a8.params["N"], w8a8.params["K"]) == (8192, 8192, 8192)


def test_every_provider_builds_and_runs_at_tiny_shapes():
    """Each build function runs each of its non-compiled providers once (compile: the slow test below)."""
    for op in registry.OPS:
        for case in registry.get_cases(op, "cpu", "tiny"):
            for p in case.providers:
                if p.kind != "compile":
                    case.build(case.params, p.name, "cpu")()


@pytest.mark.slow
def test_every_compile_provider_runs_at_tiny_shapes():
    for op in registry.OPS:
        for case in registry.get_cases(op, "cpu", "tiny"):
            case.build(case.params, "compile", "cpu")()


def test_build_rejects_unknown_provider():
    case = registry.get_cases("quantize_per_token", "cpu", "tiny")[0]
    with pytest.raises(ValueError, match="^provider: "):
        case.build(case.params, "nope", "cpu")
    with pytest.raises(ValueError, match="^provider: .*has no provider 'nope'"):
        case.provider("nope")


@pytest.mark.parametrize("kwargs, match", [
    (dict(ops=["nope"]), "^op: unknown 'nope'"),
    (dict(ops=[]), "^op: none given"),
    (dict(ops=["quantize_per_token"], providers=["torch-bsr"]), "^providers: 'torch-bsr' does not run"),
    (dict(ops=["quantize_per_token"], providers=[]), "^providers: none given"),
    (dict(shapes="huge"), "^shapes: "),
    (dict(device="tpu"), "^device: "),
])
def test_plan_errors_name_the_argument(kwargs, match):
    ops = kwargs.pop("ops", None)
    with pytest.raises(ValueError, match=match):
        runner.plan(ops, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_plan_refuses_cuda_without_a_gpu():
    with pytest.raises(ValueError, match="^device: cuda is not available"):
        runner.plan(["quantize_per_token"], device="cuda")


@pytest.mark.parametrize("reps", [0, -1, 1.5, True])
def test_run_rejects_bad_reps(reps):
    with pytest.raises(ValueError, match="^reps: "):
        runner.run(["quantize_per_token"], shapes="tiny", reps=reps, isolate="none")


def test_plan_filters_providers():
    pairs = runner.plan(["int8_linear", "quantize_per_token"], shapes="tiny", providers=["eager", "torch-int_mm"])
    assert [(c.op, p) for c, p in pairs] == [("int8_linear", "eager"), ("int8_linear", "torch-int_mm"),
                                             ("quantize_per_token", "eager")]


def test_tiny_run_rows_columns_and_finite_ratio():
    seen = []
    result = runner.run(["quantize_per_token"], shapes="tiny", providers=["fastdistill-cpu", "eager"], reps=2,
                        isolate="none", progress=seen.append)
    rows = result["rows"]
    assert seen == rows and [r["provider"] for r in rows] == ["fastdistill-cpu", "eager"]
    for r in rows:
        assert set(r) <= set(runner.ROW_FIELDS)
        assert {"op", "case", "provider", "kind", "ms", "p20_ms", "p80_ms", "gbps", "peak_mb", "baseline",
                "ratio", "ratios"} <= set(r), r
        assert r["op"] == "quantize_per_token" and r["baseline"] == "eager" and r["tflops"] is None
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["ms"] > 0 and r["gbps"] > 0
        assert r["p20_ms"] <= r["ms"] <= r["p80_ms"] and r["peak_mb"] >= 0
    assert rows[1]["ratio"] == 1.0
    env = result["environment"]
    assert {"device", "torch", "triton", "python", "fastdistill", "date"} <= set(env)
    assert (result["device"], result["shapes"], result["reps"], result["isolate"]) == ("cpu", "tiny", 2, "none")


def test_a_failing_provider_is_one_row_with_its_error(monkeypatch):
    def broken(params, provider, device):
        raise RuntimeError("no kernel\nfor this")
    case = registry.get_cases("quantize_per_token", "cpu", "tiny")[0]
    monkeypatch.setattr(registry, "find_case", lambda *a: registry.Case(case.op, case.name, case.params,
                                                                       case.providers, broken, case.bytes))
    monkeypatch.setattr(runner, "find_case", registry.find_case)
    rows = runner.run(["quantize_per_token"], shapes="tiny", providers=["eager"], reps=1, isolate="none")["rows"]
    assert rows == [{"op": "quantize_per_token", "case": case.name, "provider": "eager", "kind": "eager",
                     "error": "RuntimeError: no kernel for this"}]


@pytest.mark.parametrize("isolate, calls", [("case", [["fastdistill-cpu", "eager"]]),
                                             ("provider", ["fastdistill-cpu", "eager"])])
def test_isolation_modes_spawn_workers_per_case_or_provider(monkeypatch, isolate, calls):
    """On the CPU each case (or provider) gets a timing worker with glibc's normal heap and a memory worker with
    exact RSS (MALLOC_MMAP_THRESHOLD_ made sub-ms calls 3-4x slower when timings ran under it)."""
    seen = []

    def fake_worker(module, spec, timeout=1800, exact_rss=True):
        assert module == runner.WORKER == "fastdistill.bench.worker"
        seen.append((spec["what"], exact_rss, spec.get("providers") or spec["provider"]))
        def result(p):
            if spec["what"] == "memory":
                return {"peak_mb": 5.0 if p == "eager" else 1.0}
            return {"median_ms": 1.0 if p == "fastdistill-cpu" else 2.0, "p20_ms": 0.5, "p80_ms": 3.0}

        if "providers" in spec:
            return {"results": {p: result(p) for p in spec["providers"]}}
        return result(spec["provider"])

    monkeypatch.setattr(harness, "run_module_worker", fake_worker)
    result = runner.run(["quantize_per_token"], shapes="tiny", providers=["fastdistill-cpu", "eager"], reps=1,
                        isolate=isolate)
    assert [s[:2] for s in seen if s[0] == "time"] == [("time", False)] * len(calls)
    assert [s[:2] for s in seen if s[0] == "memory"] == [("memory", True)] * len(calls)
    assert [s[2] for s in seen if s[0] == "time"] == calls and result["isolate"] == isolate
    assert [(r["provider"], r["ms"], r["ratio"], r["peak_mb"]) for r in result["rows"]] == [
        ("fastdistill-cpu", 1.0, 2.0, 1.0), ("eager", 2.0, 1.0, 5.0)]


def test_a_failed_memory_worker_leaves_the_peak_unknown(monkeypatch):
    def fake_worker(module, spec, timeout=1800, exact_rss=True):
        if spec["what"] == "memory":
            return {"error": "Killed"}
        return {"results": {p: {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0} for p in spec["providers"]}}

    monkeypatch.setattr(harness, "run_module_worker", fake_worker)
    rows = runner.run(["quantize_per_token"], shapes="tiny", providers=["eager"], reps=1)["rows"]
    assert rows[0]["ms"] == 1.0 and rows[0]["peak_mb"] is None


@pytest.mark.parametrize("what, keys", [("time", {"median_ms", "p20_ms", "p80_ms"}), ("memory", {"peak_mb"}),
                                        ("both", {"median_ms", "p20_ms", "p80_ms", "peak_mb"})])
def test_measure_gives_what_was_asked(what, keys):
    case = registry.get_cases("quantize_per_token", "cpu", "tiny")[0]
    assert set(runner.measure(case, "eager", "cpu", 2, what)) == keys
    with pytest.raises(ValueError, match="^what: expected one of"):
        runner.measure(case, "eager", "cpu", 2, "speed")


def test_a_dead_case_worker_fails_each_of_its_rows(monkeypatch):
    monkeypatch.setattr(harness, "run_module_worker", lambda *a, **k: {"error": "Segmentation fault"})
    rows = runner.run(["quantize_per_token"], shapes="tiny", providers=["fastdistill-cpu", "eager"], reps=1)["rows"]
    assert [r.get("error") for r in rows] == ["Segmentation fault"] * 2 and all("ratio" not in r for r in rows)


def test_run_rejects_unknown_isolation():
    with pytest.raises(ValueError, match="^isolate: expected one of"):
        runner.run(["quantize_per_token"], shapes="tiny", isolate="thread")


def test_worker_spec_with_providers_measures_each():
    case = registry.get_cases("quantize_per_token", "cpu", "tiny")[0]
    out = runner.measure_spec(dict(op=case.op, case=case.name, providers=["eager", "nope"], device="cpu",
                                   shapes="tiny", reps=1))
    assert list(out["results"]) == ["eager", "nope"]
    assert set(out["results"]["eager"]) == {"median_ms", "p20_ms", "p80_ms", "peak_mb"}
    assert out["results"]["nope"]["error"].startswith("ValueError: provider: ")


def test_worker_spec_errors_come_back_as_one_row():
    """What a worker process prints for a spec it cannot run (tests/test_bench_cli.py runs a real worker)."""
    spec = dict(op="quantize_per_token", case="no such case", provider="eager", device="cpu", shapes="tiny", reps=1)
    bad = runner.measure_spec(spec)
    assert bad == {"error": "ValueError: case: quantize_per_token has no case 'no such case' at shapes 'tiny' on cpu"}


def _fake(rows):
    return [{"op": "op", "case": "c", "kind": "fastdistill", **r} for r in rows]


def test_ratios_on_fake_timings():
    rows = _fake([dict(provider="fd", ms=2.0), dict(provider="eager", kind="eager", ms=8.0),
                  dict(provider="compile", kind="compile", ms=4.0), dict(provider="peer", kind="peer", ms=5.0),
                  dict(provider="fd-broken", error="boom"), dict(provider="fd-slow", ms=16.0),
                  dict(provider="peer-broken", kind="peer", error="boom"),
                  dict(provider="fd", case="no-baseline", ms=1.0)])
    runner.add_ratios(rows)
    fd, eager, comp, peer, broken, slow, peer_broken, alone = rows
    assert fd["baseline"] == "compile" and fd["ratio"] == 2.0  # the fastest baseline: 4 ms / 2 ms
    assert fd["ratios"] == {"eager": 4.0, "compile": 2.0, "peer": 2.5}
    assert slow["ratio"] == 0.25 and comp["ratio"] == 1.0 and eager["ratio"] == 0.5 and peer["ratio"] == 0.8
    assert "ratio" not in broken and "ratio" not in peer_broken
    assert "ratio" not in alone and "baseline" not in alone  # its case has no baseline


def test_ratios_are_per_case_and_op():
    rows = _fake([dict(provider="fd", ms=1.0), dict(provider="eager", kind="eager", ms=3.0),
                  dict(provider="fd", case="d", ms=1.0), dict(provider="eager", kind="eager", case="d", ms=5.0),
                  dict(provider="eager", kind="eager", op="other", ms=0.5)])
    runner.add_ratios(rows)
    assert [r.get("ratio") for r in rows] == [3.0, 1.0, 5.0, 1.0, 1.0]


def test_row_throughput_arithmetic():
    case = registry.Case("op", "c", {}, (registry.Provider("fd", "fastdistill"),), lambda *a: None,
                         bytes=4_000_000, flops=6_000_000_000)
    row = runner.make_row(case, "fd", {"median_ms": 2.0, "p20_ms": 1.5, "p80_ms": 3.0, "peak_mb": 7.0})
    assert row["gbps"] == pytest.approx(2.0)  # 4 MB in 2 ms
    assert row["tflops"] == pytest.approx(3.0)  # 6 GFLOP in 2 ms
    assert (row["kind"], row["peak_mb"], row["p20_ms"], row["p80_ms"]) == ("fastdistill", 7.0, 1.5, 3.0)


def _result():
    rows = _fake([dict(provider="fastdistill-cpu", ms=1.0, p20_ms=0.9, p80_ms=1.2, gbps=3.0, tflops=None,
                       peak_mb=1.5),
                  dict(provider="eager", kind="eager", ms=4.0, p20_ms=3.5, p80_ms=4.5, gbps=0.75, tflops=None,
                       peak_mb=12.0),
                  dict(provider="torch-x", kind="peer", error="RuntimeError: not here")])
    return {"environment": {"device": "test CPU", "torch": "2.x", "triton": "", "python": "3.11",
                            "fastdistill": "0", "date": "2026-01-01"},
            "device": "cpu", "shapes": "tiny", "reps": 2, "isolate": "case", "rows": runner.add_ratios(rows)}


def test_json_round_trip(tmp_path):
    result = _result()
    path = report.write_json(str(tmp_path / "run.json"), result)
    assert report.read_json(path) == result


def test_read_json_refuses_other_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("[1, 2]")
    with pytest.raises(ValueError, match="^path: .* is not a fastdistill bench result"):
        report.read_json(str(p))
    p.write_text("{not json")
    with pytest.raises(ValueError, match="^path: .* is not JSON"):
        report.read_json(str(p))
    p.write_text(json.dumps({"format": report.FORMAT_VERSION + 1, "rows": []}))
    with pytest.raises(ValueError, match="newer than this fastdistill reads"):
        report.read_json(str(p))


def test_csv_has_environment_and_rows(tmp_path):
    import csv

    path = report.write_csv(str(tmp_path / "run.csv"), _result())
    with open(path) as f:
        lines = list(csv.DictReader(f))
    assert [r["provider"] for r in lines] == ["fastdistill-cpu", "eager", "torch-x"]
    assert lines[0]["device"] == "test CPU" and lines[0]["shapes"] == "tiny" and lines[0]["ratio"] == "4.0"
    assert json.loads(lines[0]["ratios"]) == {"eager": 4.0} and lines[2]["error"] == "RuntimeError: not here"


def test_table_lists_every_row_with_ratio_and_failures():
    text = report.table(_result())
    lines = text.splitlines()
    assert lines[0].startswith("test CPU | torch 2.x | triton - |") and "shapes tiny, 2 reps" in lines[0]
    assert lines[1].split() == ["op", "case", "provider", "ms", "GB/s", "TFLOP/s", "peak", "MB", "vs", "best",
                                "baseline"]
    assert lines[3].split() == ["op", "c", "fastdistill-cpu", "1", "3", "1.5", "4x", "eager"]
    assert lines[4].split() == ["op", "c", "eager", "4", "0.75", "12.0", "1x", "eager"]
    assert lines[5].split() == ["op", "c", "torch-x", "failed"]
    assert lines[-1] == "failed: op [c] torch-x: RuntimeError: not here"


def test_chart_writes_one_png_per_op(tmp_path):
    pytest.importorskip("matplotlib")
    from fastdistill.bench import chart

    result = _result()
    result["rows"] += [dict(r, op="op2") for r in result["rows"]]
    result["rows"].append(dict(result["rows"][-2], provider="slow", kind="fastdistill", ms=400.0))
    runner.add_ratios(result["rows"])  # op2's ratios span 400x: drawn on a log axis
    paths = chart.write_charts(result, str(tmp_path / "charts"))
    assert [os.path.basename(p) for p in paths] == ["bench_op_cpu.png", "bench_op2_cpu.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_chart_without_matplotlib_says_so(monkeypatch, tmp_path):
    import sys

    from fastdistill.bench import chart

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert "matplotlib" in chart.missing()
    with pytest.raises(ModuleNotFoundError, match="^chart: needs matplotlib"):
        chart.write_charts(_result(), str(tmp_path))


def test_benchmarks_harness_is_the_package_harness():
    spec = importlib.util.spec_from_file_location("bench_harness_shim", os.path.join(ROOT, "benchmarks", "harness.py"))
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    for name in ("time_it", "PeakMemory", "run_worker", "summarize", "write_csv", "print_table", "finish",
                 "environment", "describe", "copy_bandwidth_gbps", "liger_installed", "run_module_worker",
                 "write_rows_csv"):
        assert getattr(shim, name) is getattr(harness, name), name
    assert shim.RESULTS == os.path.join(ROOT, "benchmarks", "results") == harness.RESULTS


def test_write_csv_needs_a_directory_outside_a_checkout(monkeypatch, tmp_path):
    monkeypatch.setattr(harness, "RESULTS", None)  # as from an installed wheel
    with pytest.raises(ValueError, match="^directory: "):
        harness.write_csv("x", [{"a": 1}])
    assert harness.write_csv("x", [{"a": 1}], str(tmp_path)) == str(tmp_path / "x.csv")


def test_print_table_of_no_rows(capsys):
    harness.print_table([], ["median_ms", "provider"])  # every provider failed: the header, not a TypeError
    assert capsys.readouterr().out.split() == ["median_ms", "provider"]
