"""The stage losses: cross-entropy for the teacher and the baseline, and the distillation objective
(fused soft loss + hard labels + optional hidden-state pairs) for distill, prune and quantize.

Each returns the sum of its rows' losses over the GLOBAL row count of the step (see train.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fastdistill
from fastdistill.nn.hidden_distill_loss import HiddenDistillLoss
from fastdistill.pipeline.config import Distill
from fastdistill.pipeline.data import UNLABELLED


def cross_entropy(x: torch.Tensor, y: torch.Tensor):
    def loss_fn(forward, rows, n_global):
        out = forward(x[rows]).float()
        return F.cross_entropy(out, y[rows], reduction="sum", ignore_index=UNLABELLED) / n_global
    return loss_fn


class HiddenTap:
    """Forward hooks that keep the outputs of named modules of a model during one forward pass."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"distill.hidden: no module named {missing[0]!r} in the model "
                             f"(names: {', '.join(n for n in modules if n)})")
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in dict.fromkeys(names)]

    def _hook(self, name):
        def hook(_module, _inputs, output):
            self.out[name] = output
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def hidden_widths(model: nn.Module, names: list[str], sample: torch.Tensor) -> list[int]:
    tap = HiddenTap(model, names)
    try:
        with torch.no_grad():
            model(sample[:1])
        return [tap.out[n].shape[-1] for n in names]
    finally:
        tap.remove()


def make_projections(cfg: Distill, student: nn.Module, teacher: nn.Module, sample: torch.Tensor,
                     seed: int) -> nn.ModuleDict:
    """One HiddenDistillLoss per configured layer pair (owning a projection when the widths differ)."""
    if not cfg.hidden:
        return nn.ModuleDict()
    s_w = hidden_widths(student, [p.student for p in cfg.hidden], sample)
    t_w = hidden_widths(teacher, [p.teacher for p in cfg.hidden], sample)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.ModuleDict({str(i): HiddenDistillLoss(s, t, p.kind) for i, (p, s, t)
                              in enumerate(zip(cfg.hidden, s_w, t_w))})


def distillation(cfg: Distill, teacher: nn.Module, student: nn.Module, projections: nn.ModuleDict,
                 x: torch.Tensor, y_student: torch.Tensor):
    """soft distill_loss over every row + hard cross-entropy over labelled rows + hidden pairs.
    Call the returned function's .close() when the stage ends."""
    s_tap = HiddenTap(student, [p.student for p in cfg.hidden]) if cfg.hidden else None
    t_tap = HiddenTap(teacher, [p.teacher for p in cfg.hidden]) if cfg.hidden else None

    def loss_fn(forward, rows, n_global):
        xb = x[rows]
        with torch.no_grad():
            t_out = teacher(xb)
        out = forward(xb)
        loss = fastdistill.distill_loss(out, t_out, divergence=cfg.divergence, temperature=cfg.temperature,
                                        beta=cfg.beta, skew=cfg.skew, soft_weight=cfg.soft_weight,
                                        reduction="batchmean", num_items=n_global)
        if cfg.hard_weight:
            hard = F.cross_entropy(out.float(), y_student[rows], reduction="sum", ignore_index=UNLABELLED)
            loss = loss + cfg.hard_weight * hard / n_global
        for i, pair in enumerate(cfg.hidden):
            # HiddenDistillLoss averages over this rank's rows; rescale to a sum over the global count.
            h = projections[str(i)](s_tap.out[pair.student], t_tap.out[pair.teacher])
            loss = loss + pair.weight * h * (len(rows) / n_global)
        return loss

    def close():  # the taps must not outlive the stage (modules get replaced, outputs kept alive)
        for tap in (s_tap, t_tap):
            if tap is not None:
                tap.remove()

    loss_fn.close = close
    return loss_fn
