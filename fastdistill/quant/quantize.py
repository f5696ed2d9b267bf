"""quantize_: replace the nn.Linear layers of a model by Int8Linear, in place."""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from fastdistill.nn.int8_linear import MODES, Int8Linear


def quantize_(model: nn.Module, mode: str = "w8a8", *, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
              group_size: Optional[int] = None, smooth: Optional[dict] = None, trainable: bool = False,
              backend: str = "auto") -> nn.Module:
    """Replaces every nn.Linear of `model` (for which filter_fn(module, qualified_name) is true) by an
    Int8Linear of `mode`; returns the model. smooth: the {name: factors} dict of calibrate() (layers not in
    it are not smoothed; only mode="w8a8" quantizes activations, so only it accepts smooth). Quantizing a
    model that already has Int8Linear layers raises."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if smooth is not None and mode != "w8a8":
        raise ValueError("smooth: SmoothQuant factors only apply to mode='w8a8' (w8a16 keeps float activations)")
    done = [name for name, m in model.named_modules() if isinstance(m, Int8Linear)]
    if done:
        raise ValueError(f"quantize_: the model is already quantized (Int8Linear at {done[0]!r}); "
                         "quantize the float model once")
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and (filter_fn is None or filter_fn(m, name))]
    if isinstance(model, nn.Linear):
        raise TypeError("quantize_: got a bare nn.Linear (it cannot be replaced in place); "
                        "use Int8Linear.from_linear")
    unknown = set(smooth or {}) - {name for name, _ in targets}
    if unknown:
        raise ValueError(f"smooth: names {sorted(unknown)} are not nn.Linear layers being quantized")
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(lin, mode, group_size=group_size, trainable=trainable,
                                                      smooth=(smooth or {}).get(name), backend=backend))
    return model
