"""SampledDistillLoss: the sampled-teacher (RS-KD) distillation loss as an nn.Module."""
from __future__ import annotations

import torch
from torch import nn

from fastdistill.ops.loss_common import check_loss_options
from fastdistill.ops.sampled_distill_loss import sampled_distill_loss


class SampledDistillLoss(nn.Module):
    """`SampledDistillLoss(**options)(student_logits, teacher_sampled_logprobs, teacher_sampled_indices=None,
    labels=None)` == `sampled_distill_loss(...)`.

    Options are those of fastdistill.sampled_distill_loss (temperature, soft_weight, hard_weight, scale_t2,
    ignore_index, reduction, num_items, validate, backend) and are checked here, once.
    teacher_sampled_logprobs may be a TeacherTargets batch (then teacher_sampled_indices is None).
    """

    def __init__(self, *, temperature: float = 1.0, soft_weight: float = 1.0, hard_weight: float = 0.0,
                 scale_t2: bool = True, ignore_index: int = -100, reduction: str = "batchmean", num_items=None,
                 validate: bool = False, backend: str = "auto"):
        super().__init__()
        # labels=... stands in for "labels will be given" so that hard_weight is checked without them.
        check_loss_options("kl", temperature, 0.5, 0.1, soft_weight, hard_weight, reduction, num_items, ...,
                           ignore_index)
        self.options = dict(temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight,
                            scale_t2=scale_t2, ignore_index=ignore_index, reduction=reduction, num_items=num_items,
                            validate=validate, backend=backend)

    def forward(self, student_logits: torch.Tensor, teacher_sampled_logprobs, teacher_sampled_indices=None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        return sampled_distill_loss(student_logits, teacher_sampled_logprobs, teacher_sampled_indices,
                                    labels=labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k != "num_items" or v is not None)
