"""prune_: masks for the Linear layers of a model, kept through training (the guards: sparse/masks.py).

Re-pruning a pruned layer only adds zeros (already-pruned weights score lowest), so masks only grow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from fastdistill.sparse.formats import check_block_size
from fastdistill.sparse.masks import (PATTERNS, check_model, install_mask, re_arm, reapply_masks,  # noqa: F401
                                      remove_masks, restore_masks)

CRITERIA = ("magnitude", "wanda")
SCOPES = ("layer", "global")


@dataclass
class PruneReport:
    """Per-layer (zeros, numel) of the weights after pruning, and the totals."""
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)

    def sparsity(self, name: str) -> float:
        zeros, numel = self.layers[name]
        return zeros / max(1, numel)

    @property
    def global_sparsity(self) -> float:
        return sum(z for z, _ in self.layers.values()) / max(1, sum(n for _, n in self.layers.values()))

    def __str__(self) -> str:
        lines = [f"{'layer':40s} {'numel':>12s} {'sparsity':>9s}"]
        lines += [f"{name:40s} {n:12d} {z / max(1, n):9.4f}" for name, (z, n) in self.layers.items()]
        lines.append(f"{'global':40s} {sum(n for _, n in self.layers.values()):12d} {self.global_sparsity:9.4f}")
        return "\n".join(lines)


def report(model: nn.Module, filter_fn: Callable | None = None) -> PruneReport:
    """Zeros per target Linear layer (pruned or not) of the model."""
    check_model(model)
    out = PruneReport()
    for name, mod in _targets(model, filter_fn):
        out.layers[name] = (int((mod.weight == 0).sum()), mod.weight.numel())
    return out


def _targets(model: nn.Module, filter_fn) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and (filter_fn is None or filter_fn(m, n))]


def _input_norms(model: nn.Module, targets, calibration: Iterable) -> dict[str, torch.Tensor]:
    """‖x_j‖ per input feature of every target layer over the calibration batches (Wanda's statistic)."""
    sums = {name: torch.zeros(mod.in_features, dtype=torch.float64, device=mod.weight.device)
            for name, mod in targets}
    handles, batches = [], 0
    for name, mod in targets:
        def hook(m, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            sums[name] += x.double().pow(2).sum(0)
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in calibration:
                model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
                batches += 1
    finally:
        for h in handles:
            h.remove()
    if batches == 0:  # all-zero norms would score every weight 0: pruning by position, not by importance
        raise ValueError("calibration: empty; criterion='wanda' needs at least one batch of inputs")
    return {name: s.sqrt().float() for name, s in sums.items()}


def _scores(mod: nn.Linear, norm: torch.Tensor | None) -> torch.Tensor:
    """Importance of each weight; already-pruned weights score -1 (below any real score) so masks only grow."""
    s = mod.weight.detach().abs().float()
    if norm is not None:
        s = s * norm[None, :]
    mask = getattr(mod, "weight_mask", None)
    return s if mask is None else torch.where(mask, s, torch.full_like(s, -1.0))


def _block_scores(s: torch.Tensor, bn: int, bk: int, name: str) -> torch.Tensor:
    N, K = s.shape
    if N % bn or K % bk:
        raise ValueError(f"block_size: layer {name!r} weight ({N}, {K}) is not divisible by ({bn}, {bk})")
    blocks = s.reshape(N // bn, bn, K // bk, bk)
    # A block keeps its pruned elements' -1 only if the whole block is pruned.
    return torch.where((blocks < 0).all(3).all(1), -1.0, blocks.clamp(min=0).sum((1, 3)))


def _keep_top(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Masks keeping all but the round(sparsity * total) lowest scores over all the given tensors."""
    flat = torch.cat([s.flatten() for s in scores])
    k = int(round(sparsity * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.argsort(flat, stable=True)[:k]] = False
    return list(keep.split([s.numel() for s in scores]))


def prune_(model: nn.Module, sparsity: float, *, pattern: str = "unstructured", block_size=(32, 32),
           criterion: str = "magnitude", scope: str = "layer", filter_fn: Callable | None = None,
           calibration: Iterable | None = None) -> PruneReport:
    """Prunes the nn.Linear layers of `model` (those where filter_fn(module, name) is true) in place.

    sparsity: fraction of zeros, in [0, 1) (for "2:4" it must be 0.5). pattern: "unstructured" elements,
    "2:4" (2 of every 4 consecutive inputs kept) or "block" (whole block_size blocks). criterion:
    "magnitude" |W| or "wanda" |W|·‖x‖ with ‖x‖ per input feature from `calibration` (an iterable of model
    inputs). scope: "layer" (each layer hits `sparsity`) or "global" (one ranking over all layers).
    Returns a PruneReport of per-layer and global sparsity."""
    check_model(model)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0 \
            or math.isnan(sparsity):
        raise ValueError(f"sparsity: expected a number in [0, 1), got {sparsity!r}")
    if pattern not in PATTERNS:
        raise ValueError(f"pattern: unknown {pattern!r}; expected one of {PATTERNS}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: unknown {criterion!r}; expected one of {CRITERIA}")
    if scope not in SCOPES:
        raise ValueError(f"scope: unknown {scope!r}; expected one of {SCOPES}")
    if pattern == "2:4" and sparsity != 0.5:
        raise ValueError(f"sparsity: the 2:4 pattern prunes exactly 0.5, got {sparsity}")
    bn, bk = check_block_size(block_size) if pattern == "block" else (1, 1)
    targets = _targets(model, filter_fn)
    if not targets:
        raise ValueError("model: no nn.Linear layer to prune (check filter_fn)")
    norms = {}
    if criterion == "wanda":
        if calibration is None:
            raise ValueError("calibration: criterion='wanda' needs calibration batches (an iterable of inputs)")
        norms = _input_norms(model, targets, calibration)
    scores = [_scores(mod, norms.get(name)) for name, mod in targets]
    if pattern == "2:4":
        for (name, mod), s in zip(targets, scores):
            if s.shape[1] % 4:
                raise ValueError(f"pattern: 2:4 needs in_features divisible by 4; layer {name!r} has {s.shape[1]}")
            top = s.reshape(s.shape[0], -1, 4).topk(2, dim=-1).indices
            keep = torch.zeros(s.shape[0], s.shape[1] // 4, 4, dtype=torch.bool, device=s.device)
            install_mask(mod, keep.scatter_(-1, top, True).reshape(s.shape), "2:4", None)
        return report(model, filter_fn)
    if pattern == "block":
        scores = [_block_scores(s, bn, bk, name) for (name, _), s in zip(targets, scores)]
    if scope == "global":
        keeps = _keep_top(scores, sparsity)
    else:
        keeps = [_keep_top([s], sparsity)[0] for s in scores]
    for (name, mod), s, keep in zip(targets, scores, keeps):
        keep = keep.reshape(s.shape)
        if pattern == "block":
            keep = keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
        install_mask(mod, keep, pattern, (bn, bk) if pattern == "block" else None)
    return report(model, filter_fn)
