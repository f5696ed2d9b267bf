"""References of fused_linear_topk_distill_loss and fused_linear_sampled_distill_loss, in plain PyTorch.

fused_linear_targets_loss_ref materializes the student's full logits and applies the unfused reference loss
(topk_distill_loss_ref or sampled_distill_loss_ref): the test oracle (in float64) and what users write
without fastdistill. fused_linear_targets_loss_chunked_ref is the fallback backend: the same math per chunk
of tokens under activation checkpointing, so that only one chunk's logits and autograd graph are alive.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from fastdistill.reference.fused_linear_distill_loss import _zero_ignored, head_logits_ref
from fastdistill.reference.sampled_distill_loss import sampled_distill_loss_ref, sampled_distill_loss_rows_ref
from fastdistill.reference.topk_distill_loss import topk_distill_loss_ref, topk_distill_loss_rows_ref

KINDS = ("topk", "sampled")


def _losses(kind: str):
    """(rows_ref, reduced_ref) of the unfused loss that reads `kind` teacher targets."""
    if kind == "topk":
        return topk_distill_loss_rows_ref, topk_distill_loss_ref
    if kind == "sampled":
        return sampled_distill_loss_rows_ref, sampled_distill_loss_ref
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


def fused_linear_targets_loss_ref(kind: str, student_hidden, student_weight, teacher_logprobs, teacher_indices, *,
                                  student_bias=None, labels=None, logit_scale: float = 1.0,
                                  softcap: float | None = None, dtype: torch.dtype | None = None,
                                  **options) -> torch.Tensor:
    """The `kind` ("topk" or "sampled") reference loss on the student's full logits
    (hidden · weightᵀ + bias, × logit_scale, softcapped), computed in `dtype` (default: float64 if the
    hidden states or weight are float64, else float32: never rounded to a half dtype, as the fused op
    promises). `options` are the unfused loss's options (tail, divergence, temperature, reduction, ...)."""
    if dtype is None:
        dtype = torch.float64 if torch.float64 in (student_hidden.dtype, student_weight.dtype) else torch.float32
    student_hidden = _zero_ignored(student_hidden, labels, options.get("ignore_index", -100))
    logits = head_logits_ref(student_hidden, student_weight, student_bias, dtype=dtype, logit_scale=logit_scale,
                             softcap=softcap)
    return _losses(kind)[1](logits, teacher_logprobs, teacher_indices, labels, **options)


def fused_linear_topk_distill_loss_ref(student_hidden, student_weight, teacher_topk_logprobs, teacher_topk_indices,
                                       **options) -> torch.Tensor:
    return fused_linear_targets_loss_ref("topk", student_hidden, student_weight, teacher_topk_logprobs,
                                         teacher_topk_indices, **options)


def fused_linear_sampled_distill_loss_ref(student_hidden, student_weight, teacher_sampled_logprobs,
                                          teacher_sampled_indices, **options) -> torch.Tensor:
    return fused_linear_targets_loss_ref("sampled", student_hidden, student_weight, teacher_sampled_logprobs,
                                         teacher_sampled_indices, **options)


def fused_linear_targets_loss_chunked_ref(kind: str, student_hidden, student_weight, student_bias, teacher_logprobs,
                                          teacher_indices, labels, scale, *, chunk_size: int,
                                          logit_scale: float = 1.0, softcap: float | None = None,
                                          **options) -> torch.Tensor:
    """Row losses times `scale` of 2-D hidden states ([N, H]) and targets ([N, k]); float32 (float64 for
    float64 inputs). Backward recomputes each chunk's logits (checkpointing) instead of keeping them."""
    dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    rows_ref = _losses(kind)[0]

    def chunk_rows(h, lp, ids, chunk_labels):
        h = _zero_ignored(h, chunk_labels, options.get("ignore_index", -100))
        s = head_logits_ref(h, student_weight, student_bias, dtype=dtype, logit_scale=logit_scale, softcap=softcap)
        return rows_ref(s, lp, ids, chunk_labels, **options)

    def part(i, j):
        return (student_hidden[i:j], teacher_logprobs[i:j], teacher_indices[i:j],
                None if labels is None else labels[i:j])
    n = student_hidden.shape[0]
    rows = [checkpoint(chunk_rows, *part(i, i + chunk_size), use_reentrant=False) for i in range(0, n, chunk_size)]
    if not rows:  # no tokens: still through the graph, so backward gives zero gradients like the kernels
        rows = [chunk_rows(*part(0, 0))]
    return torch.cat(rows) * scale.to(dtype)
