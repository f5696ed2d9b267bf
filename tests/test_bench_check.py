"""The ratio regression guard (fastdistill.bench.check, `fastdistill bench --check`, `make bench-check`): passes on
equal ratios, fails with a readable table on a slowed kernel, never drops a row silently."""
from __future__ import annotations

import copy
import dataclasses
import json
import time

import pytest

from fastdistill import cli
from fastdistill.bench import check, report, runner
from fastdistill.bench.cases import find_case


def _run(fd_ms=(1.0, 4.0), device="cpu", shapes="small"):
    """A fake run: two cases, each with a fastdistill provider and two baselines (eager 10 ms, compile 5 ms)."""
    rows = []
    for case, ms in zip(("a", "b"), fd_ms):
        for provider, kind, t in (("fastdistill-cpu", "fastdistill", ms), ("eager", "eager", 10.0),
                                  ("compile", "compile", 5.0)):
            rows.append({"op": "op", "case": case, "provider": provider, "kind": kind, "ms": t})
    return {"device": device, "shapes": shapes, "reps": 5, "rows": runner.add_ratios(rows)}


def _status(entries):
    return {(e["case"], e["provider"]): e["status"] for e in entries}


def test_equal_ratios_pass():
    entries = check.compare(_run(), _run())
    assert _status(entries) == {("a", "fastdistill-cpu"): "ok", ("b", "fastdistill-cpu"): "ok"}
    assert not check.failed(entries)
    assert [(e["vs"], e["was"], e["now"], e["change"]) for e in entries] == [("eager", 10.0, 10.0, 1.0),
                                                                              ("eager", 2.5, 2.5, 1.0)]
    assert check.table(entries).endswith("bench-check: all 2 ratios within 40% of the baseline's (or better): OK")


def test_a_slowed_kernel_fails_with_a_table():
    entries = check.compare(_run(), _run(fd_ms=(1.0, 8.0)))  # case b's kernel twice as slow
    assert _status(entries) == {("a", "fastdistill-cpu"): "ok", ("b", "fastdistill-cpu"): "slower"}
    assert [e["case"] for e in check.failed(entries)] == ["b"]
    text = check.table(entries)
    line = next(ln for ln in text.splitlines() if ln.startswith("op  b"))
    assert line.split() == ["op", "b", "fastdistill-cpu", "eager", "2.5x", "1.25x", "0.5x", "slower"]
    assert text.endswith("bench-check: 1 of 2 ratios worse than the baseline's by more than 40% (or not measured): "
                         "FAILED")


def test_one_baselines_fluke_does_not_fail_and_p20_times_count():
    """compile ran 3x faster in the new run's process (a fluke of that baseline): eager's ratio did not move, so
    the kernel did not get slower. Ratios come from the 20th-percentile times where a row has them."""
    now = _run()
    for row in now["rows"]:
        if row["provider"] == "compile":
            row["ms"] /= 3
    entries = check.compare(_run(), {**now, "rows": runner.add_ratios(now["rows"])})
    assert not check.failed(entries) and {(e["vs"], e["change"]) for e in entries} == {("eager", 1.0)}
    was, now = _run(), _run()
    for row in now["rows"]:  # medians moved, 20th percentiles did not
        row["p20_ms"] = row["ms"]
        row["ms"] = row["ms"] * (3 if row["kind"] == "fastdistill" else 1)
    for row in was["rows"]:
        row["p20_ms"] = row["ms"]
    assert not check.failed(check.compare(was, now))


def test_a_loaded_machine_passes():
    """Every time doubles (a busy machine): the ratios, and so the check, do not move."""
    rows = [{k: v for k, v in r.items() if k not in ("baseline", "ratio", "ratios")} for r in _run()["rows"]]
    loaded = {**_run(), "rows": runner.add_ratios([{**r, "ms": 2 * r["ms"]} for r in rows])}
    entries = check.compare(_run(), loaded)
    assert not check.failed(entries) and {e["change"] for e in entries} == {1.0}


@pytest.mark.parametrize("margin, status", [(0.25, "slower"), (0.5, "ok")])
def test_margin_is_the_allowed_drop(margin, status):
    entries = check.compare(_run(), _run(fd_ms=(1.0, 6.0)), margin)  # change 4/6 = 0.667
    assert _status(entries)[("b", "fastdistill-cpu")] == status


def test_faster_and_new_rows_pass():
    now = _run(fd_ms=(0.5, 4.0))
    now["rows"].append({"op": "op2", "case": "c", "provider": "fastdistill-cpu", "kind": "fastdistill", "ms": 1.0,
                        "baseline": "eager", "ratio": 3.0, "ratios": {"eager": 3.0}})
    entries = check.compare(_run(), now)
    assert _status(entries) == {("a", "fastdistill-cpu"): "faster", ("b", "fastdistill-cpu"): "ok",
                                ("c", "fastdistill-cpu"): "new"}
    assert not check.failed(entries)


def _without(run, case, provider):
    run = copy.deepcopy(run)
    run["rows"] = [r for r in run["rows"] if (r["case"], r["provider"]) != (case, provider)]
    return run


def test_missing_failed_or_unbaselined_rows_fail():
    missing = _without(_run(), "a", "fastdistill-cpu")
    broken = _run()
    broken["rows"][0] = {**{k: broken["rows"][0][k] for k in ("op", "case", "provider", "kind")}, "error": "boom"}
    no_baselines = _without(_without(_run(), "a", "compile"), "a", "eager")
    for now, status in ((missing, "missing"), (broken, "failed"), (no_baselines, "no baseline")):
        entries = check.compare(_run(), now)
        assert _status(entries)[("a", "fastdistill-cpu")] == status
        assert check.failed(entries) and "FAILED" in check.table(entries)


def test_different_runs_are_refused():
    with pytest.raises(ValueError, match="^baseline: measured device 'cpu', this run 'cuda'"):
        check.compare(_run(), _run(device="cuda"))
    with pytest.raises(ValueError, match="^baseline: measured shapes 'small', this run 'llm'"):
        check.compare(_run(), _run(shapes="llm"))
    for margin in (0, 1, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match="^margin: expected a fraction"):
            check.compare(_run(), _run(), margin)


def test_a_really_slowed_kernel_fails(monkeypatch):
    """Real measurements (tiny quantize_per_token, in-process): the same code passes against itself; the
    fastdistill provider made 20 ms slower fails."""
    args = dict(shapes="tiny", providers=["fastdistill-cpu", "eager"], reps=3, isolate="none")
    baseline = runner.run(["quantize_per_token"], **args)
    assert not check.failed(check.compare(baseline, copy.deepcopy(baseline)))

    def slowed_find_case(*a):
        case = find_case(*a)

        def build(params, provider, device):
            fn = case.build(params, provider, device)
            if provider != "fastdistill-cpu":
                return fn
            return lambda: (time.sleep(0.02), fn())[1]

        return dataclasses.replace(case, build=build)

    monkeypatch.setattr(runner, "find_case", slowed_find_case)
    entries = check.compare(baseline, runner.run(["quantize_per_token"], **args))
    assert {e["status"] for e in entries} == {"slower"} and all(e["change"] < 0.5 for e in entries)


def test_cli_check_against_a_saved_run(tmp_path, capsys):
    base, same, slow = (tmp_path / f"{n}.json" for n in ("base", "same", "slow"))
    report.write_json(str(base), _run())
    report.write_json(str(same), _run())
    report.write_json(str(slow), _run(fd_ms=(1.0, 8.0)))
    assert cli.main(["bench", "--check", str(base), "--against", str(same)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("OK")
    assert cli.main(["bench", "--check", str(base), "--against", str(slow), "--margin", "0.6"]) == 0  # 0.5x
    capsys.readouterr()
    assert cli.main(["bench", "--check", str(base), "--against", str(slow)]) == 1
    out = capsys.readouterr().out
    assert "slower" in out and out.rstrip().endswith("FAILED")


@pytest.mark.parametrize("argv, message", [
    (["--against", "x.json"], "--against: needs --check BASELINE"),
    (["--margin", "0.1"], "--margin: needs --check BASELINE"),
    (["--check", "{tmp}/nope.json"], "--check {tmp}/nope.json: No such file or directory"),
    (["--check", "{tmp}/bad.json"], "--check {tmp}/bad.json: path: {tmp}/bad.json is not JSON"),
    (["--check", "{tmp}/base.json", "--against", "{tmp}/cuda.json"],
     "--against {tmp}/cuda.json: baseline: measured device 'cpu', this run 'cuda'"),
])
def test_cli_check_errors_name_the_option(tmp_path, capsys, argv, message):
    (tmp_path / "bad.json").write_text("{not json")
    report.write_json(str(tmp_path / "base.json"), _run())
    report.write_json(str(tmp_path / "cuda.json"), _run(device="cuda"))
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastdistill: {message.format(tmp=tmp_path)}"), err


@pytest.mark.parametrize("text", ["0", "1", "x", "-0.2"])
def test_cli_margin_must_be_a_fraction(capsys, text):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--check", "b.json", "--margin", text])
    assert "--margin: expected a fraction between 0 and 1" in capsys.readouterr().err


def test_the_committed_cpu_baseline_reads_and_covers_every_op():
    """make bench-check's baseline: a fastdistill bench --json run of every op at small CPU shapes."""
    import os

    from fastdistill.bench.cases import OPS

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "bench_cpu_small.json")
    baseline = report.read_json(path)
    assert baseline["device"] == "cpu" and baseline["shapes"] == "small"
    timed = {r["op"] for r in baseline["rows"] if r.get("kind") == "fastdistill" and r.get("ratio")}
    assert timed == set(OPS)
    json.dumps(baseline)  # plain data
