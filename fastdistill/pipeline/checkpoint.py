"""Atomic checkpoints of a run: safetensors for tensors, JSON for the rest; nothing is ever pickled.

A checkpoint is `<name>.safetensors` + `<name>.json`, each written to a temporary file
(`<file>.tmp.<pid>`), flushed, fsynced and renamed into place, the JSON last: a checkpoint whose JSON
exists is complete, so a run killed at any instant leaves either the previous checkpoint or the new
one, never half of one (plus, after a kill, a temporary file that the next run removes).

The JSON records the safetensors file's sha256 and, in `integrity_sha256`, the sha256 of all its
other fields (epoch, optimizer hyper-parameters, run identity, that tensor hash): a change to either
half, or a deleted field, is refused on load.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import torch
from safetensors.torch import load_file

from fastdistill.cache.manifest import atomic_write, save_safetensors  # save_file: OSError on I/O failures

INTEGRITY_KEY = "integrity_sha256"
_TMP_SUFFIX = re.compile(r"\.tmp\.\d+$")  # what tmp_path() appends


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match the run."""


def tmp_path(path: str) -> str:
    return f"{path}.tmp.{os.getpid()}"


def remove_stale_tmp(directory: str) -> list[str]:
    """Deletes the temporary files that writers killed mid-write left in `directory` (not recursive)."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if _TMP_SUFFIX.search(name) and os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    return removed


def _write_then_rename(path: str, write) -> None:
    """write(tmp) then fsync and os.replace; the temporary file (named for stale-file cleanup) is removed
    if anything fails (ENOSPC)."""
    atomic_write(path, write, tmp=tmp_path(path))


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    _write_then_rename(path, write)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """save_file through a temporary file; I/O failures (a full disk) raise OSError and leave no file."""
    # safetensors refuses shared or non-contiguous storage: give it private contiguous copies.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    _write_then_rename(path, lambda tmp: save_safetensors(tensors, tmp))


def json_sha256(obj) -> str:
    """sha256 of a JSON value in canonical form (sorted keys, no whitespace): equal after a round trip."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(directory: str, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Writes <directory>/<name>.safetensors then <directory>/<name>.json (the commit point)."""
    os.makedirs(directory, exist_ok=True)
    st_path = os.path.join(directory, f"{name}.safetensors")
    atomic_save_safetensors(st_path, tensors)
    # Hash what a reader will see: the JSON round trip turns tuples into lists, int keys into strings.
    record = json.loads(json.dumps({**meta, "tensors_sha256": _sha256(st_path)}))
    atomic_write_json(os.path.join(directory, f"{name}.json"), {**record, INTEGRITY_KEY: json_sha256(record)})


def exists(directory: str, name: str) -> bool:
    return os.path.exists(os.path.join(directory, f"{name}.json"))


def load(directory: str, name: str, run_id: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The checkpoint's tensors and metadata, after checking both hashes and (if given) the run identity."""
    json_path = os.path.join(directory, f"{name}.json")
    st_path = os.path.join(directory, f"{name}.safetensors")
    try:
        with open(json_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{json_path}: unreadable checkpoint metadata: {e}") from None
    if not isinstance(meta, dict) or INTEGRITY_KEY not in meta:
        raise CheckpointError(f"{json_path}: no {INTEGRITY_KEY} (not a checkpoint of this fastdistill version, or "
                              f"edited); rerun without --resume")
    body = {k: v for k, v in meta.items() if k != INTEGRITY_KEY}
    if json_sha256(body) != meta[INTEGRITY_KEY]:
        raise CheckpointError(f"{json_path}: metadata sha256 does not match its {INTEGRITY_KEY}: the file was edited "
                              f"or is corrupt (epoch, optimizer settings or run identity); rerun without --resume")
    if run_id is not None and body.get("run_id") != run_id:
        raise CheckpointError(f"{json_path}: belongs to another run (run_id {body.get('run_id')!r}, this run is "
                              f"{run_id!r}); rerun without --resume")
    if not os.path.exists(st_path):
        raise CheckpointError(f"{st_path}: missing (its metadata {json_path} exists)")
    if _sha256(st_path) != body.get("tensors_sha256"):
        raise CheckpointError(f"{st_path}: sha256 does not match {json_path}: the file is corrupt or was replaced")
    return load_file(st_path), body


# --- optimizer state <-> flat tensors + JSON --------------------------------------------------------

def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict as flat tensors plus a JSON-able skeleton (no pickling needed)."""
    sd = opt.state_dict()
    tensors, skeleton = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, state in sd["state"].items():
        entry = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
                entry[key] = {"tensor": f"optim.{pid}.{key}"}
            else:
                entry[key] = value
        skeleton["state"][str(pid)] = entry
    return tensors, skeleton


def unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], skeleton: dict) -> None:
    state = {}
    for pid, entry in skeleton["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                           for k, v in entry.items()}
    opt.load_state_dict({"param_groups": skeleton["param_groups"], "state": state})
