"""DistillLoss: the fused distillation loss as an nn.Module."""
from __future__ import annotations

import torch
from torch import nn

from fastdistill.ops.distill_loss import distill_loss
from fastdistill.ops.loss_common import check_loss_options


class DistillLoss(nn.Module):
    """`DistillLoss(**options)(student_logits, teacher_logits, labels=None)` == `distill_loss(...)`.

    Options are those of fastdistill.distill_loss (divergence, temperature, beta, skew, soft_weight,
    hard_weight, scale_t2, ignore_index, reduction, num_items, backend) and are checked here, once.
    group: the ProcessGroup of vocabulary-parallel local slices (docs/sharded.md); DTensor logits need none.
    """

    def __init__(self, *, divergence: str = "kl", temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                 soft_weight: float = 1.0, hard_weight: float = 0.0, scale_t2: bool = True,
                 ignore_index: int = -100, reduction: str = "batchmean", num_items=None, backend: str = "auto",
                 group=None):
        super().__init__()
        self.group = group  # vocabulary-parallel local slices (docs/sharded.md); kept out of self.options
        # labels=... stands in for "labels will be given" so that hard_weight is checked without them.
        check_loss_options(divergence, temperature, beta, skew, soft_weight, hard_weight, reduction, num_items, ...,
                           ignore_index)
        self.options = dict(divergence=divergence, temperature=temperature, beta=beta, skew=skew,
                            soft_weight=soft_weight, hard_weight=hard_weight, scale_t2=scale_t2,
                            ignore_index=ignore_index, reduction=reduction, num_items=num_items, backend=backend)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        return distill_loss(student_logits, teacher_logits, labels=labels, group=self.group, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k != "num_items" or v is not None)
