"""fastdistill.fused_linear_distill_loss: distillation loss straight from hidden states and output heads.

Custom ops (one per kernel backend, same schema), all running fused_linear_chunks.run_chunks:
    fastdistill::fused_linear_distill_loss_cpu      aten GEMMs + the C++ distill_loss kernel
    fastdistill::fused_linear_distill_loss_cuda     cuBLAS GEMMs (aten) + the CUDA distill_loss kernel
    fastdistill::fused_linear_distill_loss_triton   cuBLAS GEMMs (aten) + the Triton distill_loss kernel
The reference backend is plain PyTorch: the reference loss per chunk under activation checkpointing
(fastdistill/reference/fused_linear_distill_loss.py).

Reductions "batchmean"/"sum": the op returns the scalar loss and computes every requested gradient in
the forward pass; backward scales them. Reduction "none": the op returns the row losses only, and
backward runs the chunk loop again with the upstream row gradients as row weights (the weight
gradient mixes rows, so it cannot be scaled after the fact).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fastdistill import dispatch
from fastdistill.distributed.vocab_parallel_route import any_dtensor
from fastdistill.ops.common import check_labels, row_labels, row_view
from fastdistill.ops.distill_loss import loss_op
from fastdistill.ops.loss_common import check_label_values, check_loss_options, resolve, row_scale
from fastdistill.ops.fused_linear_chunks import auto_chunk_size, run_chunks
from fastdistill.ops.fused_linear_common import check_fused_options  # noqa: F401 (imported from here too)
from fastdistill.ops.fused_linear_common import FusedLossOps, autocast_dtype, cast_floats, check_head, no_autocast
from fastdistill.reference.distill_loss import DIVERGENCES
from fastdistill.reference.fused_linear_distill_loss import fused_linear_distill_loss_chunked_ref


@dataclass(frozen=True)
class _Config:
    divergence: int
    temperature: float
    weight: float
    soft_weight: float
    hard_weight: float
    scale_t2: bool
    ignore_index: int
    logit_scale: float
    softcap: float  # 0: none
    teacher_logit_scale: float
    teacher_softcap: float  # 0: none
    chunk_size: int
    reduce: bool
    need_grad_hidden: bool
    need_grad_weight: bool
    need_grad_bias: bool

    def loss_args(self):
        return (self.divergence, self.temperature, self.weight, self.soft_weight, self.hard_weight, self.scale_t2,
                self.ignore_index)


def _forward_rows(backend: str, tensors: tuple, cfg: _Config):
    sh, sw, sb, th, tw, tb, labels, scale, row_weights = tensors
    op = loss_op(backend)

    def loss_fn(student, teacher, labels, want_grad):
        rows, grad = op(student, teacher, labels, scale, *cfg.loss_args(), want_grad)
        return rows, (grad if want_grad else None)
    return run_chunks(
        sh, sw, sb, th, tw, tb, labels, row_weights, loss_fn, logit_scale=cfg.logit_scale, softcap=cfg.softcap,
        teacher_logit_scale=cfg.teacher_logit_scale, teacher_softcap=cfg.teacher_softcap, chunk_size=cfg.chunk_size,
        need_grad_hidden=cfg.reduce and cfg.need_grad_hidden,
        need_grad_weight=cfg.reduce and cfg.need_grad_weight, need_grad_bias=cfg.reduce and cfg.need_grad_bias,
        ignore_index=cfg.ignore_index)


_FUSED = FusedLossOps(
    "fused_linear_distill_loss", "Tensor student_hidden, Tensor student_weight, Tensor? student_bias, "
    "Tensor teacher_hidden, Tensor teacher_weight, Tensor? teacher_bias, Tensor? labels, Tensor scale, "
    "Tensor? row_weights", _Config, _forward_rows)
_OPS = _FUSED.ops


def _call(backend: str, tensors: tuple, cfg: _Config):
    return _FUSED.call(backend, tensors, cfg)


def _check_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                  labels):
    check_head("student", student_hidden, student_weight, student_bias)
    check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden: leading shape {tuple(teacher_hidden.shape[:-1])} does not match "
                         f"student_hidden's {tuple(student_hidden.shape[:-1])} (one row per token in both)")
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher_hidden: on {teacher_hidden.device}, student_hidden on {student_hidden.device}")
    check_labels(labels, student_hidden, "student_hidden", "the hidden states without H")


def fused_linear_distill_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                              teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, *,
                              student_bias: Optional[torch.Tensor] = None,
                              teacher_bias: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                              chunk_size: Optional[int] = None, logit_scale: float = 1.0,
                              softcap: Optional[float] = None, teacher_logit_scale: Optional[float] = None,
                              teacher_softcap: Optional[float] = None, divergence: str = "kl", temperature: float = 1.0,
                              beta: float = 0.5, skew: float = 0.1, soft_weight: float = 1.0,
                              hard_weight: float = 0.0, scale_t2: bool = True, ignore_index: int = -100,
                              reduction: str = "batchmean", num_items=None, backend: str = "auto",
                              group=None) -> torch.Tensor:
    """distill_loss(student_hidden @ student_weightᵀ + student_bias, teacher_hidden @ teacher_weightᵀ + ...)
    without materializing either [tokens, V] logits tensor.

    Hidden states (..., H_s) / (..., H_t), weights (V_s, H_s) / (V_t, H_t); H_s != H_t and V_s != V_t
    are allowed (the smaller vocabulary is padded with -inf logits: probability 0). Logits are
    float32 inside a chunk of `chunk_size` tokens (None: sized from a memory budget), multiplied by
    `logit_scale`, then capped as softcap · tanh(logits / softcap) when `softcap` is given. The teacher's
    logits get `teacher_logit_scale` and `teacher_softcap` instead when given (None: the student's values;
    teacher_softcap=0: no cap on the teacher), for models whose heads differ (a Gemma-2 teacher with
    final_logit_softcapping and a Llama student, say). Every other
    option means what it means in distill_loss. Gradients flow to the student's hidden states,
    weight and bias (whichever require grad; the weight and bias gradients are accumulated in float32
    and returned in their dtype); the teacher's tensors never receive gradients.
    Heads sharded along the vocabulary (weights as DTensors placed Shard(0), or local rows with group=, a
    ProcessGroup): see fastdistill.distributed.vocab_parallel_fused (docs/sharded.md).
    Under torch.autocast, floating inputs are cast to the autocast dtype first, as F.linear would be.
    """
    dtype = autocast_dtype(student_hidden)
    if dtype is not None:  # as the models' own lm_head (F.linear) under autocast
        sh, sw, sb, th, tw, tb = cast_floats(dtype, student_hidden, student_weight, student_bias, teacher_hidden,
                                             teacher_weight, teacher_bias)
        with no_autocast(student_hidden):
            return fused_linear_distill_loss(
                sh, sw, th, tw, student_bias=sb, teacher_bias=tb, labels=labels, chunk_size=chunk_size,
                logit_scale=logit_scale, softcap=softcap, teacher_logit_scale=teacher_logit_scale,
                teacher_softcap=teacher_softcap, divergence=divergence, temperature=temperature, beta=beta, skew=skew,
                soft_weight=soft_weight, hard_weight=hard_weight, scale_t2=scale_t2, ignore_index=ignore_index,
                reduction=reduction, num_items=num_items, backend=backend, group=group)
    if group is not None or any_dtensor(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                                        teacher_bias, labels):
        from fastdistill.distributed.vocab_parallel_fused import vocab_parallel_fused_linear_distill_loss
        return vocab_parallel_fused_linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, labels=labels, chunk_size=chunk_size, logit_scale=logit_scale, softcap=softcap,
            teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap, divergence=divergence,
            temperature=temperature, beta=beta, skew=skew, soft_weight=soft_weight, hard_weight=hard_weight,
            scale_t2=scale_t2, ignore_index=ignore_index, reduction=reduction, num_items=num_items, backend=backend,
            group=group)
    _check_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels)
    check_fused_options(chunk_size, logit_scale, softcap, teacher_logit_scale, teacher_softcap)
    check_loss_options(divergence, temperature, beta, skew, soft_weight, hard_weight, reduction, num_items, labels,
                       ignore_index)
    check_label_values(labels, student_weight.shape[0], int(ignore_index))
    if divergence == "mse" and student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"divergence: 'mse' compares logits elementwise and needs equal vocabularies, got "
                         f"V_s = {student_weight.shape[0]} (student_weight) and V_t = {teacher_weight.shape[0]} "
                         f"(teacher_weight)")
    name = dispatch.select("fused_linear_distill_loss", backend, student_hidden.device,
                           (student_hidden.dtype, teacher_hidden.dtype))
    lead = student_hidden.shape[:-1]
    sh, th = row_view(student_hidden), row_view(teacher_hidden.detach())
    tw = teacher_weight.detach()
    tb = None if teacher_bias is None else teacher_bias.detach()
    rows_labels = row_labels(labels)
    code, weight, soft_weight = resolve(divergence, float(beta), float(skew), float(soft_weight))
    scale = row_scale(reduction, num_items, rows_labels, sh.shape[0], ignore_index, sh.device)
    grad_on = torch.is_grad_enabled()
    vocab = max(student_weight.shape[0], teacher_weight.shape[0])
    cfg = _Config(code, float(temperature), weight, float(soft_weight), float(hard_weight), bool(scale_t2),
                  int(ignore_index), float(logit_scale), 0.0 if softcap is None else float(softcap),
                  float(logit_scale if teacher_logit_scale is None else teacher_logit_scale),
                  float((softcap if teacher_softcap is None else teacher_softcap) or 0.0),
                  int(chunk_size) if chunk_size is not None else auto_chunk_size(sh.shape[0], vocab, sh.device),
                  reduction != "none", grad_on and student_hidden.requires_grad,
                  grad_on and student_weight.requires_grad,
                  grad_on and student_bias is not None and student_bias.requires_grad)
    tensors = (sh, student_weight, student_bias, th, tw, tb, rows_labels, scale, None)
    if name == "reference":
        rows = fused_linear_distill_loss_chunked_ref(
            *tensors[:-1], chunk_size=cfg.chunk_size, logit_scale=cfg.logit_scale, softcap=softcap,
            teacher_logit_scale=cfg.teacher_logit_scale, teacher_softcap=cfg.teacher_softcap,
            divergence=DIVERGENCES[code], temperature=cfg.temperature, beta=weight, skew=weight,
            soft_weight=cfg.soft_weight, hard_weight=cfg.hard_weight, scale_t2=cfg.scale_t2,
            ignore_index=cfg.ignore_index)
        return rows.sum() if cfg.reduce else rows.view(lead)
    loss = _call(name, tensors, cfg)[0]
    return loss if cfg.reduce else loss.view(lead)
