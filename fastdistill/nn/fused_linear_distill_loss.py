"""FusedLinearDistillLoss: fused_linear_distill_loss as an nn.Module."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastdistill.ops.loss_common import check_loss_options
from fastdistill.ops.fused_linear_distill_loss import check_fused_options, fused_linear_distill_loss


class FusedLinearDistillLoss(nn.Module):
    """`FusedLinearDistillLoss(**options)(student_hidden, student_weight, teacher_hidden, teacher_weight,
    labels=None, student_bias=None, teacher_bias=None)` == `fused_linear_distill_loss(...)`.

    Options are those of fastdistill.fused_linear_distill_loss (chunk_size, logit_scale, softcap,
    teacher_logit_scale, teacher_softcap and every distill_loss option) and are checked here, once.
    Typical use with language models:
    `loss_fn(student_h, student.lm_head.weight, teacher_h, teacher.lm_head.weight, labels)`.
    group: the ProcessGroup of vocabulary-parallel local head rows (docs/sharded.md); DTensor heads need none.
    """

    def __init__(self, *, chunk_size: Optional[int] = None, logit_scale: float = 1.0, softcap: Optional[float] = None,
                 teacher_logit_scale: Optional[float] = None, teacher_softcap: Optional[float] = None,
                 divergence: str = "kl", temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                 soft_weight: float = 1.0, hard_weight: float = 0.0, scale_t2: bool = True,
                 ignore_index: int = -100, reduction: str = "batchmean", num_items=None, backend: str = "auto",
                 group=None):
        super().__init__()
        self.group = group  # vocabulary-parallel local slices (docs/sharded.md); kept out of self.options
        check_fused_options(chunk_size, logit_scale, softcap, teacher_logit_scale, teacher_softcap)
        # labels=... stands in for "labels will be given" so that hard_weight is checked without them.
        check_loss_options(divergence, temperature, beta, skew, soft_weight, hard_weight, reduction, num_items, ...,
                           ignore_index)
        self.options = dict(chunk_size=chunk_size, logit_scale=logit_scale, softcap=softcap,
                            teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap,
                            divergence=divergence,
                            temperature=temperature, beta=beta, skew=skew, soft_weight=soft_weight,
                            hard_weight=hard_weight, scale_t2=scale_t2, ignore_index=ignore_index,
                            reduction=reduction, num_items=num_items, backend=backend)

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                student_bias: Optional[torch.Tensor] = None,
                teacher_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fused_linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                         student_bias=student_bias, teacher_bias=teacher_bias, labels=labels,
                                         group=self.group, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None or k == "backend")
