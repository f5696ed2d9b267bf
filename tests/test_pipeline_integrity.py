"""Pipeline checkpoints on resume: the JSON half is covered by a hash, the run identity is required,
a checkpoint of another run is refused, temporary files of a killed write are removed."""
import errno
import json
import os
import shutil

import pytest
from safetensors import SafetensorError

from fastdistill.cache import manifest
from fastdistill.pipeline import CheckpointError, checkpoint, run_builtin
from pipeline_cases import tiny_config

# The teacher stage alone (2 epochs): the smallest run that writes checkpoints with optimizer state.
STAGES = {"distill": None, "prune": None, "quantize": None}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A finished run, kept as a pristine copy; the config names its output_dir, so tests resume in place."""
    root = tmp_path_factory.mktemp("integrity")
    out = root / "run"
    summary = run_builtin(tiny_config(out, **STAGES), progress=False)
    shutil.copytree(out, root / "pristine")
    return summary, out, root / "pristine"


@pytest.fixture
def run_dir(pristine):
    summary, out, copy = pristine
    shutil.rmtree(out)
    shutil.copytree(copy, out)
    return summary, out


def _resume(out):
    return run_builtin(tiny_config(out, **STAGES), resume=True, progress=False)


def _edit_json(path, fn):
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta, indent=2, sort_keys=True))


def test_untouched_run_resumes_to_the_same_hash(run_dir):
    summary, out = run_dir
    assert _resume(out)["final_weights_sha256"] == summary["final_weights_sha256"]


def test_deleted_checkpoint_json_is_the_crash_window_and_redone(run_dir):
    """Without its JSON (the commit point) a checkpoint was never committed, as after a kill between the two
    renames: the stage resumes from the previous checkpoint and, epochs being pure, reaches the same hash."""
    summary, out = run_dir
    os.remove(out / "checkpoints" / "teacher.final.json")
    assert _resume(out)["final_weights_sha256"] == summary["final_weights_sha256"]
    assert (out / "checkpoints" / "teacher.final.json").exists()


def test_flipped_epoch_digit_is_refused(run_dir):
    _, out = run_dir
    path = out / "checkpoints" / "teacher.final.json"
    text = path.read_text()
    assert '"epoch": 1,' in text
    path.write_text(text.replace('"epoch": 1,', '"epoch": 0,'))  # one digit: a bit flip on disk
    with pytest.raises(CheckpointError, match="teacher.final.json: metadata sha256 does not match"):
        _resume(out)


@pytest.mark.parametrize("edit", [
    lambda m: m["optimizer"]["param_groups"][0].update(lr=1.0),        # a hyper-parameter
    lambda m: m["optimizer"]["param_groups"][0].update(betas=[0.5, 0.5]),
    lambda m: m.pop("record"),                                         # a deleted field
    lambda m: m.update(run_id=None),                                   # the run identity
    lambda m: m.update(tensors_sha256="0" * 64),
])
def test_edited_metadata_is_refused(run_dir, edit):
    _, out = run_dir
    _edit_json(out / "checkpoints" / "teacher.final.json", edit)
    with pytest.raises(CheckpointError, match="metadata sha256 does not match"):
        _resume(out)


def test_metadata_without_integrity_hash_is_refused(run_dir):
    _, out = run_dir
    _edit_json(out / "checkpoints" / "teacher.final.json", lambda m: m.pop(checkpoint.INTEGRITY_KEY))
    with pytest.raises(CheckpointError, match=f"no {checkpoint.INTEGRITY_KEY}"):
        _resume(out)


def test_checkpoint_of_another_run_is_refused(run_dir):
    """A self-consistent checkpoint (hash recomputed) whose run identity is not this run's."""
    _, out = run_dir

    def other_run(m):
        m["run_id"] = "0" * 64
        m[checkpoint.INTEGRITY_KEY] = checkpoint.json_sha256({k: v for k, v in m.items()
                                                              if k != checkpoint.INTEGRITY_KEY})

    _edit_json(out / "checkpoints" / "teacher.final.json", other_run)
    with pytest.raises(CheckpointError, match="belongs to another run"):
        _resume(out)


def test_deleted_run_identity_is_refused(run_dir):
    _, out = run_dir
    os.remove(out / "checkpoints" / "run.json")
    with pytest.raises(CheckpointError, match="run.json is missing"):
        _resume(out)
    assert (out / "checkpoints" / "teacher.final.json").exists()  # nothing deleted by the refusal


@pytest.mark.parametrize("text,message", [("{not json", "is unreadable"), ("[1, 2]", "not a fastdistill run identity"),
                                          ('{"config": {}}', "not a fastdistill run identity")])
def test_garbage_run_identity_is_refused(run_dir, text, message):
    _, out = run_dir
    (out / "checkpoints" / "run.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        _resume(out)


def test_resume_removes_temporary_files_of_a_killed_write(run_dir):
    summary, out = run_dir
    ckpt = out / "checkpoints"
    stale = [ckpt / "teacher.last.safetensors.tmp.4242", ckpt / "teacher.final.json.tmp.7", out / "manifest.json.tmp.99",
             out / "report.md.tmp.99", out / "export" / "student.safetensors.tmp.5"]
    for path in stale:
        path.write_bytes(b"partial")
    (out / "notes.tmp").write_text("mine")  # not a name an atomic write leaves: kept
    assert _resume(out)["final_weights_sha256"] == summary["final_weights_sha256"]
    assert [p.name for p in stale if p.exists()] == []
    assert (out / "notes.tmp").read_text() == "mine"


def test_failed_write_leaves_no_temporary_file_and_raises_oserror(tmp_path, monkeypatch):
    """A full disk: safetensors reports ENOSPC as its own error type after writing part of the file."""
    import torch

    def full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(manifest, "save_file", full_disk)
    with pytest.raises(OSError) as info:
        checkpoint.save(str(tmp_path), "x", {"w": torch.zeros(3)}, {"epoch": 0})
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []

    def full_disk_json(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.undo()
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: full_disk_json() if dst.endswith(".json") else
                        real_replace(src, dst))
    with pytest.raises(OSError):
        checkpoint.save(str(tmp_path), "x", {"w": torch.zeros(3)}, {"epoch": 0})
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors"]  # no JSON: not a checkpoint, no temporary file left
