"""fastdistill.distill_loss: validation, the custom ops of each backend, autograd, and dispatch.

Custom ops (one per backend, same schema):
    fastdistill::distill_loss_cpu / _cuda   defined in csrc/ops.cpp, kernels in csrc/
    fastdistill::distill_loss_triton        defined here, kernel in fastdistill/kernels/distill_loss.py
Each returns (row losses in float32 already multiplied by `scale`, gradient w.r.t. the student
in its dtype). The gradient is computed in the forward pass; backward only scales it.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Optional

import torch

from fastdistill import _ext, dispatch
from fastdistill.reference.distill_loss import DIVERGENCES, REDUCTIONS, distill_loss_ref
from fastdistill.testing import new_output

# Codes shared with csrc/include/fd_divergence.h and fastdistill/kernels/distill_loss.py.
DIVERGENCE_CODES = {name: code for code, name in enumerate(DIVERGENCES)}


def _empty_outputs(student, compute_grad):
    loss = new_output((student.shape[0],), like=student, dtype=torch.float32)
    grad = new_output(student.shape if compute_grad else (0,), like=student)
    return loss, grad


@torch.library.custom_op("fastdistill::distill_loss_triton", mutates_args=())
def distill_loss_triton(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                        scale: torch.Tensor, divergence: int, temperature: float, weight: float,
                        soft_weight: float, hard_weight: float, scale_t2: bool, ignore_index: int,
                        compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fastdistill.kernels.distill_loss import distill_loss_triton_launch  # imports triton on first use

    loss, grad = _empty_outputs(student, compute_grad)
    mse = divergence == DIVERGENCE_CODES["mse"]
    coef = soft_weight * (temperature ** 2 if scale_t2 and not mse else 1.0)
    V = student.shape[-1]
    distill_loss_triton_launch(
        student, teacher, labels, scale, loss, grad if compute_grad else None, divergence=divergence,
        inv_t=1.0 / temperature, w=weight, log_w=math.log(weight) if weight > 0 else -math.inf,
        log_1mw=math.log1p(-weight) if weight < 1 else -math.inf, soft_coef=coef,
        grad_coef=2.0 * soft_weight / max(V, 1) if mse else coef / temperature, hard_weight=hard_weight,
        ignore_index=ignore_index, interpret=os.environ.get("TRITON_INTERPRET") == "1")
    return loss, grad


def _fake(student, teacher, labels, scale, divergence, temperature, weight, soft_weight, hard_weight, scale_t2,
          ignore_index, compute_grad):
    return _empty_outputs(student, compute_grad)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd builds a [rows, V] zero "gradient" for output[1]


_N_INPUTS = 12  # arguments of the distill_loss_<backend> ops


def _backward(ctx, grad_rows, _grad_of_grad):
    """Scales the saved gradient in place by the upstream gradient of each row and returns it: no
    new [rows, V] buffer (on CPU a fresh buffer costs more than the multiply, in page faults). The
    buffer is private to this call; the only hazard, a second backward through the same graph
    (retain_graph=True), is refused by autograd's version counter on the saved tensor."""
    (grad,) = ctx.saved_tensors
    if grad_rows is None:  # the losses were not used (grads are not materialized as zeros)
        return (None,) * _N_INPUTS
    if grad.dim() == 1:
        raise RuntimeError("distill_loss: backward through a call made with compute_grad=False")
    # One rounding into the student dtype; grad_rows stays float32 (it may be 1/accumulation_steps).
    if type(grad) is torch.Tensor and not torch.compiler.is_compiling():
        grad.mul_(grad_rows.unsqueeze(-1))
    else:  # traced (compile, fake/functional tensors): out of place; the compiler plans the memory
        grad = (grad * grad_rows.unsqueeze(-1)).to(grad.dtype)
    return (grad,) + (None,) * (_N_INPUTS - 1)  # only the student gets a gradient


torch.library.register_fake("fastdistill::distill_loss_triton")(_fake)
torch.library.register_autograd("fastdistill::distill_loss_triton", _backward, setup_context=_setup_context)

_native_registered = False


def _native_op(backend: str):
    """torch.ops.fastdistill.distill_loss_{cpu,cuda}, with fake + autograd registered once."""
    global _native_registered
    if not _native_registered:
        _ext.load_error()  # imports fastdistill._C, which defines the ops
        for name in ("fastdistill::distill_loss_cpu", "fastdistill::distill_loss_cuda"):
            torch.library.register_fake(name)(_fake)
            torch.library.register_autograd(name, _backward, setup_context=_setup_context)
        _native_registered = True
    return getattr(torch.ops.fastdistill, f"distill_loss_{backend}")


def _check_number(name, value, *, low=None, high=None, low_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name}: must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: must be <= {high}, got {value}")
    return value


def _check_tensors(student, teacher, labels):
    for name, t in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.dim() < 1 or t.shape[-1] < 1:
            raise ValueError(f"{name}: expected shape (..., V) with V >= 1, got {tuple(t.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher_logits: shape {tuple(teacher.shape)} does not match student_logits "
                         f"shape {tuple(student.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"teacher_logits: on {teacher.device}, student_logits on {student.device}")
    _check_labels(labels, student, "student_logits", "the logits without V")


def _check_labels(labels, rows_like: torch.Tensor, rows_name: str, shape_hint: str) -> None:
    """labels: None, or integers of shape rows_like.shape[:-1] on rows_like's device."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor or None, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer tensor, got {labels.dtype}")
    if labels.shape != rows_like.shape[:-1]:
        raise ValueError(f"labels: expected shape {tuple(rows_like.shape[:-1])} ({shape_hint}), "
                         f"got {tuple(labels.shape)}")
    if labels.device != rows_like.device:
        raise ValueError(f"labels: on {labels.device}, {rows_name} on {rows_like.device}")


def _check_options(divergence, temperature, beta, skew, soft_weight, hard_weight, reduction, num_items, labels):
    if divergence not in DIVERGENCE_CODES:
        raise ValueError(f"divergence: unknown {divergence!r}; expected one of {DIVERGENCES}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: unknown {reduction!r}; expected one of {REDUCTIONS}")
    _check_number("temperature", temperature, low=0.0, low_open=True)
    _check_number("beta", beta, low=0.0, high=1.0)
    _check_number("skew", skew, low=0.0, high=1.0)
    _check_number("soft_weight", soft_weight)
    if _check_number("hard_weight", hard_weight) != 0.0 and labels is None:
        raise ValueError("hard_weight: is non-zero but labels is None (the hard-label term needs labels)")
    if num_items is None:
        return
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items: expected a one-element tensor, got shape {tuple(num_items.shape)}")
    else:
        _check_number("num_items", num_items, low=0.0, low_open=True)


def _resolve(divergence: str, beta: float, skew: float, soft_weight: float) -> tuple[int, float, float]:
    """Kernel divergence code, weight (beta or skew) and soft weight, with the exact endpoints:
    jsd at beta 0 / 1 is kl / reverse_kl; skew_kl / skew_reverse_kl at skew 0 are kl / reverse_kl (the
    mixture is the other distribution) and at skew 1 are identically 0 (the mixture is the compared
    distribution itself), so the soft term is dropped there, also from the gradient."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        return DIVERGENCE_CODES["kl" if beta == 0.0 else "reverse_kl"], 0.0, soft_weight
    if divergence.startswith("skew") and skew == 0.0:
        return DIVERGENCE_CODES["kl" if divergence == "skew_kl" else "reverse_kl"], 0.0, soft_weight
    if divergence.startswith("skew") and skew == 1.0:
        return DIVERGENCE_CODES[divergence], 1.0, 0.0
    weight = beta if divergence == "jsd" else skew if divergence.startswith("skew") else 0.0
    return DIVERGENCE_CODES[divergence], float(weight), soft_weight


def _row_scale(reduction, num_items, labels, n_rows, ignore_index, device) -> torch.Tensor:
    """The factor every row loss and gradient is multiplied by, as a (1,) float32 tensor (no host sync)."""
    if reduction != "batchmean":
        return torch.ones(1, dtype=torch.float32, device=device)
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            return num_items.to(device=device, dtype=torch.float32).reshape(1).reciprocal()
        return torch.full((1,), 1.0 / float(num_items), dtype=torch.float32, device=device)
    if labels is None:
        return torch.full((1,), 1.0 / max(n_rows, 1), dtype=torch.float32, device=device)
    count = (labels != ignore_index).sum().clamp_(min=1)
    return count.to(torch.float32).reciprocal().reshape(1)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, labels=None,
                 divergence: str = "kl", temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                 soft_weight: float = 1.0, hard_weight: float = 0.0, scale_t2: bool = True,
                 ignore_index: int = -100, reduction: str = "batchmean", num_items=None,
                 backend: str = "auto") -> torch.Tensor:
    """Fused distillation loss between student and teacher logits of shape (..., V).

    Row loss = soft_weight · (T² if scale_t2) · D(p ‖ q) + hard_weight · CE(student, labels), with
    p = softmax(teacher / T), q = softmax(student / T) and D chosen by `divergence` (see README).
    Rows whose label == ignore_index count in neither term. Returns a float32 loss: a scalar for
    "batchmean" (sum / valid rows, or / num_items) and "sum", the per-row losses (shape (...)) for
    "none". Only the student receives a gradient, in its own dtype.
    """
    _check_tensors(student_logits, teacher_logits, labels)
    _check_options(divergence, temperature, beta, skew, soft_weight, hard_weight, reduction, num_items, labels)
    name = dispatch.select("distill_loss", backend, student_logits.device,
                           (student_logits.dtype, teacher_logits.dtype))
    if name == "reference":
        return distill_loss_ref(student_logits, teacher_logits, labels, divergence=divergence,
                                temperature=float(temperature), beta=float(beta), skew=float(skew),
                                soft_weight=float(soft_weight), hard_weight=float(hard_weight),
                                scale_t2=scale_t2, ignore_index=ignore_index, reduction=reduction,
                                num_items=num_items)
    lead = student_logits.shape[:-1]
    student, teacher = _as_rows(student_logits), _as_rows(teacher_logits.detach())
    rows_labels = None if labels is None else labels.reshape(-1).to(torch.int64)
    code, weight, soft_weight = _resolve(divergence, float(beta), float(skew), float(soft_weight))
    scale = _row_scale(reduction, num_items, rows_labels, student.shape[0], ignore_index, student.device)
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    op = distill_loss_triton if name == "triton" else _native_op(name)
    rows, _ = op(student, teacher, rows_labels, scale, code, float(temperature), weight, float(soft_weight),
                 float(hard_weight), bool(scale_t2), int(ignore_index), compute_grad)
    return rows.view(lead) if reduction == "none" else rows.sum()
