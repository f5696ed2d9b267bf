"""fastdistill.fused_linear_sampled_distill_loss: the sampled (RS-KD) distillation loss straight from the
student's hidden states and output head, against k token ids sampled from the teacher (offline KD), without
the student's [tokens, V] logits. Ops and chunking: fastdistill/ops/fused_linear_targets.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastdistill.cache.targets import unpack_targets
from fastdistill.ops.fused_linear_common import autocast_dtype, cast_floats, no_autocast
from fastdistill.ops.fused_linear_targets import check_student, run_targets_loss
from fastdistill.ops.loss_common import check_loss_options
from fastdistill.ops.sampled_distill_loss import check_sampled_tensors, validate_sampled

NAMES = ("teacher_sampled_logprobs", "teacher_sampled_indices")


def fused_linear_sampled_distill_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                      teacher_sampled_logprobs, teacher_sampled_indices=None, *,
                                      student_bias: Optional[torch.Tensor] = None,
                                      labels: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None,
                                      logit_scale: float = 1.0, softcap: Optional[float] = None,
                                      temperature: float = 1.0, soft_weight: float = 1.0, hard_weight: float = 0.0,
                                      scale_t2: bool = True, ignore_index: int = -100, reduction: str = "batchmean",
                                      num_items=None, validate: bool = False, backend: str = "auto") -> torch.Tensor:
    """sampled_distill_loss(student_hidden @ student_weightᵀ + student_bias, teacher_sampled_logprobs,
    teacher_sampled_indices, ...) without materializing the student's [tokens, V] logits.

    student_hidden (..., H), student_weight (V, H), student_bias (V,) or None; the draws (..., k) as
    sampled_distill_loss takes them (duplicates kept; or a TeacherTargets batch of kind "sampled" in place
    of the log-probs, with teacher_sampled_indices=None). Chunking, logit_scale, softcap, gradients and
    autocast as in fused_linear_topk_distill_loss; every other option as in sampled_distill_loss.
    """
    dtype = autocast_dtype(student_hidden)
    if dtype is not None:
        sh, sw, sb = cast_floats(dtype, student_hidden, student_weight, student_bias)
        with no_autocast(student_hidden):
            return fused_linear_sampled_distill_loss(
                sh, sw, teacher_sampled_logprobs, teacher_sampled_indices, student_bias=sb, labels=labels,
                chunk_size=chunk_size, logit_scale=logit_scale, softcap=softcap, temperature=temperature,
                soft_weight=soft_weight, hard_weight=hard_weight, scale_t2=scale_t2, ignore_index=ignore_index,
                reduction=reduction, num_items=num_items, validate=validate, backend=backend)
    logits = check_student(student_hidden, student_weight, student_bias, chunk_size, logit_scale, softcap)
    check_loss_options("kl", temperature, 0.5, 0.1, soft_weight, hard_weight, reduction, num_items, labels,
                       ignore_index)
    V = student_weight.shape[0]
    logprobs, indices = unpack_targets("sampled", teacher_sampled_logprobs, teacher_sampled_indices,
                                       temperature=float(temperature), vocab=V, names=NAMES)
    check_sampled_tensors(logits, logprobs, indices, labels)
    if validate:
        validate_sampled(logprobs, indices, V, labels, ignore_index)
    loss_options = (float(temperature), float(soft_weight), float(hard_weight), bool(scale_t2), int(ignore_index))
    reference_options = dict(temperature=float(temperature), soft_weight=float(soft_weight),
                             hard_weight=float(hard_weight), scale_t2=bool(scale_t2), ignore_index=int(ignore_index))
    return run_targets_loss("sampled", student_hidden, student_weight, student_bias, logprobs, indices, labels,
                            loss_options=loss_options, chunk_size=chunk_size, logit_scale=logit_scale,
                            softcap=softcap, ignore_index=int(ignore_index), reduction=reduction,
                            num_items=num_items, backend=backend, reference_options=reference_options)
