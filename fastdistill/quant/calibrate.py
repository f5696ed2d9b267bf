"""calibrate: SmoothQuant per-channel migration factors from activation statistics.

For a linear layer with input channel j, a_j = max |x_j| over the calibration batches and
w_j = max_n |W[n, j]|; s_j = a_j^alpha / w_j^(1 - alpha) moves activation outliers into the weight
(x / s has flatter channels, W * s absorbs them), which per-token int8 activations need.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, *, smooth_alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Runs `model` on each batch (a tensor, or a tuple/list of positional arguments) and returns
    {name of each nn.Linear: smoothing factors s [in_features]} for quantize_(model, "w8a8", smooth=...)."""
    if not 0.0 <= float(smooth_alpha) <= 1.0:
        raise ValueError(f"smooth_alpha: must be in [0, 1], got {smooth_alpha}")
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    if not linears:
        raise ValueError("calibrate: the model has no nn.Linear layers (already quantized?)")
    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach()
            cur = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
            amax[name] = cur if name not in amax else torch.maximum(amax[name], cur)
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    count = 0
    try:
        for batch in batches:
            model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
            count += 1
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("calibrate: batches is empty (SmoothQuant needs activation statistics)")
    factors = {}
    for name, a in amax.items():
        w = linears[name].weight.detach().abs().amax(0).float()
        s = a.clamp(min=1e-5).pow(smooth_alpha) / w.clamp(min=1e-5).pow(1.0 - smooth_alpha)
        factors[name] = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))  # dead channels: no migration
    return factors
