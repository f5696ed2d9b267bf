"""hidden_distill_loss: feature (hidden-state) distillation between a student and a teacher layer.

A composite of PyTorch ops (no kernel of its own: it is a projection GEMM plus one elementwise
reduction, which aten already does at memory speed). The teacher's states are detached: the
teacher is frozen during distillation.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fastdistill.ops.common import check_number

KINDS = ("mse", "cosine")


def hidden_distill_loss(student_h: torch.Tensor, teacher_h: torch.Tensor, *, kind: str = "mse",
                        projection: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        eps: float = 1e-8) -> torch.Tensor:
    """Distance between student and teacher hidden states [..., H_s] and [..., H_t], averaged over rows.

    kind="mse": mean over all elements of (proj(student_h) - teacher_h)².
    kind="cosine": mean over rows of 1 - cos(proj(student_h), teacher_h) (rows of norm < eps count as
    orthogonal to everything, not NaN).
    `projection` (e.g. an nn.Linear(H_s, H_t, bias=False), learned with the student) maps the student's
    width to the teacher's; it is required when the widths differ. Returns a float32 scalar.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    check_number("eps", eps, low=0.0, low_open=True)  # a norm floor: <= 0 divides zero rows by zero
    for name, t in (("student_h", student_h), ("teacher_h", teacher_h)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dim() < 1:
            raise ValueError(f"{name}: expected at least one dimension (the hidden width), got a scalar")
    if student_h.device != teacher_h.device:
        raise ValueError(f"teacher_h: on {teacher_h.device}, student_h on {student_h.device}")
    if student_h.shape[:-1] != teacher_h.shape[:-1]:
        raise ValueError(f"teacher_h: leading shape {tuple(teacher_h.shape[:-1])} differs from student_h's "
                         f"{tuple(student_h.shape[:-1])} (one hidden state per position on both sides)")
    s = student_h if projection is None else projection(student_h)
    if s.shape[-1] != teacher_h.shape[-1]:
        raise ValueError(f"projection: the student's width {s.shape[-1]} differs from the teacher's "
                         f"{teacher_h.shape[-1]}; pass projection=nn.Linear({student_h.shape[-1]}, "
                         f"{teacher_h.shape[-1]}, bias=False) (or HiddenDistillLoss, which owns one)")
    s = s.float().reshape(-1, s.shape[-1])
    t = teacher_h.detach().float().reshape(-1, teacher_h.shape[-1])
    if s.shape[0] == 0:
        return s.sum() * 0.0  # no rows: an exact zero that still carries the graph
    if kind == "mse":
        return F.mse_loss(s, t)
    cos = (s * t).sum(-1) / (s.norm(dim=-1).clamp_min(eps) * t.norm(dim=-1).clamp_min(eps))
    return (1.0 - cos).mean()
