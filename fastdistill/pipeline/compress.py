"""The prune and quantize stages: each compresses the student, then recovers it by distillation.

Module groups (regex on module names, first match wins) give per-layer settings: e.g. attention
layers 2:4, MLP layers block-sparse at 90%, the head neither pruned nor quantized.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _group_of(name: str, groups):
    return next((g for g in groups if re.search(g.match, name)), None)


def prune_plan(cfg, model: nn.Module) -> dict[tuple[float, str], list[str]]:
    """{(sparsity, pattern): [layer names]} for the Linear layers the prune stage touches."""
    plan: dict[tuple[float, str], list[str]] = {}
    for name in _linear_names(model):
        g = _group_of(name, cfg.groups)
        if g is not None and g.skip:
            continue
        pattern = (g.pattern if g is not None and g.pattern else cfg.pattern)
        sparsity = g.sparsity if g is not None and g.sparsity is not None else cfg.sparsity
        plan.setdefault((0.5 if pattern == "2:4" else sparsity, pattern), []).append(name)
    return plan


def prune_stage(p) -> None:
    """Installs masks, ramps sparsity with GradualPruner (cubic schedule) while distilling, keeps the masks."""
    from fastdistill.sparse.gradual import GradualPruner
    from fastdistill.sparse.prune import prune_

    cfg, model = p.cfg.prune, p.student
    plan = prune_plan(cfg, model)
    if not plan:
        raise ValueError("prune.groups: every Linear layer is skipped; nothing to prune")
    steps = cfg.epochs * math.ceil(len(p.y) / cfg.optim.batch_size)
    end = max(1, int(cfg.ramp_fraction * steps)) - 1
    calibration = [p.x[i:i + 256] for i in range(0, min(len(p.x), 1024), 256)]
    pruners = []
    for (sparsity, pattern), names in plan.items():
        keep = set(names)
        kwargs = dict(block_size=tuple(cfg.block_size), criterion=cfg.criterion,
                      filter_fn=lambda m, n, keep=keep: n in keep,  # (module, name), as in quantize_
                      calibration=calibration if cfg.criterion == "wanda" else None)
        if pattern == "2:4":  # one fixed sparsity: pruned once, then recovered
            prune_(model, 0.5, pattern="2:4", **kwargs)
        else:
            prune_(model, 0.0, pattern=pattern, **kwargs)  # masks exist from the start (resume loads them)
            pruners.append(GradualPruner(model, sparsity, start_step=0, end_step=end, every=cfg.every,
                                         pattern=pattern, **kwargs))

    def after_step(_step):
        for pr in pruners:
            pr.step()

    def extra_state():
        return {}, {"pruner_steps": [pr.state_dict()["step_count"] for pr in pruners]}

    def load_extra(_tensors, meta):
        for pr, n in zip(pruners, meta.get("pruner_steps", [])):
            pr.load_state_dict({"step_count": n})

    p._distill_stage("prune", model, cfg.epochs, cfg.optim, after_step, extra_state, load_extra)
    p.prune_masks = {n: m.weight_mask.detach().clone() for n, m in model.named_modules()
                     if isinstance(getattr(m, "weight_mask", None), torch.Tensor)}


def deployable(model: nn.Module) -> nn.Module:
    """A copy of a pruned model in the storage it would ship in: block / 2:4 layers as SparseLinear
    (compressed values + indices), unstructured layers as dense weights holding their zeros, no masks."""
    import copy
    import warnings

    from fastdistill.sparse import remove_masks, sparsify_

    out = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no pruned layers" / "unstructured stays dense" are expected here
        sparsify_(out)
    remove_masks(out)
    return out


def quantize_stage(p) -> None:
    """SmoothQuant calibration, trainable int8 layers recovered by distillation, then frozen int8."""
    from fastdistill import quant
    from fastdistill.sparse.prune import remove_masks

    cfg, model = p.cfg.quantize, p.student
    masks = getattr(p, "prune_masks", {})
    remove_masks(model)  # the int8 layers replace the masked Linears; their masks are re-applied below

    def wanted(module, name):
        g = _group_of(name, cfg.groups)
        return type(module) is nn.Linear and not (g is not None and g.skip)

    smooth = None
    if cfg.smooth_alpha is not None and cfg.mode == "w8a8":  # w8a16 keeps float activations: nothing to smooth
        factors = quant.calibrate(model, list(p.x.split(256)[:cfg.calibration_batches]), smooth_alpha=cfg.smooth_alpha)
        smooth = {n: f for n, f in factors.items() if wanted(model.get_submodule(n), n)}
    quant.quantize_(model, cfg.mode, filter_fn=wanted, group_size=cfg.group_size, smooth=smooth, trainable=True)
    masked = {n: masks[n] for n, m in model.named_modules() if n in masks and isinstance(m, quant.Int8Linear)}

    def after_step(_step):  # pruned weights stay zero in the master weights, so they quantize to exact 0
        with torch.no_grad():
            modules = dict(model.named_modules())
            for name, mask in masked.items():
                modules[name].weight.mul_(mask)

    after_step(0)
    p._distill_stage("quantize", model, cfg.epochs, cfg.optim, after_step)
    quant.freeze_(model)  # trainable int8 layers → int8 weights and scales only
