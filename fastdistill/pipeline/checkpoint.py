"""Atomic checkpoints of a run: safetensors for tensors, JSON for the rest; nothing is ever pickled.

A checkpoint is `<name>.safetensors` + `<name>.json`, each written to a temporary file, flushed,
fsynced and renamed into place, the JSON last: a checkpoint whose JSON exists is complete, so a
run killed at any instant leaves either the previous checkpoint or the new one, never half of one.
The JSON records the safetensors file's sha256, checked on load.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match the run."""


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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
    tmp = f"{st_path}.tmp.{os.getpid()}"
    # safetensors refuses shared or non-contiguous storage: give it private contiguous copies.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, st_path)
    atomic_write_json(os.path.join(directory, f"{name}.json"), {**meta, "tensors_sha256": _sha256(st_path)})


def exists(directory: str, name: str) -> bool:
    return os.path.exists(os.path.join(directory, f"{name}.json"))


def load(directory: str, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    json_path = os.path.join(directory, f"{name}.json")
    st_path = os.path.join(directory, f"{name}.safetensors")
    try:
        with open(json_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{json_path}: unreadable checkpoint metadata: {e}") from None
    if not os.path.exists(st_path):
        raise CheckpointError(f"{st_path}: missing (its metadata {json_path} exists)")
    if _sha256(st_path) != meta.get("tensors_sha256"):
        raise CheckpointError(f"{st_path}: sha256 does not match {json_path}: the file is corrupt or was replaced")
    return load_file(st_path), meta


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
