"""fastdistill.distill_loss: validation, the custom ops of each backend, autograd, and dispatch.

Custom ops (one per backend, same schema):
    fastdistill::distill_loss_cpu / _cuda   defined in csrc/ops.cpp, kernels in csrc/
    fastdistill::distill_loss_triton        defined here, kernel in fastdistill/kernels/distill_loss.py
Each returns (row losses in float32 already multiplied by `scale`, gradient w.r.t. the student
in its dtype). The gradient is computed in the forward pass; backward only scales it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastdistill import dispatch
from fastdistill.distributed.vocab_parallel_route import any_dtensor
from fastdistill.ops.common import (as_int64, interpreting, launch_guard, native, register_native, row_blocks,
                                    row_labels)
from fastdistill.ops.loss_common import (DIVERGENCE_CODES, check_label_values, check_logits, check_loss_options,
                                         loss_backward, loss_outputs, resolve, row_scale, setup_loss_context)
from fastdistill.reference.distill_loss import distill_loss_ref


@torch.library.custom_op("fastdistill::distill_loss_triton", mutates_args=())
def distill_loss_triton(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                        scale: torch.Tensor, divergence: int, temperature: float, weight: float,
                        soft_weight: float, hard_weight: float, scale_t2: bool, ignore_index: int,
                        compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fastdistill.kernels.distill_loss import distill_loss_triton_launch  # imports triton on first use

    loss, grad = loss_outputs(student, compute_grad)
    mse = divergence == DIVERGENCE_CODES["mse"]
    coef = soft_weight * (temperature ** 2 if scale_t2 and not mse else 1.0)
    V = student.shape[-1]
    with launch_guard(student):
        distill_loss_triton_launch(
            student, teacher, labels, scale, loss, grad if compute_grad else None, divergence=divergence,
            inv_t=1.0 / temperature, w=weight, log_w=math.log(weight) if weight > 0 else -math.inf,
            log_1mw=math.log1p(-weight) if weight < 1 else -math.inf, soft_coef=coef,
            grad_coef=2.0 * soft_weight / max(V, 1) if mse else coef / temperature, hard_weight=hard_weight,
            ignore_index=ignore_index, interpret=interpreting())
    return loss, grad


def _fake(student, teacher, labels, scale, divergence, temperature, weight, soft_weight, hard_weight, scale_t2,
          ignore_index, compute_grad):
    return loss_outputs(student, compute_grad)


_BACKWARD = loss_backward(12)  # arguments of the distill_loss_<backend> ops
torch.library.register_fake("fastdistill::distill_loss_triton")(_fake)
torch.library.register_autograd("fastdistill::distill_loss_triton", _BACKWARD, setup_context=setup_loss_context)
register_native(("distill_loss_cpu", "distill_loss_cuda"), _fake, (_BACKWARD, setup_loss_context))


def loss_op(backend: str):
    """The distill_loss_<backend> custom op (also run per chunk by fused_linear_distill_loss)."""
    return distill_loss_triton if backend == "triton" else native(f"distill_loss_{backend}")


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, labels=None,
                 divergence: str = "kl", temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                 soft_weight: float = 1.0, hard_weight: float = 0.0, scale_t2: bool = True,
                 ignore_index: int = -100, reduction: str = "batchmean", num_items=None,
                 backend: str = "auto", group=None) -> torch.Tensor:
    """Fused distillation loss between student and teacher logits of shape (..., V).

    Row loss = soft_weight · (T² if scale_t2) · D(p ‖ q) + hard_weight · CE(student, labels), with
    p = softmax(teacher / T), q = softmax(student / T) and D chosen by `divergence` (see README).
    Rows whose label == ignore_index count in neither term. Returns a float32 loss: a scalar for
    "batchmean" (sum / valid rows, or / num_items) and "sum", the per-row losses (shape (...)) for
    "none". Only the student receives a gradient, in its own dtype.
    Vocabulary-sharded logits (DTensors placed Shard(-1), or local slices with group=, a ProcessGroup):
    see fastdistill.distributed.vocab_parallel_loss (per-row all-reduces only; docs/sharded.md).
    """
    if group is not None or any_dtensor(student_logits, teacher_logits, labels):
        from fastdistill.distributed.vocab_parallel_loss import vocab_parallel_distill_loss
        return vocab_parallel_distill_loss(
            student_logits, teacher_logits, labels=labels, divergence=divergence, temperature=temperature, beta=beta,
            skew=skew, soft_weight=soft_weight, hard_weight=hard_weight, scale_t2=scale_t2, ignore_index=ignore_index,
            reduction=reduction, num_items=num_items, backend=backend, group=group)
    check_logits(student_logits, teacher_logits, labels)
    check_loss_options(divergence, temperature, beta, skew, soft_weight, hard_weight, reduction, num_items, labels,
                       ignore_index)
    check_label_values(labels, student_logits.shape[-1], int(ignore_index))
    name = dispatch.select("distill_loss", backend, student_logits.device,
                           (student_logits.dtype, teacher_logits.dtype))
    if name == "reference":
        return distill_loss_ref(student_logits, teacher_logits, as_int64(labels), divergence=divergence,
                                temperature=float(temperature), beta=float(beta), skew=float(skew),
                                soft_weight=float(soft_weight), hard_weight=float(hard_weight),
                                scale_t2=scale_t2, ignore_index=ignore_index, reduction=reduction,
                                num_items=num_items)
    lead = student_logits.shape[:-1]
    rows_labels = row_labels(labels)
    code, weight, soft_weight = resolve(divergence, float(beta), float(skew), float(soft_weight))
    n_rows = math.prod(lead)
    scale = row_scale(reduction, num_items, rows_labels, n_rows, ignore_index, student_logits.device)
    compute_grad = student_logits.requires_grad and torch.is_grad_enabled()
    options = (code, float(temperature), weight, float(soft_weight), float(hard_weight), bool(scale_t2),
               int(ignore_index), compute_grad)
    parts, start = [], 0
    for student, teacher in row_blocks(student_logits, teacher_logits.detach()):  # views, no copies
        block_labels = None if rows_labels is None else rows_labels[start:start + student.shape[0]]
        parts.append(loss_op(name)(student, teacher, block_labels, scale, *options)[0])
        start += student.shape[0]
    rows = parts[0] if len(parts) == 1 else torch.cat(parts)
    return rows.view(lead) if reduction == "none" else rows.sum()
