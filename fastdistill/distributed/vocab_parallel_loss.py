"""distill_loss with the logits sharded along the vocabulary (tensor parallel on the output head).

fastdistill.distill_loss routes here when its logits are DTensors or `group=` is given. Plain PyTorch per chunk
of rows (fastdistill/distributed/vocab_parallel_stats.py); the gradient of this rank's slice is computed in the
forward pass, so backward only scales it by the upstream row gradients: no collective in backward.
"""
from __future__ import annotations

import math

import torch

from fastdistill.distributed.vocab_parallel_shards import chunk_rows, local_rows, localize
from fastdistill.distributed.vocab_parallel_stats import LossOptions, dense_chunk
from fastdistill.ops.common import check_float, row_labels
from fastdistill.ops.loss_common import check_label_values, check_logits, check_loss_options, resolve, row_scale
from fastdistill.reference.distill_loss import DIVERGENCES

BACKENDS = ("auto", "reference")


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: vocabulary-parallel calls run in plain PyTorch between per-row all-reduces; "
                         f"expected one of {BACKENDS}, got {backend!r}")


class ShardedRows(torch.autograd.Function):
    """Row losses of this rank's [rows, V_r] student slice, chunk by chunk; the slice's gradient is computed in
    forward (chunk_loss(rows slice, want_grad) -> (row losses, gradient rows or None)), backward scales it."""

    @staticmethod
    def forward(ctx, student, chunk_loss, chunk, out_dtype):
        want_grad = ctx.needs_input_grad[0]
        n = student.shape[0]
        rows = torch.zeros(n, dtype=out_dtype, device=student.device)
        grad = torch.empty_like(student) if want_grad else None
        for i in range(0, n, chunk):
            r, g = chunk_loss(slice(i, i + chunk), want_grad)
            rows[i:i + chunk] = r
            if want_grad:
                grad[i:i + chunk] = g
        ctx.save_for_backward(grad)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        (grad,) = ctx.saved_tensors
        # the product in the wider dtype, one rounding into the student's (grad_rows may be 1/accumulation_steps)
        out = None if grad is None else (grad * grad_rows.unsqueeze(-1)).to(grad.dtype)
        return out, None, None, None


def out_dtype(*tensors) -> torch.dtype:
    """The loss dtype: float64 when an input is float64 (the test oracle's precision), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def row_scale64(reduction, num_items, labels, n_rows: int, ignore_index: int, device) -> torch.Tensor:
    """ops.loss_common.row_scale in float64 (no host sync): float64 inputs keep float64 precision end to end."""
    scale = row_scale(reduction, num_items, labels, n_rows, ignore_index, device)
    if reduction != "batchmean":
        return scale.double()
    if num_items is not None:
        count = num_items if isinstance(num_items, torch.Tensor) else torch.tensor(float(num_items))
        return count.to(device=device, dtype=torch.float64).reshape(1).reciprocal()
    if labels is None:
        return torch.full((1,), 1.0 / max(n_rows, 1), dtype=torch.float64, device=device)
    return (labels != ignore_index).sum().clamp(min=1).to(torch.float64).reciprocal().reshape(1)


def loss_options(divergence, beta, skew, temperature, soft_weight, hard_weight, scale_t2, ignore_index) -> LossOptions:
    code, weight, soft = resolve(divergence, float(beta), float(skew), float(soft_weight))
    return LossOptions(DIVERGENCES[code], weight, float(temperature), soft, float(hard_weight), bool(scale_t2),
                       int(ignore_index))


def vocab_parallel_distill_loss(student_logits, teacher_logits, *, labels=None, divergence: str = "kl",
                                temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                                soft_weight: float = 1.0, hard_weight: float = 0.0, scale_t2: bool = True,
                                ignore_index: int = -100, reduction: str = "batchmean", num_items=None,
                                backend: str = "auto", group=None) -> torch.Tensor:
    """fastdistill.distill_loss over logits split along the vocabulary across the ranks of a process group.

    student_logits / teacher_logits: DTensors placed Shard(-1) on a 1-D mesh, or this rank's (..., V_r) slices
    with group=. labels (global ids) and the options are those of distill_loss and must be the same on every
    rank. Returns the same value on every rank (a plain tensor); the student's gradient is this rank's slice
    (a DTensor with the input's placement for DTensor inputs).
    """
    check_backend(backend)
    check_float("student_logits", student_logits)
    check_float("teacher_logits", teacher_logits)
    shards, (student, teacher), (labels,) = localize(
        [("student_logits", student_logits, -1), ("teacher_logits", teacher_logits, -1)], [("labels", labels)],
        group)
    check_logits(student, teacher, labels)
    check_loss_options(divergence, temperature, beta, skew, soft_weight, hard_weight, reduction, num_items, labels,
                       ignore_index)
    check_label_values(labels, shards.vocab, int(ignore_index))
    lead = student.shape[:-1]
    rows_labels = row_labels(labels)
    n_rows = math.prod(lead)
    scale = row_scale64(reduction, num_items, rows_labels, n_rows, ignore_index, student.device)
    opt = loss_options(divergence, beta, skew, temperature, soft_weight, hard_weight, scale_t2, ignore_index)
    if not torch.is_grad_enabled():
        student = student.detach()
    student_rows, teacher_rows = local_rows(student), local_rows(teacher.detach())
    detached = student_rows.detach()

    def chunk_loss(part, want_grad):
        part_labels = None if rows_labels is None else rows_labels[part]
        return dense_chunk(detached[part], teacher_rows[part], part_labels, scale, shards, opt, want_grad)

    rows = ShardedRows.apply(student_rows, chunk_loss, chunk_rows(shards, n_rows), out_dtype(student, teacher))
    return rows.view(lead) if reduction == "none" else rows.sum()
