"""`fastdistill run|demo` on a hostile disk or bad files: one line `fastdistill: ...` on stderr, exit 2."""
import errno
import os

import pytest
import yaml
from safetensors import SafetensorError

from fastdistill.cache import manifest
from fastdistill.cli import main
from fastdistill.pipeline import checkpoint
from pipeline_cases import TINY

STAGES = {"distill": None, "prune": None, "quantize": None}


def _config(tmp_path, out, **overrides):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**TINY, **STAGES, **overrides, "output_dir": str(out)}))
    return str(path)


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.startswith("fastdistill: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_output_dir_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a directory")
    assert main(["run", _config(tmp_path, out), "--no-progress"]) == 2
    _one_line_error(capsys, "Not a directory", str(out))


def test_output_dir_under_a_file(tmp_path, capsys):
    """What a read-only output disk looks like to a root user, whom chmod does not stop."""
    (tmp_path / "file").write_text("x")
    assert main(["run", _config(tmp_path, tmp_path / "file" / "out"), "--no-progress"]) == 2
    _one_line_error(capsys, "Not a directory")


def test_read_only_output_disk(tmp_path, capsys, monkeypatch):
    real = os.makedirs

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "out")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", read_only)
    assert main(["run", _config(tmp_path, tmp_path / "out"), "--no-progress"]) == 2
    _one_line_error(capsys, "Read-only file system", str(tmp_path / "out"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["run", _config(tmp_path, ro / "out"), "--no-progress"]) == 2
    finally:
        ro.chmod(0o755)
    _one_line_error(capsys, "Permission denied")


def test_full_output_disk(tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as SafetensorError after a partial write."""
    def full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(manifest, "save_file", full)
    out = tmp_path / "out"
    assert main(["run", _config(tmp_path, out), "--no-progress"]) == 2
    _one_line_error(capsys, "No space left on device")
    assert not [n for n in os.listdir(out / "checkpoints") if ".tmp." in n]


def test_full_disk_while_writing_json(tmp_path, capsys, monkeypatch):
    real = checkpoint.atomic_write_bytes

    def full(path, data):
        if path.endswith("run.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", full)
    assert main(["run", _config(tmp_path, tmp_path / "out"), "--no-progress"]) == 2
    _one_line_error(capsys, "No space left on device", "run.json")


@pytest.mark.parametrize("text", ["{garbage", "\x00\xff", "[]"])
def test_garbage_run_json_on_resume(tmp_path, capsys, text):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "run.json").write_text(text)
    cfg = _config(tmp_path, out)
    assert main(["run", cfg, "--no-progress", "--resume"]) == 2
    _one_line_error(capsys, "run.json")


def test_wrong_shape_teacher_checkpoint(tmp_path, capsys):
    from safetensors.torch import save_file

    from fastdistill.pipeline.data import make_mlp

    wrong = make_mlp(64, [7], 10, seed=0)  # the config's teacher has one hidden layer of 32
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in wrong.state_dict().items()}, str(path))
    teacher = {**TINY["teacher"], "checkpoint": str(path)}
    assert main(["run", _config(tmp_path, tmp_path / "out", teacher=teacher), "--no-progress"]) == 2
    _one_line_error(capsys, "teacher.checkpoint", "does not fit the teacher model", "size mismatch")


def test_unreadable_teacher_checkpoint(tmp_path, capsys):
    path = tmp_path / "teacher.safetensors"
    path.write_bytes(b"\x00" * 16)
    teacher = {**TINY["teacher"], "checkpoint": str(path)}
    assert main(["run", _config(tmp_path, tmp_path / "out", teacher=teacher), "--no-progress"]) == 2
    _one_line_error(capsys, "teacher.checkpoint: cannot load")
