"""References of fused_linear_distill_loss, in plain PyTorch.

fused_linear_distill_loss_ref materializes both models' full logits: the test oracle (in float64)
and the "eager" benchmark baseline, i.e. what users write without fastdistill.
fused_linear_distill_loss_chunked_ref is the fallback backend: the same math per chunk of tokens
under activation checkpointing, so that only one chunk's logits and autograd graph are alive.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from fastdistill.reference.distill_loss import distill_loss_ref, distill_loss_rows_ref


def head_logits_ref(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, dtype: torch.dtype,
                    logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """(hidden · weightᵀ + bias) in `dtype`, times logit_scale, then softcap · tanh(· / softcap)."""
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def pad_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Right-pads the vocabulary with -inf logits (probability 0) up to `vocab` entries."""
    missing = vocab - logits.shape[-1]
    if missing == 0:
        return logits
    pad = logits.new_full((*logits.shape[:-1], missing), -math.inf)
    return torch.cat([logits, pad], dim=-1)


def _zero_ignored(hidden: torch.Tensor, labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """Hidden states of ignored rows replaced by 0 (they may hold anything, e.g. NaN padding, which would
    otherwise reach the weight gradient as 0 · NaN)."""
    if labels is None:
        return hidden
    return torch.where((labels == ignore_index).unsqueeze(-1), torch.zeros((), dtype=hidden.dtype), hidden)


def _heads(dtype, logit_scale, softcap, teacher_logit_scale, teacher_softcap) -> tuple[dict, dict]:
    """head_logits_ref options of the student and the teacher; the teacher's default to the student's
    (teacher_softcap=0: no cap on the teacher)."""
    if teacher_softcap is None:
        teacher_softcap = softcap
    teacher = dict(dtype=dtype, logit_scale=logit_scale if teacher_logit_scale is None else teacher_logit_scale,
                   softcap=teacher_softcap or None)
    return dict(dtype=dtype, logit_scale=logit_scale, softcap=softcap), teacher


def fused_linear_distill_loss_ref(student_hidden, student_weight, teacher_hidden, teacher_weight, *,
                                  student_bias=None, teacher_bias=None, labels=None, logit_scale: float = 1.0,
                                  softcap: float | None = None, teacher_logit_scale: float | None = None,
                                  teacher_softcap: float | None = None, dtype: torch.dtype | None = None,
                                  **options) -> torch.Tensor:
    """distill_loss_ref on the full logits of both heads; the smaller vocabulary is padded with -inf.

    Logits are computed in `dtype` (default: float64 if any input is float64, else float32), never
    rounded to a half dtype, as the fused op promises. `options` are distill_loss's options.
    """
    if dtype is None:
        dtype = torch.float64 if torch.float64 in (student_hidden.dtype, student_weight.dtype) else torch.float32
    head, teacher_head = _heads(dtype, logit_scale, softcap, teacher_logit_scale, teacher_softcap)
    student_hidden = _zero_ignored(student_hidden, labels, options.get("ignore_index", -100))
    s = head_logits_ref(student_hidden, student_weight, student_bias, **head)
    with torch.no_grad():
        t = head_logits_ref(teacher_hidden, teacher_weight, teacher_bias, **teacher_head)
    vocab = max(s.shape[-1], t.shape[-1])
    return distill_loss_ref(pad_vocab(s, vocab), pad_vocab(t, vocab), labels, **options)


def fused_linear_distill_loss_chunked_ref(student_hidden, student_weight, student_bias, teacher_hidden,
                                          teacher_weight, teacher_bias, labels, scale, *, chunk_size: int,
                                          logit_scale: float = 1.0, softcap: float | None = None,
                                          teacher_logit_scale: float | None = None,
                                          teacher_softcap: float | None = None, **options) -> torch.Tensor:
    """Row losses times `scale` of 2-D hidden states ([N, H]); float32 (float64 for float64 inputs).
    Backward recomputes each chunk's logits (checkpointing) instead of keeping them."""
    dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    head, teacher_head = _heads(dtype, logit_scale, softcap, teacher_logit_scale, teacher_softcap)
    vocab = max(student_weight.shape[0], teacher_weight.shape[0])

    def chunk_rows(h_s, h_t, chunk_labels):
        h_s = _zero_ignored(h_s, chunk_labels, options.get("ignore_index", -100))
        s = head_logits_ref(h_s, student_weight, student_bias, **head)
        with torch.no_grad():
            t = head_logits_ref(h_t, teacher_weight, teacher_bias, **teacher_head)
        return distill_loss_rows_ref(pad_vocab(s, vocab), pad_vocab(t, vocab), chunk_labels, **options)

    rows = [checkpoint(chunk_rows, student_hidden[i:i + chunk_size], teacher_hidden[i:i + chunk_size],
                       None if labels is None else labels[i:i + chunk_size], use_reentrant=False)
            for i in range(0, student_hidden.shape[0], chunk_size)]
    if not rows:  # no tokens: still through the graph, so backward gives zero gradients like the kernels
        rows = [chunk_rows(student_hidden, teacher_hidden, labels)]
    return torch.cat(rows) * scale.to(dtype)
