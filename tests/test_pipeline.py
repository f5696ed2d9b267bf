"""The pipeline end to end on a tiny config: artifacts, reproducibility, resume, guards."""
import json
import os

import pytest
import torch

from fastdistill.cli import main
from fastdistill.pipeline import NonFiniteError, checkpoint, run_builtin
from pipeline_cases import tiny_config

STAGES = ["teacher", "baseline", "distill", "prune", "quantize"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    return run_builtin(tiny_config(out), progress=False), out


def test_every_stage_runs_and_writes_its_artifacts(reference_run):
    summary, out = reference_run
    assert [r["stage"] for r in summary["stages"]] == STAGES
    for name in ("report.md", "manifest.json", "loss.png", "accuracy.png", "size_accuracy.png",
                 "export/student.safetensors", "export/manifest.json"):
        assert (out / name).stat().st_size > 0, name
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["stages"]) == set(STAGES)
    assert manifest["config"]["seed"] == 0 and manifest["environment"]["torch"] == torch.__version__
    assert len(manifest["data_sha256"]["train"]) == 64
    report = (out / "report.md").read_text()
    assert "distilled student" in report and "![loss.png](loss.png)" in report
    by_stage = {r["stage"]: r for r in summary["stages"]}
    assert by_stage["quantize"]["size_bytes"] < by_stage["distill"]["size_bytes"]  # int8 weights
    pruned = {w["layer"]: w["sparsity"] for w in summary["weight_stats"]["prune"]}
    assert pruned["body.0"] == pytest.approx(0.5, abs=0.01) and pruned["head"] < 0.1  # the head group is skipped


def test_same_config_gives_the_same_hashes(reference_run, tmp_path):
    summary, _ = reference_run
    again = run_builtin(tiny_config(tmp_path), progress=False)
    assert [r["weights_sha256"] for r in again["stages"]] == [r["weights_sha256"] for r in summary["stages"]]


class _Crash(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way up handles it."""


@pytest.mark.parametrize("crash_after", [1, 3, 5, 7, 9])  # checkpoint writes: 2 per stage, quantize 1
@pytest.mark.parametrize("mid_write", [False, True])
def test_resume_after_a_crash_reaches_the_reference_hash(reference_run, tmp_path, monkeypatch, crash_after,
                                                         mid_write):
    summary, _ = reference_run
    real_save, calls = checkpoint.save, []

    def crashing_save(directory, name, tensors, meta):
        calls.append(name)
        if len(calls) == crash_after:
            if mid_write:  # killed while writing: a partial temporary file, the old checkpoint intact
                (tmp_path / "checkpoints" / f"{name}.safetensors.tmp.1").write_bytes(b"partial")
                raise _Crash
            real_save(directory, name, tensors, meta)
            raise _Crash
        real_save(directory, name, tensors, meta)

    monkeypatch.setattr(checkpoint, "save", crashing_save)
    with pytest.raises(_Crash):
        run_builtin(tiny_config(tmp_path), progress=False)
    monkeypatch.setattr(checkpoint, "save", real_save)
    resumed = run_builtin(tiny_config(tmp_path), resume=True, progress=False)
    assert resumed["final_weights_sha256"] == summary["final_weights_sha256"], calls


def test_resume_refuses_another_config(tmp_path):
    run_builtin(tiny_config(tmp_path, prune=None, quantize=None), progress=False)
    with pytest.raises(checkpoint.CheckpointError, match="another config"):
        run_builtin(tiny_config(tmp_path, prune=None), resume=True, progress=False)


def test_corrupt_checkpoint_is_detected(tmp_path):
    run_builtin(tiny_config(tmp_path, prune=None, quantize=None), progress=False)
    path = tmp_path / "checkpoints" / "distill.final.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="sha256 does not match"):
        run_builtin(tiny_config(tmp_path, prune=None, quantize=None), resume=True, progress=False)


def test_nan_rows_are_skipped_and_all_nan_aborts(tmp_path, monkeypatch):
    import fastdistill.pipeline.data as data

    real = data.load_digits

    def poisoned(fraction):
        def load(*args):
            (x, y, ys), test = real(*args)
            x = x.clone()
            x[: int(len(x) * fraction)] = float("nan")
            return (x, y, ys), test
        return load

    monkeypatch.setattr(data, "load_digits", poisoned(0.002))  # a few rows: a few batches skipped
    summary = run_builtin(tiny_config(tmp_path / "a", prune=None, quantize=None), progress=False)
    assert all(n > 0 for n in summary["skipped_steps"].values()), summary["skipped_steps"]
    assert "step skipped" in (tmp_path / "a" / "report.md").read_text()
    monkeypatch.setattr(data, "load_digits", poisoned(1.0))
    with pytest.raises(NonFiniteError, match="consecutive steps with a non-finite"):
        run_builtin(tiny_config(tmp_path / "b", prune=None, quantize=None), progress=False)


def _write_config(tmp_path, out):
    import yaml

    from pipeline_cases import TINY

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output_dir": str(out), "prune": None, "quantize": None}))
    return str(path)


def test_verify_repro_passes_and_catches_nondeterminism(tmp_path, monkeypatch, capsys):
    cfg = _write_config(tmp_path, tmp_path / "out")
    assert main(["run", cfg, "--verify-repro", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verify_repro"]["ok"] and result["final_weights_sha256"]

    import fastdistill.pipeline.train as train

    real = train.global_batches

    def unseeded(n, batch_size, seed, stage, epoch):  # a deliberately non-deterministic data order
        return real(n, batch_size, int.from_bytes(os.urandom(4), "little"), stage, epoch)

    monkeypatch.setattr(train, "global_batches", unseeded)
    assert main(["run", cfg, "--verify-repro", "--no-progress"]) == 1
    assert "verify-repro: FAILED" in capsys.readouterr().out


def test_module_groups_prune_each_layer_their_way_and_ship_sparse_storage(tmp_path):
    groups = [{"match": "^head$", "skip": True}, {"match": r"^body\.0$", "pattern": "2:4"},
              {"match": r"^body\.2$", "pattern": "block", "sparsity": 0.5}]
    prune = {"epochs": 2, "sparsity": 0.75, "every": 2, "block_size": [16, 16], "optim": {"batch_size": 128},
             "groups": groups}
    models = {"teacher_hidden": [32], "student_hidden": [32, 32]}  # body.2: 2 x 2 blocks of 16 x 16
    summary = run_builtin(tiny_config(tmp_path, prune=prune, quantize=None, models=models), progress=False)
    sparsity = {w["layer"]: w["sparsity"] for w in summary["weight_stats"]["prune"]}
    assert sparsity["body.0"] == pytest.approx(0.5, abs=1e-6)  # 2:4: exactly half of every group of 4
    assert sparsity["body.2"] == pytest.approx(0.5, abs=1e-6) and sparsity["head"] < 0.1
    modules = json.loads((tmp_path / "export" / "manifest.json").read_text())["modules"]
    assert modules["body.0"] == modules["body.2"] == "SparseLinear" and modules["head"] == "Linear"
    by_stage = {r["stage"]: r for r in summary["stages"]}
    assert by_stage["prune"]["size_bytes"] < by_stage["distill"]["size_bytes"]
