"""fastdistill.topk_distill_loss: distillation from a teacher's top-k log-probabilities (offline KD).

Custom ops (one per backend, same schema):
    fastdistill::topk_distill_loss_cpu      defined in csrc/ops.cpp, kernel in csrc/cpu/topk_distill_loss.cpp
    fastdistill::topk_distill_loss_cuda     defined in csrc/ops.cpp, kernel in csrc/cuda/topk_distill_loss.cu
    fastdistill::topk_distill_loss_triton   defined here, kernel in fastdistill/kernels/topk_distill_loss.py
Each returns (row losses in float32 already multiplied by `scale`, gradient w.r.t. the full student
logits in their dtype), like the distill_loss ops, whose validation, scaling and autograd this reuses.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastdistill import dispatch
from fastdistill.distributed.vocab_parallel_route import any_dtensor
from fastdistill.ops.common import (as_int64, interpreting, launch_guard, native, register_native, row_blocks,
                                    row_labels)
from fastdistill.ops.loss_common import (check_label_values, check_loss_options, check_target_tensors,
                                         counted_ids_in_range, loss_backward, loss_outputs, resolve, row_scale,
                                         setup_loss_context)
from fastdistill.reference.topk_distill_loss import TAILS, topk_distill_loss_ref

# Codes shared with csrc/cpu/topk_distill_loss.cpp and fastdistill/kernels/topk_distill_loss.py.
TAIL_CODES = {name: code for code, name in enumerate(TAILS)}


@torch.library.custom_op("fastdistill::topk_distill_loss_triton", mutates_args=())
def topk_distill_loss_triton(student: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor,
                             labels: Optional[torch.Tensor], scale: torch.Tensor, tail: int, divergence: int,
                             temperature: float, weight: float, soft_weight: float, hard_weight: float,
                             scale_t2: bool, ignore_index: int, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fastdistill.kernels.topk_distill_loss import topk_distill_loss_triton_launch  # imports triton on first use

    loss, grad = loss_outputs(student, compute_grad)
    coef = soft_weight * (temperature ** 2 if scale_t2 else 1.0)
    with launch_guard(student):
        topk_distill_loss_triton_launch(
            student, teacher_logprobs, teacher_indices, labels, scale, loss, grad if compute_grad else None,
            bucket=tail == TAIL_CODES["bucket"], divergence=divergence, inv_t=1.0 / temperature, w=weight,
            log_w=math.log(weight) if weight > 0 else -math.inf,
            log_1mw=math.log1p(-weight) if weight < 1 else -math.inf, soft_coef=coef, grad_coef=coef / temperature,
            hard_weight=hard_weight, ignore_index=ignore_index, interpret=interpreting())
    return loss, grad


def _fake(student, teacher_logprobs, teacher_indices, labels, scale, tail, divergence, temperature, weight,
          soft_weight, hard_weight, scale_t2, ignore_index, compute_grad):
    return loss_outputs(student, compute_grad)


_BACKWARD = loss_backward(14)  # arguments of the topk_distill_loss_<backend> ops
torch.library.register_fake("fastdistill::topk_distill_loss_triton")(_fake)
torch.library.register_autograd("fastdistill::topk_distill_loss_triton", _BACKWARD, setup_context=setup_loss_context)
register_native(("topk_distill_loss_cpu", "topk_distill_loss_cuda"), _fake, (_BACKWARD, setup_loss_context))


def check_topk_tensors(student, logprobs, indices, labels, vocab: Optional[int] = None):
    """Types, devices and shapes of the top-k inputs; `vocab` is the whole vocabulary's V when `student`
    holds only a slice of it (vocabulary parallel)."""
    check_target_tensors(student, logprobs, indices, labels, ("teacher_topk_logprobs", "teacher_topk_indices"))
    V = student.shape[-1] if vocab is None else vocab
    k = logprobs.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"teacher_topk_logprobs: k = {k} top-k entries per row, but the vocabulary has V = {V} "
                         f"(need 1 <= k <= V)")


def _validate_indices(indices, V, labels, ignore_index):
    """Range and duplicate check of the ids of the rows that count (a host sync: opt-in, validate=True)."""
    ids, counted = counted_ids_in_range(indices, V, labels, ignore_index, "teacher_topk_indices")
    ordered = ids.sort(-1).values
    dup = counted.unsqueeze(-1) & (ordered[:, 1:] == ordered[:, :-1])
    if dup.any():
        row, col = (int(x) for x in dup.nonzero()[0])
        raise ValueError(f"teacher_topk_indices: id {int(ordered[row, col])} appears twice in row {row}")


def topk_distill_loss(student_logits: torch.Tensor, teacher_topk_logprobs,
                      teacher_topk_indices: Optional[torch.Tensor] = None, *, tail: str = "renormalize", labels=None,
                      divergence: str = "kl", temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                      soft_weight: float = 1.0, hard_weight: float = 0.0, scale_t2: bool = True,
                      ignore_index: int = -100, reduction: str = "batchmean", num_items=None,
                      validate: bool = False, backend: str = "auto", group=None) -> torch.Tensor:
    """Distillation loss against a teacher stored as its top-k log-probabilities (offline KD).

    student_logits (..., V); teacher_topk_logprobs (..., k), the teacher's log_softmax(logits / T)
    at its top k tokens (any float dtype; a cache stores fp16; the kernels read float64 as float32);
    teacher_topk_indices (..., k) their token ids (int32/int64, distinct within a row).
    q = softmax(student / T) over the full vocabulary.
      tail="renormalize": p and q restricted to the k ids and renormalized; D over k categories.
      tail="bucket": the k ids plus one "rest" category: p_rest = max(0, 1 - sum exp(lp)) (clamped:
        fp16-rounded log-probs can sum slightly above 1), q_rest = the student's exact mass outside the ids.
    Row loss = soft_weight · (T² if scale_t2) · D(p ‖ q) + hard_weight · CE(student, labels), with the
    options, reductions and ignore_index of fastdistill.distill_loss ("mse" is not available: a top-k
    cache holds no raw logits). Only the student gets a gradient (over all V, in its dtype).
    Ids outside [0, V): the cpu backend raises, triton and reference give that row a NaN loss and
    gradient; duplicate ids are undefined there. validate=True checks range and duplicates on any
    backend first (a host sync, and not for torch.compile(fullgraph=True)).
    Vocabulary-sharded student logits (a DTensor placed Shard(-1), or local slices with group=, a
    ProcessGroup; ids are global): see fastdistill.distributed.vocab_parallel_topk (docs/sharded.md).
    teacher_topk_logprobs may be a fastdistill.cache.TeacherTargets (batch["teacher"] of
    TeacherCache.collate) with teacher_topk_indices None: its kind must be "topk", its temperature
    this call's and its vocabulary the student's whole V, else a ValueError naming teacher_topk_logprobs.
    """
    from fastdistill.cache.targets import TeacherTargets, unpack_targets

    vocab = None
    if isinstance(teacher_topk_logprobs, TeacherTargets):
        if not isinstance(student_logits, torch.Tensor) or student_logits.dim() == 0:
            raise TypeError(f"student_logits: expected a (..., V) torch.Tensor, got {type(student_logits).__name__}")
        vocab = student_logits.shape[-1]  # a DTensor's shape is the global one
        if group is not None and not any_dtensor(student_logits):  # local slices: V is the sum of their widths
            width = torch.tensor([vocab], dtype=torch.int64, device=student_logits.device)
            torch.distributed.all_reduce(width, group=group)
            vocab = int(width)
    teacher_topk_logprobs, teacher_topk_indices = unpack_targets(
        "topk", teacher_topk_logprobs, teacher_topk_indices, temperature=temperature, vocab=vocab,
        names=("teacher_topk_logprobs", "teacher_topk_indices"))
    if group is not None or any_dtensor(student_logits, teacher_topk_logprobs, teacher_topk_indices, labels):
        from fastdistill.distributed.vocab_parallel_topk import vocab_parallel_topk_distill_loss
        return vocab_parallel_topk_distill_loss(
            student_logits, teacher_topk_logprobs, teacher_topk_indices, tail=tail, labels=labels,
            divergence=divergence, temperature=temperature, beta=beta, skew=skew, soft_weight=soft_weight,
            hard_weight=hard_weight, scale_t2=scale_t2, ignore_index=ignore_index, reduction=reduction,
            num_items=num_items, validate=validate, backend=backend, group=group)
    if divergence == "mse":
        raise ValueError("divergence: 'mse' compares raw logits, which top-k log-probabilities do not give; "
                         "use kl, reverse_kl, jsd, tvd, skew_kl or skew_reverse_kl")
    check_topk_tensors(student_logits, teacher_topk_logprobs, teacher_topk_indices, labels)
    check_loss_options(divergence, temperature, beta, skew, soft_weight, hard_weight, reduction, num_items, labels,
                       ignore_index)
    check_label_values(labels, student_logits.shape[-1], int(ignore_index))
    if tail not in TAIL_CODES:
        raise ValueError(f"tail: unknown {tail!r}; expected one of {TAILS}")
    V = student_logits.shape[-1]
    if validate:
        _validate_indices(teacher_topk_indices, V, labels, ignore_index)
    if teacher_topk_logprobs.dtype not in dispatch.KERNEL_DTYPES:  # e.g. float64: the kernels read fp32
        kernel_logprobs = teacher_topk_logprobs.float()
    else:
        kernel_logprobs = teacher_topk_logprobs
    name = dispatch.select("topk_distill_loss", backend, student_logits.device,
                           (student_logits.dtype, kernel_logprobs.dtype))
    if name == "reference":
        return topk_distill_loss_ref(student_logits, teacher_topk_logprobs, teacher_topk_indices, as_int64(labels),
                                     tail=tail, divergence=divergence, temperature=float(temperature),
                                     beta=float(beta), skew=float(skew), soft_weight=float(soft_weight),
                                     hard_weight=float(hard_weight), scale_t2=scale_t2, ignore_index=ignore_index,
                                     reduction=reduction, num_items=num_items)
    lead = student_logits.shape[:-1]
    rows_labels = row_labels(labels)
    code, weight, soft_weight = resolve(divergence, float(beta), float(skew), float(soft_weight))
    scale = row_scale(reduction, num_items, rows_labels, math.prod(lead), ignore_index, student_logits.device)
    compute_grad = student_logits.requires_grad and torch.is_grad_enabled()
    op = topk_distill_loss_triton if name == "triton" else native(f"topk_distill_loss_{name}")
    options = (TAIL_CODES[tail], code, float(temperature), weight, float(soft_weight), float(hard_weight),
               bool(scale_t2), int(ignore_index), compute_grad)
    parts, start = [], 0
    for student, logprobs, indices in row_blocks(student_logits, kernel_logprobs.detach(), teacher_topk_indices):
        block_labels = None if rows_labels is None else rows_labels[start:start + student.shape[0]]
        parts.append(op(student, logprobs, indices, block_labels, scale, *options)[0])
        start += student.shape[0]
    rows = parts[0] if len(parts) == 1 else torch.cat(parts)
    return rows.view(lead) if reduction == "none" else rows.sum()
