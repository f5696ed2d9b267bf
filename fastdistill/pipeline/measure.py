"""What the pipeline measures after every stage: accuracy and loss, size on disk, CPU latency, weights."""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict:
    """Accuracy and mean cross-entropy on (x, y), in fixed batches (deterministic)."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch_size):
        out = model(x[i:i + batch_size]).float()
        loss += F.cross_entropy(out, y[i:i + batch_size], reduction="sum").item()
        correct += (out.argmax(-1) == y[i:i + batch_size]).sum().item()
    model.train(was_training)
    n = max(len(y), 1)
    return {"accuracy": correct / n, "loss": loss / n}


def size_on_disk(model: nn.Module) -> int:
    """Bytes of the model's state dict saved as safetensors (what `export` writes)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
             if isinstance(v, torch.Tensor)}
    return len(save(state))


@torch.inference_mode()
def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median CPU wall time of one forward pass over a batch, after warm-up (ms); a GPU model is timed
    on a CPU copy (the figure the report compares is CPU serving latency)."""
    import copy

    if any(t.device.type != "cpu" for t in model.state_dict().values()):
        model = copy.deepcopy(model).cpu()
    model = model.eval()
    x = x.cpu()
    for _ in range(3):
        model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def weight_stats(model: nn.Module) -> list[dict]:
    """Per-layer statistics of every module's `weight` (dense, masked, sparse or int8 alike)."""
    rows = []
    for name, module in model.named_modules():
        w = _dense_weight(module)
        if w is None:
            continue
        w = w.detach().float()
        rows.append({"layer": name, "shape": list(w.shape), "mean": w.mean().item(), "std": w.std().item(),
                     "max_abs": w.abs().max().item(), "sparsity": (w == 0).float().mean().item()})
    return rows


def _dense_weight(module: nn.Module) -> torch.Tensor | None:
    for method in ("dequantized_weight", "to_dense"):  # Int8Linear / SparseLinear expose their weight this way
        fn = getattr(module, method, None)
        if callable(fn):
            try:
                out = fn()
            except TypeError:
                continue
            return out.weight if isinstance(out, nn.Module) else out
    w = getattr(module, "weight", None)
    return w if isinstance(w, torch.Tensor) and w.dim() >= 2 else None
