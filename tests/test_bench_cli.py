"""`fastdistill bench`: argument errors that name the option, the printed table, the files it writes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastdistill import cli
from fastdistill.bench import report

TINY = ["bench", "--op", "quantize_per_token", "--shapes", "tiny", "--reps", "2"]


def _fails(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastdistill: {message}"), err
    assert err.count("\n") == 1  # one line


def test_unknown_op(capsys):
    _fails(capsys, ["bench", "--op", "quantize_per_token", "nope"],
           "--op: unknown 'nope'; expected one of distill_loss")


def test_unknown_provider(capsys):
    _fails(capsys, ["bench", "--op", "int8_linear", "--providers", "liger-jsd"],
           "--providers: 'liger-jsd' does not run int8_linear on ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_device(capsys):
    _fails(capsys, ["bench", "--device", "cuda"], "--device: cuda is not available here")


@pytest.mark.parametrize("argv, option", [(["--reps", "0"], "--reps"), (["--reps", "x"], "--reps"),
                                          (["--shapes", "huge"], "--shapes"), (["--device", "tpu"], "--device")])
def test_argparse_errors_name_the_option(capsys, argv, option):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", *argv])
    assert e.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


def test_chart_without_matplotlib(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    _fails(capsys, TINY + ["--chart", str(tmp_path)], "--chart: needs matplotlib")
    assert not os.listdir(tmp_path)  # refused before measuring anything


def test_list_prints_the_plan(capsys):
    assert cli.main(["bench", "--op", "int8_linear", "--shapes", "tiny", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "int8_linear  [W8A8 layer M 8 N 32 K 64 float32]  fastdistill-cpu  (fastdistill)"
    assert any(line.endswith("eager  (eager)") for line in lines) and len(lines) >= 5


def test_table_and_files(capsys, tmp_path):
    out_json, out_csv = tmp_path / "run.json", tmp_path / "run.csv"
    argv = TINY + ["--providers", "fastdistill-cpu", "eager", "--isolate", "none", "--json", str(out_json),
                   "--csv", str(out_csv)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "shapes tiny, 2 reps, in-process" in lines[0]
    assert lines[1].split()[:4] == ["op", "case", "provider", "ms"]
    body = [line.split() for line in lines[3:5]]
    assert [b[:4] for b in body] == [["quantize_per_token", "16x64", "float32", "fastdistill-cpu"],
                                     ["quantize_per_token", "16x64", "float32", "eager"]]
    assert body[0][-1] == body[1][-1] == "eager" and body[1][-2] == "1x"
    assert lines[5:] == [f"wrote {out_json}", f"wrote {out_csv}"]
    assert "quantize_per_token [16x64 float32] eager: " in captured.err  # progress goes to stderr
    result = report.read_json(str(out_json))
    assert [r["provider"] for r in result["rows"]] == ["fastdistill-cpu", "eager"]
    assert out_csv.read_text().count("\n") == 3


@pytest.mark.parametrize("option", ["--json", "--csv"])
def test_unwritable_output_is_refused_before_the_run(capsys, tmp_path, option):
    path = tmp_path / "no" / "x"
    _fails(capsys, TINY + ["--providers", "eager", "--isolate", "none", option, str(path)],
           f"{option} {path}: {tmp_path / 'no'} is not a writable directory")  # one line: nothing was measured


def test_write_failure_after_the_run(capsys, tmp_path):
    (tmp_path / "run.json").mkdir()  # a directory where the file should go
    assert cli.main(TINY + ["--providers", "eager", "--isolate", "none", "--json", str(tmp_path / "run.json")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"fastdistill: --json {tmp_path / 'run.json'}: Is a directory"


def test_console_script_isolated_run(tmp_path):
    """The default path end to end: `python -m fastdistill bench` from outside the checkout, the case's providers
    measured in one worker process."""
    env = dict(os.environ, PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-m", "fastdistill", *TINY, "--providers", "eager", "fastdistill-cpu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.splitlines()
    assert "in-process" not in table[0] and "failed" not in proc.stdout
    assert [line.split()[3] for line in table[3:5]] == ["fastdistill-cpu", "eager"]
    assert table[4].split()[-2:] == ["1x", "eager"]
