"""fastdistill.fused_linear_topk_distill_loss: the top-k distillation loss straight from the student's hidden
states and output head, against a teacher's cached top-k log-probabilities (offline KD), without the
student's [tokens, V] logits. Ops and chunking: fastdistill/ops/fused_linear_targets.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastdistill.cache.targets import unpack_targets
from fastdistill.ops.fused_linear_common import autocast_dtype, cast_floats, no_autocast
from fastdistill.ops.fused_linear_targets import check_student, run_targets_loss
from fastdistill.ops.loss_common import check_loss_options, resolve
from fastdistill.ops.topk_distill_loss import TAIL_CODES, _validate_indices, check_topk_tensors
from fastdistill.reference.distill_loss import DIVERGENCES
from fastdistill.reference.topk_distill_loss import TAILS

NAMES = ("teacher_topk_logprobs", "teacher_topk_indices")


def fused_linear_topk_distill_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_topk_logprobs,
                                   teacher_topk_indices=None, *, student_bias: Optional[torch.Tensor] = None,
                                   tail: str = "renormalize", labels: Optional[torch.Tensor] = None,
                                   chunk_size: Optional[int] = None, logit_scale: float = 1.0,
                                   softcap: Optional[float] = None, divergence: str = "kl", temperature: float = 1.0,
                                   beta: float = 0.5, skew: float = 0.1, soft_weight: float = 1.0,
                                   hard_weight: float = 0.0, scale_t2: bool = True, ignore_index: int = -100,
                                   reduction: str = "batchmean", num_items=None, validate: bool = False,
                                   backend: str = "auto") -> torch.Tensor:
    """topk_distill_loss(student_hidden @ student_weightᵀ + student_bias, teacher_topk_logprobs,
    teacher_topk_indices, ...) without materializing the student's [tokens, V] logits.

    student_hidden (..., H), student_weight (V, H), student_bias (V,) or None; teacher_topk_logprobs and
    teacher_topk_indices (..., k) as topk_distill_loss takes them (or a TeacherTargets batch of kind "topk"
    from TeacherCache.collate in place of the log-probs, with teacher_topk_indices=None: its temperature
    and vocabulary must match the call). Logits are float32 inside a chunk of `chunk_size` tokens (None:
    sized from a memory budget), multiplied by `logit_scale`, then capped as softcap · tanh(logits / softcap)
    when `softcap` is given. Every other option means what it means in topk_distill_loss. Gradients flow
    to the hidden states, weight and bias (whichever require grad; the weight and bias gradients are
    accumulated in float32 and returned in their dtype). Under torch.autocast, floating inputs are cast to
    the autocast dtype first, as F.linear would be.
    """
    dtype = autocast_dtype(student_hidden)
    if dtype is not None:
        sh, sw, sb = cast_floats(dtype, student_hidden, student_weight, student_bias)
        with no_autocast(student_hidden):
            return fused_linear_topk_distill_loss(
                sh, sw, teacher_topk_logprobs, teacher_topk_indices, student_bias=sb, tail=tail, labels=labels,
                chunk_size=chunk_size, logit_scale=logit_scale, softcap=softcap, divergence=divergence,
                temperature=temperature, beta=beta, skew=skew, soft_weight=soft_weight, hard_weight=hard_weight,
                scale_t2=scale_t2, ignore_index=ignore_index, reduction=reduction, num_items=num_items,
                validate=validate, backend=backend)
    logits = check_student(student_hidden, student_weight, student_bias, chunk_size, logit_scale, softcap)
    if divergence == "mse":
        raise ValueError("divergence: 'mse' compares raw logits, which top-k log-probabilities do not give; "
                         "use kl, reverse_kl, jsd, tvd, skew_kl or skew_reverse_kl")
    check_loss_options(divergence, temperature, beta, skew, soft_weight, hard_weight, reduction, num_items, labels,
                       ignore_index)
    if tail not in TAIL_CODES:
        raise ValueError(f"tail: unknown {tail!r}; expected one of {TAILS}")
    V = student_weight.shape[0]
    logprobs, indices = unpack_targets("topk", teacher_topk_logprobs, teacher_topk_indices,
                                       temperature=float(temperature), vocab=V, names=NAMES)
    check_topk_tensors(logits, logprobs, indices, labels)
    if validate:
        _validate_indices(indices, V, labels, ignore_index)
    code, weight, soft_weight = resolve(divergence, float(beta), float(skew), float(soft_weight))
    loss_options = (TAIL_CODES[tail], code, float(temperature), weight, float(soft_weight), float(hard_weight),
                    bool(scale_t2), int(ignore_index))
    reference_options = dict(tail=tail, divergence=DIVERGENCES[code], temperature=float(temperature), beta=weight,
                             skew=weight, soft_weight=float(soft_weight), hard_weight=float(hard_weight),
                             scale_t2=bool(scale_t2), ignore_index=int(ignore_index))
    return run_targets_loss("topk", student_hidden, student_weight, student_bias, logprobs, indices, labels,
                            loss_options=loss_options, chunk_size=chunk_size, logit_scale=logit_scale,
                            softcap=softcap, ignore_index=int(ignore_index), reduction=reduction,
                            num_items=num_items, backend=backend, reference_options=reference_options)
