"""HiddenDistillLoss: hidden_distill_loss with its own learned projection when the widths differ."""
from __future__ import annotations

import torch
from torch import nn

from fastdistill.ops.hidden_distill_loss import KINDS, hidden_distill_loss


class HiddenDistillLoss(nn.Module):
    """loss = HiddenDistillLoss(student_dim, teacher_dim, kind="mse")(student_h, teacher_h).

    Owns `projection = nn.Linear(student_dim, teacher_dim, bias=False)` when the widths differ (or when
    `project=True`); train its parameters together with the student's.
    """

    def __init__(self, student_dim: int, teacher_dim: int, kind: str = "mse", *, project: bool | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        for name, dim in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if not isinstance(dim, int) or dim <= 0:
                raise ValueError(f"{name}: expected a positive int, got {dim!r}")
        if project is False and student_dim != teacher_dim:
            raise ValueError(f"project: False needs equal widths, got student_dim={student_dim}, "
                             f"teacher_dim={teacher_dim}")
        self.kind = kind
        use = student_dim != teacher_dim if project is None else project
        self.projection = nn.Linear(student_dim, teacher_dim, bias=False) if use else None

    def forward(self, student_h: torch.Tensor, teacher_h: torch.Tensor) -> torch.Tensor:
        return hidden_distill_loss(student_h, teacher_h, kind=self.kind, projection=self.projection)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, projection={self.projection is not None}"
