"""FusedLinearTopKDistillLoss and FusedLinearSampledDistillLoss: the fused linear losses over cached teacher
targets as nn.Modules."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastdistill.ops.fused_linear_common import check_fused_options
from fastdistill.ops.fused_linear_sampled_distill_loss import fused_linear_sampled_distill_loss
from fastdistill.ops.fused_linear_topk_distill_loss import fused_linear_topk_distill_loss
from fastdistill.ops.loss_common import check_loss_options
from fastdistill.reference.topk_distill_loss import TAILS


class _FusedTargetsLoss(nn.Module):
    _loss = None  # the public function

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_logprobs,
                teacher_indices: Optional[torch.Tensor] = None, *, student_bias: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, num_items=None) -> torch.Tensor:
        options = self.options if num_items is None else {**self.options, "num_items": num_items}
        return type(self)._loss(student_hidden, student_weight, teacher_logprobs, teacher_indices,
                                student_bias=student_bias, labels=labels, **options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None or k == "backend")


class FusedLinearTopKDistillLoss(_FusedTargetsLoss):
    """`FusedLinearTopKDistillLoss(**options)(student_hidden, student_weight, teacher_logprobs, teacher_indices,
    student_bias=None, labels=None, num_items=None)` == `fused_linear_topk_distill_loss(...)`.

    Options are those of fastdistill.fused_linear_topk_distill_loss and are checked here, once.
    teacher_logprobs may be a TeacherTargets batch (TeacherCache.collate) with teacher_indices=None.
    num_items given to forward overrides the constructor's (e.g. the global count of a gradient-accumulation step).
    """
    _loss = staticmethod(fused_linear_topk_distill_loss)

    def __init__(self, *, tail: str = "renormalize", chunk_size: Optional[int] = None, logit_scale: float = 1.0,
                 softcap: Optional[float] = None, divergence: str = "kl", temperature: float = 1.0,
                 beta: float = 0.5, skew: float = 0.1, soft_weight: float = 1.0, hard_weight: float = 0.0,
                 scale_t2: bool = True, ignore_index: int = -100, reduction: str = "batchmean", num_items=None,
                 validate: bool = False, backend: str = "auto"):
        super().__init__()
        check_fused_options(chunk_size, logit_scale, softcap)
        if tail not in TAILS:
            raise ValueError(f"tail: unknown {tail!r}; expected one of {TAILS}")
        if divergence == "mse":
            raise ValueError("divergence: 'mse' compares raw logits, which top-k log-probabilities do not give")
        # labels=... stands in for "labels will be given" so that hard_weight is checked without them.
        check_loss_options(divergence, temperature, beta, skew, soft_weight, hard_weight, reduction, num_items, ...,
                           ignore_index)
        self.options = dict(tail=tail, chunk_size=chunk_size, logit_scale=logit_scale, softcap=softcap,
                            divergence=divergence, temperature=temperature, beta=beta, skew=skew,
                            soft_weight=soft_weight, hard_weight=hard_weight, scale_t2=scale_t2,
                            ignore_index=ignore_index, reduction=reduction, num_items=num_items, validate=validate,
                            backend=backend)


class FusedLinearSampledDistillLoss(_FusedTargetsLoss):
    """`FusedLinearSampledDistillLoss(**options)(student_hidden, student_weight, teacher_logprobs,
    teacher_indices, student_bias=None, labels=None, num_items=None)` == `fused_linear_sampled_distill_loss(...)`;
    options as in fastdistill.fused_linear_sampled_distill_loss, checked here once."""
    _loss = staticmethod(fused_linear_sampled_distill_loss)

    def __init__(self, *, chunk_size: Optional[int] = None, logit_scale: float = 1.0, softcap: Optional[float] = None,
                 temperature: float = 1.0, soft_weight: float = 1.0, hard_weight: float = 0.0, scale_t2: bool = True,
                 ignore_index: int = -100, reduction: str = "batchmean", num_items=None, validate: bool = False,
                 backend: str = "auto"):
        super().__init__()
        check_fused_options(chunk_size, logit_scale, softcap)
        check_loss_options("kl", temperature, 0.5, 0.1, soft_weight, hard_weight, reduction, num_items, ...,
                           ignore_index)
        self.options = dict(chunk_size=chunk_size, logit_scale=logit_scale, softcap=softcap, temperature=temperature,
                            soft_weight=soft_weight, hard_weight=hard_weight, scale_t2=scale_t2,
                            ignore_index=ignore_index, reduction=reduction, num_items=num_items, validate=validate,
                            backend=backend)
