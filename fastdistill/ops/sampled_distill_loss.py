"""fastdistill.sampled_distill_loss: distillation from k token ids sampled from the teacher (RS-KD, offline KD).

Custom ops (one per backend, same schema):
    fastdistill::sampled_distill_loss_cpu      defined in csrc/ops.cpp, kernel in csrc/cpu/sampled_distill_loss.cpp
    fastdistill::sampled_distill_loss_cuda     defined in csrc/ops.cpp, kernel in csrc/cuda/
    fastdistill::sampled_distill_loss_triton   defined here, kernel in fastdistill/kernels/sampled_distill_loss.py
Each returns (row losses in float32 already multiplied by `scale`, gradient w.r.t. the full student
logits in their dtype), like the topk_distill_loss ops, whose validation, scaling and autograd this reuses.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastdistill import dispatch
from fastdistill.cache.targets import unpack_targets
from fastdistill.distributed.vocab_parallel_route import is_dtensor
from fastdistill.ops.common import (as_int64, interpreting, launch_guard, native, register_native, row_blocks,
                                    row_labels)
from fastdistill.ops.loss_common import (check_label_values, check_loss_options, check_target_tensors,
                                         counted_ids_in_range, loss_backward, loss_outputs, row_scale,
                                         setup_loss_context)
from fastdistill.reference.sampled_distill_loss import sampled_distill_loss_ref

NAMES = ("teacher_sampled_logprobs", "teacher_sampled_indices")


@torch.library.custom_op("fastdistill::sampled_distill_loss_triton", mutates_args=())
def sampled_distill_loss_triton(student: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor,
                                labels: Optional[torch.Tensor], scale: torch.Tensor, temperature: float,
                                soft_weight: float, hard_weight: float, scale_t2: bool, ignore_index: int,
                                compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fastdistill.kernels.sampled_distill_loss import sampled_distill_loss_triton_launch  # imports triton

    loss, grad = loss_outputs(student, compute_grad)
    coef = soft_weight * (temperature ** 2 if scale_t2 else 1.0)
    with launch_guard(student):
        sampled_distill_loss_triton_launch(
            student, teacher_logprobs, teacher_indices, labels, scale, loss, grad if compute_grad else None,
            inv_t=1.0 / temperature, soft_coef=coef, grad_coef=coef / temperature, hard_weight=hard_weight,
            ignore_index=ignore_index, interpret=interpreting())
    return loss, grad


def _fake(student, teacher_logprobs, teacher_indices, labels, scale, temperature, soft_weight, hard_weight,
          scale_t2, ignore_index, compute_grad):
    return loss_outputs(student, compute_grad)


_BACKWARD = loss_backward(11)  # arguments of the sampled_distill_loss_<backend> ops
torch.library.register_fake("fastdistill::sampled_distill_loss_triton")(_fake)
torch.library.register_autograd("fastdistill::sampled_distill_loss_triton", _BACKWARD,
                                setup_context=setup_loss_context)
register_native(("sampled_distill_loss_cpu", "sampled_distill_loss_cuda"), _fake, (_BACKWARD, setup_loss_context))


def check_sampled_tensors(student, logprobs, indices, labels) -> None:
    """Types, devices and shapes of the sampled inputs (k >= 1 draws per row; k > V is allowed: the draws
    are with replacement). Shared with the fused linear sampled loss."""
    check_target_tensors(student, logprobs, indices, labels, NAMES)
    if logprobs.shape[-1] < 1:
        raise ValueError("teacher_sampled_logprobs: k = 0 draws per row (need k >= 1)")


def _refuse_dtensors(student, logprobs, indices, labels) -> None:
    for name, t in zip(("student_logits",) + NAMES + ("labels",), (student, logprobs, indices, labels)):
        if is_dtensor(t):
            raise TypeError(f"{name}: a DTensor; sampled_distill_loss has no vocabulary-parallel form (pass "
                            f"local, full-vocabulary tensors, e.g. dtensor.full_tensor())")


def validate_sampled(logprobs, indices, V, labels, ignore_index) -> None:
    """validate=True (a host sync): on the rows that count, ids in [0, V), log-probs finite (a drawn token
    has probability > 0), and the draws of one id carry one log-prob."""
    lp = logprobs.detach().reshape(-1, logprobs.shape[-1])
    ids, counted = counted_ids_in_range(indices, V, labels, ignore_index, "teacher_sampled_indices")
    nonfinite = counted.unsqueeze(-1) & ~torch.isfinite(lp)
    if nonfinite.any():
        row, col = (int(x) for x in nonfinite.nonzero()[0])
        raise ValueError(f"teacher_sampled_logprobs: {float(lp[row, col])} at draw {col} of row {row} (a drawn "
                         f"token has a finite log-probability)")
    ordered, order = ids.sort(dim=-1, stable=True)
    lp_ordered = lp.gather(-1, order)
    clash = counted.unsqueeze(-1) & (ordered[:, 1:] == ordered[:, :-1]) & (lp_ordered[:, 1:] != lp_ordered[:, :-1])
    if clash.any():
        row, col = (int(x) for x in clash.nonzero()[0])
        raise ValueError(f"teacher_sampled_logprobs: id {int(ordered[row, col])} appears twice in row {row} with "
                         f"different log-probs")


def sampled_distill_loss(student_logits: torch.Tensor, teacher_sampled_logprobs, teacher_sampled_indices=None, *,
                         labels=None, temperature: float = 1.0, soft_weight: float = 1.0, hard_weight: float = 0.0,
                         scale_t2: bool = True, ignore_index: int = -100, reduction: str = "batchmean",
                         num_items=None, validate: bool = False, backend: str = "auto") -> torch.Tensor:
    """Forward-KL distillation against k token ids sampled from the teacher (RS-KD, estimator "counts").

    student_logits (..., V); teacher_sampled_logprobs (..., k), the teacher's log_softmax(logits / T) at
    each draw (any float dtype; float64 is read as float32 by the kernels); teacher_sampled_indices
    (..., k) the drawn ids (int32/int64; draws with replacement, so duplicates and k > V are fine), as
    fastdistill.cache.sampling.sample_teacher_targets gives them. Or a TeacherTargets batch of kind
    "sampled" (TeacherCache.collate) in place of the log-probs, with teacher_sampled_indices=None: its
    temperature and vocabulary must match the call.
    With q = softmax(student / T) over the full vocabulary and coef = soft_weight · (T² if scale_t2):
      row loss = coef · mean_j (lp_j - log q(x_j)) + hard_weight · CE(student, labels)
      d row / d student = coef / T · (q - p_hat) + the hard-label term, p_hat = the draws' frequencies,
    an unbiased estimate of coef · KL(p_T ‖ q) and of its gradient. Reductions and ignore_index as in
    fastdistill.distill_loss. Only the student gets a gradient (over all V, in its dtype).
    Ids outside [0, V): the cpu backend raises, triton and reference give that row a NaN loss and gradient.
    validate=True checks ids, log-probs and duplicates first (a host sync; not for torch.compile).
    """
    check_loss_options("kl", temperature, 0.5, 0.1, soft_weight, hard_weight, reduction, num_items, labels,
                       ignore_index)
    if not isinstance(student_logits, torch.Tensor):
        raise TypeError(f"student_logits: expected a torch.Tensor, got {type(student_logits).__name__}")
    if student_logits.dim() < 1:
        raise ValueError(f"student_logits: expected shape (..., V), got {tuple(student_logits.shape)}")
    V = student_logits.shape[-1]
    logprobs, indices = unpack_targets("sampled", teacher_sampled_logprobs, teacher_sampled_indices,
                                       temperature=float(temperature), vocab=V, names=NAMES)
    _refuse_dtensors(student_logits, logprobs, indices, labels)
    check_sampled_tensors(student_logits, logprobs, indices, labels)
    check_label_values(labels, V, int(ignore_index))
    if validate:
        validate_sampled(logprobs, indices, V, labels, ignore_index)
    kernel_logprobs = logprobs if logprobs.dtype in dispatch.KERNEL_DTYPES else logprobs.float()
    name = dispatch.select("sampled_distill_loss", backend, student_logits.device,
                           (student_logits.dtype, kernel_logprobs.dtype))
    if name == "reference":
        return sampled_distill_loss_ref(student_logits, logprobs, indices, as_int64(labels),
                                        temperature=float(temperature), soft_weight=float(soft_weight),
                                        hard_weight=float(hard_weight), scale_t2=scale_t2,
                                        ignore_index=ignore_index, reduction=reduction, num_items=num_items)
    lead = student_logits.shape[:-1]
    rows_labels = row_labels(labels)
    scale = row_scale(reduction, num_items, rows_labels, math.prod(lead), ignore_index, student_logits.device)
    compute_grad = student_logits.requires_grad and torch.is_grad_enabled()
    op = sampled_distill_loss_triton if name == "triton" else native(f"sampled_distill_loss_{name}")
    options = (float(temperature), float(soft_weight), float(hard_weight), bool(scale_t2), int(ignore_index),
               compute_grad)
    parts, start = [], 0
    for student, block_lp, block_ids in row_blocks(student_logits, kernel_logprobs.detach(), indices):
        block_labels = None if rows_labels is None else rows_labels[start:start + student.shape[0]]
        parts.append(op(student, block_lp, block_ids, block_labels, scale, *options)[0])
        start += student.shape[0]
    rows = parts[0] if len(parts) == 1 else torch.cat(parts)
    return rows.view(lead) if reduction == "none" else rows.sum()
