"""freeze_: trainable Int8Linear layers (fp32 master weights) → inference Int8Linear (int8 + scales only)."""
from __future__ import annotations

import torch
from torch import nn

from fastdistill.nn.int8_linear import Int8Linear
from fastdistill.quant.quantize import check_model


@torch.no_grad()
def freeze_(model: nn.Module) -> dict[str, Int8Linear]:
    """Replaces every trainable Int8Linear of `model` in place by a non-trainable one holding exactly the
    int8 weights and scales the trainable layer computes with (quantized from its master weight now),
    so the frozen model's outputs are bitwise those of the trained one. Returns the new layers by name."""
    check_model(model, "freeze_")
    if isinstance(model, Int8Linear):
        raise TypeError("model: a bare Int8Linear cannot be replaced in place; use Int8Linear.frozen()")
    frozen = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Int8Linear) and mod.trainable:
            parent_name, _, child = name.rpartition(".")
            new = mod.frozen()
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            frozen[name] = new
    return frozen
