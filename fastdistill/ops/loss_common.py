"""What the distillation-loss ops (distill_loss, topk_distill_loss, fused_linear_distill_loss) share:
option checks, the exact endpoints of the divergences, the row scale of each reduction, and the
outputs and autograd of ops that compute the student's gradient in the forward pass."""
from __future__ import annotations

import numbers

import torch

from fastdistill.ops.common import check_labels, check_number, new_output
from fastdistill.reference.distill_loss import DIVERGENCES, REDUCTIONS

# Codes shared with csrc/include/fd_divergence.h and fastdistill/kernels/distill_loss.py.
DIVERGENCE_CODES = {name: code for code, name in enumerate(DIVERGENCES)}
# Above this temperature the float32 kernels lose the loss: log p - log q shrinks like 1/T while its
# rounding does not, and the T² factor scales the error back up (measured, V = 32000, vs float64: relative
# error 6e-5 at T = 100, 8e-4 at 300, 3e-2 at 1000, 0.14 at 1e4 for kl). 100 is far above the 1-20 KD uses.
MAX_TEMPERATURE = 100.0


def loss_outputs(student: torch.Tensor, compute_grad: bool):
    """(row losses float32 [rows], gradient like student or an empty placeholder) for a kernel to fill."""
    loss = new_output((student.shape[0],), like=student, dtype=torch.float32)
    grad = new_output(student.shape if compute_grad else (0,), like=student)
    return loss, grad


def setup_loss_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd builds a [rows, V] zero "gradient" for output[1]


def loss_backward(n_inputs: int):
    """The backward of an op with `n_inputs` arguments whose first is the student and whose outputs are
    (row losses, gradient computed in the forward pass)."""
    def backward(ctx, grad_rows, _grad_of_grad):
        """Scales the saved gradient in place by the upstream gradient of each row and returns it: no
        new [rows, V] buffer (on CPU a fresh buffer costs more than the multiply, in page faults). The
        buffer is private to this call; the only hazard, a second backward through the same graph
        (retain_graph=True), is refused by autograd's version counter on the saved tensor."""
        (grad,) = ctx.saved_tensors
        if grad_rows is None:  # the losses were not used (grads are not materialized as zeros)
            return (None,) * n_inputs
        if grad.dim() == 1:
            raise RuntimeError("distill_loss: backward through a call made with compute_grad=False")
        # One rounding into the student dtype; grad_rows stays float32 (it may be 1/accumulation_steps).
        if type(grad) is torch.Tensor and not torch.compiler.is_compiling():
            grad.mul_(grad_rows.unsqueeze(-1))
        else:  # traced (compile, fake/functional tensors): out of place; the compiler plans the memory
            grad = (grad * grad_rows.unsqueeze(-1)).to(grad.dtype)
        return (grad,) + (None,) * (n_inputs - 1)  # only the student gets a gradient
    return backward


def check_logits(student, teacher, labels) -> None:
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
    check_labels(labels, student, "student_logits", "the logits without V")


def check_loss_options(divergence, temperature, beta, skew, soft_weight, hard_weight, reduction, num_items,
                       labels, ignore_index=-100) -> None:
    if divergence not in DIVERGENCE_CODES:
        raise ValueError(f"divergence: unknown {divergence!r}; expected one of {DIVERGENCES}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: unknown {reduction!r}; expected one of {REDUCTIONS}")
    check_number("temperature", temperature, low=0.0, low_open=True)
    if float(temperature) > MAX_TEMPERATURE and divergence != "mse":
        raise ValueError(f"temperature: {float(temperature):g} is above {MAX_TEMPERATURE:g}, where float32 "
                         f"kernels cannot resolve the divergence (relative error grows like T²)")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    check_number("beta", beta, low=0.0, high=1.0)
    check_number("skew", skew, low=0.0, high=1.0)
    check_number("soft_weight", soft_weight)
    if check_number("hard_weight", hard_weight) != 0.0 and labels is None:
        raise ValueError("hard_weight: is non-zero but labels is None (the hard-label term needs labels)")
    if num_items is None:
        return
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items: expected a one-element tensor, got shape {tuple(num_items.shape)}")
    else:
        check_number("num_items", num_items, low=0.0, low_open=True)


def check_label_values(labels: torch.Tensor | None, V: int, ignore_index: int) -> None:
    """Every label is ignore_index or a class in [0, V) (also when only used to mask rows: anything else is
    a data bug). CPU tensors raise a ValueError naming the first bad label; CUDA tensors (and traced calls)
    get a device-side assert, as F.cross_entropy does, because a host check would synchronise."""
    if labels is None or labels.numel() == 0:
        return
    ok = (labels == ignore_index) | ((labels >= 0) & (labels < V))
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok.all()):
            bad = (~ok).reshape(-1).nonzero()[0, 0]
            raise ValueError(f"labels: value {int(labels.reshape(-1)[bad])} at row {int(bad)} is neither "
                             f"ignore_index ({ignore_index}) nor a class in [0, {V})")
        return
    torch._assert_async(ok.all(), "labels: a value is neither ignore_index nor a class in [0, V)")


def resolve(divergence: str, beta: float, skew: float, soft_weight: float) -> tuple[int, float, float]:
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


def row_scale(reduction, num_items, labels, n_rows, ignore_index, device) -> torch.Tensor:
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


# ---- cached teacher targets ((..., k) log-probs and token ids next to (..., V) student logits) ----------------

INDEX_DTYPES = (torch.int32, torch.int64)


def check_target_tensors(student, logprobs, indices, labels, names: tuple[str, str]) -> None:
    """Types, devices and shapes shared by the top-k and sampled losses; `names` are the log-prob and id
    arguments' names (teacher_topk_* / teacher_sampled_*)."""
    check_logits(student, student, labels)  # student + labels, as distill_loss checks them
    lp_name, ids_name = names
    for name, t in zip(names, (logprobs, indices)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device != student.device:
            raise ValueError(f"{name}: on {t.device}, student_logits on {student.device}")
    if not logprobs.is_floating_point():
        raise TypeError(f"{lp_name}: expected a floating-point tensor, got {logprobs.dtype}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"{ids_name}: expected int32 or int64 token ids, got {indices.dtype}")
    if logprobs.dim() != student.dim() or logprobs.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"{lp_name}: expected shape {tuple(student.shape[:-1])} + (k,) to match "
                         f"student_logits {tuple(student.shape)}, got {tuple(logprobs.shape)}")
    if indices.shape != logprobs.shape:
        raise ValueError(f"{ids_name}: shape {tuple(indices.shape)} does not match {lp_name} "
                         f"shape {tuple(logprobs.shape)}")


def counted_ids_in_range(indices, V: int, labels, ignore_index: int, name: str):
    """validate=True's first step (a host sync): (ids [rows, k] int64, counted [rows] bool) after checking
    that every id of a counted row (label != ignore_index) lies in [0, V)."""
    ids = indices.reshape(-1, indices.shape[-1]).long()
    counted = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    if labels is not None:
        counted = labels.reshape(-1) != ignore_index
    out = counted.unsqueeze(-1) & ((ids < 0) | (ids >= V))
    if out.any():
        row, col = (int(x) for x in out.nonzero()[0])
        raise ValueError(f"{name}: id {int(ids[row, col])} in row {row} is outside [0, V = {V})")
    return ids, counted
