"""calibrate: SmoothQuant per-channel migration factors from activation statistics.

For a linear layer with input channel j, a_j = max |x_j| over the calibration batches and
w_j = max_n |W[n, j]|; s_j = a_j^alpha / w_j^(1 - alpha) moves activation outliers into the weight
(x / s has flatter channels, W * s absorbs them), which per-token int8 activations need.
A batch with inf/NaN activations (or a layer with non-finite weights) raises: one inf would make its
channel's factor inf and every output of the smoothed layer NaN.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from fastdistill.nn.int8_linear import check_smooth
from fastdistill.ops.common import check_number
from fastdistill.quant.quantize import check_model


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, *, smooth_alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Runs `model` on each batch (a tensor, or a tuple/list of positional arguments) and returns
    {name of each nn.Linear: smoothing factors s [in_features]} for quantize_(model, "w8a8", smooth=...)."""
    check_model(model, "calibrate")
    smooth_alpha = check_number("smooth_alpha", smooth_alpha, low=0.0, high=1.0)
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    if not linears:
        raise ValueError("calibrate: the model has no nn.Linear layers (already quantized?)")
    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach()
            cur = x.reshape(-1, x.shape[-1]).abs().amax(0).float()  # amax propagates NaN
            amax[name] = cur if name not in amax else torch.maximum(amax[name], cur)
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    count = 0
    try:
        for batch in batches:
            model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
            _check_finite_stats(amax, count)  # one host sync per batch, to name the batch
            count += 1
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("calibrate: batches is empty (SmoothQuant needs activation statistics)")
    factors = {}
    for name, a in amax.items():
        w = linears[name].weight.detach().abs().amax(0).float()
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"model: layer {name!r} has inf/NaN weights; SmoothQuant factors would be invalid")
        s = a.clamp(min=1e-5).pow(smooth_alpha) / w.clamp(min=1e-5).pow(1.0 - smooth_alpha)
        factors[name] = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))  # dead channels: no migration
        check_smooth(f"calibrate: factors of {name!r}", factors[name], w.shape[0])  # finite, > 0 by construction
    return factors


def _check_finite_stats(amax: dict[str, torch.Tensor], batch: int) -> None:
    for name, a in amax.items():
        if not bool(torch.isfinite(a).all()):
            j = int((~torch.isfinite(a)).nonzero()[0, 0])
            raise ValueError(f"batches: batch {batch} gives inf/NaN activations at the input of layer {name!r} "
                             f"(input channel {j}); calibrate on finite data")
