"""Reproducibility: seeding, deterministic mode, content hashes and the run manifest.

Each epoch reseeds every generator from (seed, stage, epoch), so an epoch is a pure function of the
weights and optimizer state it starts from: a resumed run needs no saved RNG state to retrace an
uninterrupted one, and two runs with the same config produce the same hashes stage by stage.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import subprocess

import torch


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed from the run seed and any labels (stage name, epoch, ...), stable across processes."""
    text = json.dumps([seed, *parts])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    import numpy as np  # the `pipeline` extra: `import fastdistill.pipeline` works without it

    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """torch.use_deterministic_algorithms plus the settings it needs (cuBLAS workspace, cudnn)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = not enabled
    torch.backends.cudnn.deterministic = enabled


def tensor_digest(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def hash_state(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict: names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        value = state[name]
        if isinstance(value, torch.Tensor):
            tensor_digest(h, value)
        else:  # extra_state and other non-tensor entries
            h.update(repr(value).encode())
    return h.hexdigest()


def hash_tensors(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        tensor_digest(h, t)
    return h.hexdigest()



def git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device, world_size: int) -> dict:
    import numpy as np

    import fastdistill

    return {
        "fastdistill": fastdistill.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "world_size": world_size,
        "git_commit": git_commit(),
    }
