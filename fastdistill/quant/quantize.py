"""quantize_: replace the nn.Linear layers of a model by Int8Linear, in place."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Optional

from torch import nn

from fastdistill.nn.int8_linear import MODES, Int8Linear, check_smooth


def check_model(model, fn: str) -> None:
    """`model` is an nn.Module (a tensor passed by mistake gets a TypeError, not an AttributeError)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__} ({fn}(model, ...))")


def quantize_(model: nn.Module, mode: str = "w8a8", *, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
              group_size: Optional[int] = None, smooth: Optional[dict] = None, trainable: bool = False,
              backend: str = "auto", validate: bool = False) -> nn.Module:
    """Replaces every nn.Linear of `model` (for which filter_fn(module, qualified_name) is true) by an
    Int8Linear of `mode`; returns the model. smooth: the {name: factors} dict of calibrate() (layers not in
    it are not smoothed; only mode="w8a8" quantizes activations, so only it accepts smooth; factors must be
    finite and > 0). validate: the layers refuse inf/NaN activations. Quantizing a model that already has
    Int8Linear layers raises. float64 models work (the layers compute in float32, return float64)."""
    check_model(model, "quantize_")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if smooth is not None and not isinstance(smooth, Mapping):
        raise TypeError(f"smooth: expected a dict {{layer name: factors}} (from calibrate()), got "
                        f"{type(smooth).__name__}")
    if smooth is not None and mode != "w8a8":
        raise ValueError("smooth: SmoothQuant factors only apply to mode='w8a8' (w8a16 keeps float activations)")
    if isinstance(model, nn.Linear):
        raise TypeError("model: a bare nn.Linear cannot be replaced in place; use Int8Linear.from_linear")
    done = [name for name, m in model.named_modules() if isinstance(m, Int8Linear)]
    if done:
        raise ValueError(f"quantize_: the model is already quantized (Int8Linear at {done[0]!r}); "
                         "quantize the float model once")
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and (filter_fn is None or filter_fn(m, name))]
    smooth = dict(smooth or {})
    unknown = set(smooth) - {name for name, _ in targets}
    if unknown:
        raise ValueError(f"smooth: names {sorted(unknown)} are not nn.Linear layers being quantized")
    for name, lin in targets:  # all factors checked before any layer is replaced
        if name in smooth:
            check_smooth(f"smooth[{name!r}]", smooth[name], lin.in_features)
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(lin, mode, group_size=group_size, trainable=trainable,
                                                      smooth=smooth.get(name), backend=backend, validate=validate))
    return model
