"""Masks of pruned Linear layers and the guards that keep their pruned weights exactly zero in training.

A pruned layer holds `weight_mask` (bool buffer, in the state dict) and `_fd_prune_pattern`, and is guarded by
  1. a gradient hook on the weight that multiplies weight.grad by the mask (no gradient reaches pruned weights);
  2. a global optimizer step post-hook (torch.optim.optimizer.register_optimizer_step_post_hook) that re-applies
     every armed mask right after any optimizer step, undoing what momentum buffers and (decoupled) weight
     decay would move back into pruned positions;
  3. a load_state_dict post-hook that re-applies the mask to the weights just loaded.
Tensor hooks and module-level Python sets do not survive copy.deepcopy or pickling (torch.save of the whole
module): the copy has a new weight Parameter without hooks. So the layer also carries a forward pre-hook (a
module hook, which deepcopy and pickle do keep) that re-arms 1 and 2 on the first forward of a copy, before any
backward or step can run. Not while torch.compile traces: arm a copy with re_arm(model) (or one eager forward)
before compiling it.
A fresh model takes a pruned state dict through restore_masks (then load_state_dict); a plain strict
load_state_dict of it refuses the unexpected `weight_mask` keys.
"""
from __future__ import annotations

import weakref
from typing import Mapping

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from fastdistill.sparse.formats import check_block_size

PATTERNS = ("unstructured", "2:4", "block")

_PRUNED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_step_hook = None


class _MaskGrad:
    """weight.grad * weight_mask of the layer (read at backward time, so grown masks apply)."""
    __torch_unserializable__ = True  # pickling drops tensor hooks (no warning): the forward pre-hook re-arms

    def __init__(self, mod: nn.Module):
        self.module = weakref.ref(mod)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        mod = self.module()
        mask = None if mod is None else mod._buffers.get("weight_mask")
        return grad if mask is None else grad * mask


def check_model(model, name: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: expected a torch.nn.Module, got {type(model).__name__}")


def reapply_masks(*_args) -> None:
    """Multiplies every armed layer's weight by its mask (runs after each torch.optim step)."""
    with torch.no_grad():
        for mod in list(_PRUNED):
            mask = mod._buffers.get("weight_mask")
            if mask is not None:
                mod.weight.mul_(mask)


def _grad_hooks(mod: nn.Module) -> list:
    hooks = getattr(mod.weight, "_backward_hooks", None) or {}
    return [k for k, h in hooks.items() if isinstance(h, _MaskGrad) and h.module() is mod]


def re_arm(model: nn.Module) -> None:
    """Arms guards 1 and 2 of every pruned layer of `model` for its current weight (a no-op where armed).
    Needed by hand only for a copy compiled before its first eager forward."""
    check_model(model)
    for mod in model.modules():
        _arm(mod)


def _arm(mod: nn.Module) -> None:
    global _step_hook
    if "weight_mask" not in mod._buffers:
        return
    if mod.weight.requires_grad and not _grad_hooks(mod):  # a frozen weight gets no gradient to mask
        mod.weight.register_hook(_MaskGrad(mod))
    _PRUNED.add(mod)
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(reapply_masks)


def _arm_before_forward(mod: nn.Module, _args) -> None:
    if not torch.compiler.is_compiling():
        _arm(mod)


def _after_load(mod: nn.Module, _incompatible_keys) -> None:
    mask = mod._buffers.get("weight_mask")
    if mask is not None:
        with torch.no_grad():
            mod.weight.mul_(mask)
        _arm(mod)  # load_state_dict(assign=True) may have brought a new weight Parameter


def install_mask(mod: nn.Linear, mask: torch.Tensor, pattern: str, block_size) -> None:
    """Sets (or replaces) the layer's mask, zeroes its pruned weights and arms the guards."""
    if "weight_mask" in mod._buffers:
        mod.weight_mask.copy_(mask)
    else:
        mod.register_buffer("weight_mask", mask)
        mod.register_forward_pre_hook(_arm_before_forward)
        mod.register_load_state_dict_post_hook(_after_load)
    mod._fd_prune_pattern = (pattern, block_size)
    with torch.no_grad():
        mod.weight.mul_(mod.weight_mask)
    _arm(mod)


def remove_masks(model: nn.Module) -> None:
    """Drops masks and hooks (the weights keep their zeros)."""
    check_model(model)
    for mod in model.modules():
        if "weight_mask" not in getattr(mod, "_buffers", {}):
            continue
        for key in _grad_hooks(mod):
            del mod.weight._backward_hooks[key]
        for hooks, fn in ((mod._forward_pre_hooks, _arm_before_forward),
                          (mod._load_state_dict_post_hooks, _after_load)):
            for key in [k for k, h in hooks.items() if h is fn]:
                del hooks[key]
        del mod._buffers["weight_mask"]
        mod.__dict__.pop("_fd_prune_pattern", None)
        _PRUNED.discard(mod)


def _check_pattern(key: str, mask: torch.Tensor, pattern: str, block_size) -> None:
    N, K = mask.shape
    if pattern == "2:4" and (K % 4 or bool((mask.reshape(N, -1, 4).sum(-1) > 2).any())):
        raise ValueError(f"{key}: not a 2:4 mask (some group of 4 inputs keeps more than 2)")
    if pattern == "block":
        bn, bk = block_size
        if N % bn or K % bk:
            raise ValueError(f"{key}: shape ({N}, {K}) is not divisible by block_size ({bn}, {bk})")
        blocks = mask.reshape(N // bn, bn, K // bk, bk)
        if not bool((blocks == blocks[:, :1, :, :1]).all()):
            raise ValueError(f"{key}: not a block mask of block_size ({bn}, {bk})")


def restore_masks(model: nn.Module, state_dict: Mapping, *, pattern: str = "unstructured",
                  block_size=(32, 32)) -> list[str]:
    """Arms the masks of a pruned model's state dict on a fresh model: every nn.Linear named by a
    `<name>.weight_mask` entry gets that mask and the guards; then `model.load_state_dict(state_dict)` loads
    the weights. `pattern`/`block_size` record how the layers were pruned (what sparsify_ compresses; the
    masks are checked against it). Returns the names of the masked layers. Raises when the state dict holds
    no mask."""
    check_model(model)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__}")
    if pattern not in PATTERNS:
        raise ValueError(f"pattern: unknown {pattern!r}; expected one of {PATTERNS}")
    block_size = check_block_size(block_size) if pattern == "block" else None
    keys = [k for k in state_dict if k == "weight_mask" or str(k).endswith(".weight_mask")]
    if not keys:
        raise ValueError("state_dict: no '<layer>.weight_mask' entry: not the state dict of a pruned model")
    found = []
    for key in keys:
        name = key[: -len("weight_mask")].rstrip(".")
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{key}: the model has no module {name!r}") from None
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"{key}: {name!r} is a {type(mod).__name__}, not an nn.Linear")
        mask = state_dict[key]
        if not isinstance(mask, torch.Tensor) or mask.shape != mod.weight.shape:
            raise ValueError(f"{key}: expected a mask of shape {tuple(mod.weight.shape)}, got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        mask = mask.to(device=mod.weight.device, dtype=torch.bool)
        _check_pattern(key, mask, pattern, block_size)
        install_mask(mod, mask.clone(), pattern, block_size)
        found.append(name)
    return found
