"""What the fused linear losses (fused_linear_distill_loss, fused_linear_topk_distill_loss,
fused_linear_sampled_distill_loss) share: the head and option checks, the autocast rule, and FusedLossOps,
the custom ops of one loss (one per kernel backend) with their fake and autograd.

Every op takes (student_hidden, student_weight, student_bias, <loss tensors>, labels, scale, row_weights,
<config fields>) and returns (loss, grad_hidden, grad_weight, grad_bias). Reductions "batchmean"/"sum":
the loss is a scalar and every requested gradient is computed in the forward pass; backward scales them.
Reduction "none": the op returns the row losses only, and backward runs the chunk loop again with the
upstream row gradients as row weights (the weight gradient mixes rows, so it cannot be scaled after).
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Callable

import torch

from fastdistill.ops.common import check_number

BACKENDS = ("cpu", "cuda", "triton")
# The config fields every FusedLossOps config ends with, in this order.
COMMON_FIELDS = ("chunk_size", "reduce", "need_grad_hidden", "need_grad_weight", "need_grad_bias")
_SCHEMA_TYPES = {"int": "int", "float": "float", "bool": "bool"}

# forward_rows(backend, tensors, cfg) -> (rows [N] (times the scale), grad_hidden, grad_weight, grad_bias),
# the gradients of sum(rows · row_weights) that cfg asks for (only when cfg.reduce), else None.
ForwardRows = Callable[[str, tuple, object], tuple]


class FusedLossOps:
    """fastdistill::<stem>_<backend> for each kernel backend, from one schema of leading tensors and a frozen
    dataclass `config` (whose fields give the rest of the schema; it must end with COMMON_FIELDS)."""

    def __init__(self, stem: str, tensors: str, config: type, forward_rows: ForwardRows):
        fields = dataclasses.fields(config)
        assert tuple(f.name for f in fields[-len(COMMON_FIELDS):]) == COMMON_FIELDS, config
        self.config, self.forward_rows = config, forward_rows
        self.n_tensors = len(tensors.split(","))  # the last one is row_weights
        args = ", ".join(f"{_SCHEMA_TYPES[str(f.type)]} {f.name}" for f in fields)
        self.schema = f"({tensors}, {args}) -> (Tensor, Tensor, Tensor, Tensor)"
        self.ops = {backend: self._define(f"fastdistill::{stem}_{backend}", backend) for backend in BACKENDS}

    def call(self, backend: str, tensors: tuple, cfg):
        return self.ops[backend](*tensors, *cfg.__dict__.values())

    def _forward(self, backend: str, tensors: tuple, cfg):
        """(loss: scalar if cfg.reduce else [N] rows, grad_hidden, grad_weight, grad_bias); unrequested grads
        (and all of them when not reducing) are empty tensors."""
        rows, *grads = self.forward_rows(backend, tensors, cfg)
        sh = tensors[0]
        grads = (g if g is not None else sh.new_empty(0) for g in grads)  # distinct: outputs must not alias
        return (rows.sum() if cfg.reduce else rows, *grads)

    def _backward(self, ctx, grad_loss, backend: str):
        """Gradients of (student_hidden, student_weight, student_bias)."""
        cfg = ctx.cfg
        if grad_loss is None:
            return None, None, None
        if cfg.reduce:
            grads = list(ctx.saved_tensors)
            for i, g in enumerate(grads):
                if g.numel() == 0:
                    continue
                if type(g) is torch.Tensor and not torch.compiler.is_compiling():
                    g.mul_(grad_loss)  # private buffers of this call: scaled in place, no second copy
                else:
                    grads[i] = (g * grad_loss).to(g.dtype)
        else:
            recompute = dataclasses.replace(cfg, reduce=True)
            row_weights = grad_loss.to(torch.float32).contiguous()
            grads = list(self.call(backend, (*ctx.saved_tensors, row_weights), recompute)[1:])
        flags = (cfg.need_grad_hidden, cfg.need_grad_weight, cfg.need_grad_bias)
        return tuple(g if flag else None for g, flag in zip(grads, flags))

    def _define(self, qualname: str, backend: str):
        n, config = self.n_tensors, self.config

        def impl(*args):
            return self._forward(backend, args[:n], config(*args[n:]))

        op = torch.library.custom_op(qualname, impl, mutates_args=(), schema=self.schema)

        @op.register_fake
        def _(student_hidden, student_weight, student_bias, *args):
            cfg = config(*args[n - 3:])
            reduce, flags = cfg.reduce, (cfg.need_grad_hidden, cfg.need_grad_weight, cfg.need_grad_bias)
            loss = student_hidden.new_empty(() if reduce else student_hidden.shape[:1], dtype=torch.float32)
            shapes = (student_hidden.shape, student_weight.shape, student_weight.shape[:1])
            like = (student_hidden, student_weight, student_bias if student_bias is not None else student_weight)
            return (loss, *(t.new_empty(shape if (reduce and flag) else (0,))
                            for t, shape, flag in zip(like, shapes, flags)))

        def setup_context(ctx, inputs, output):
            cfg = config(*inputs[n:])
            ctx.cfg = cfg
            ctx.set_materialize_grads(False)
            if cfg.reduce:
                ctx.mark_non_differentiable(*output[1:])
                ctx.save_for_backward(*output[1:])
            else:  # backward recomputes from the inputs (references, not copies)
                ctx.save_for_backward(*inputs[:n - 1])

        def backward(ctx, grad_loss, *_grads_of_grads):
            return (*self._backward(ctx, grad_loss, backend), *(None,) * (n - 3 + len(dataclasses.fields(config))))

        op.register_autograd(backward, setup_context=setup_context)
        return op


def _device_type(hidden) -> str:
    return hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"


def autocast_dtype(hidden) -> torch.dtype | None:
    """The autocast dtype when autocast is on for hidden's device, else None. Under autocast the fused losses
    cast their floating inputs to it first (as the model's own lm_head, F.linear, would be) and run under
    no_autocast(hidden): their GEMMs choose float32 outputs themselves."""
    device_type = _device_type(hidden)
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def no_autocast(hidden):
    return torch.autocast(_device_type(hidden), enabled=False)


def cast_floats(dtype: torch.dtype, *tensors):
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def check_head(prefix: str, hidden, weight, bias):
    """Shapes, dtypes and devices of one model's hidden states, output weight and bias."""
    for name, t in ((f"{prefix}_hidden", hidden), (f"{prefix}_weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{prefix}_hidden: expected shape (..., H) with H >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"{prefix}_weight: expected shape (V, H) with V >= 1, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}_weight: shape {tuple(weight.shape)} does not match {prefix}_hidden's H = "
                         f"{hidden.shape[-1]} (expected ({weight.shape[0]}, {hidden.shape[-1]}))")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}_weight: dtype {weight.dtype} differs from {prefix}_hidden's {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{prefix}_weight: on {weight.device}, {prefix}_hidden on {hidden.device}")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{prefix}_bias: expected a torch.Tensor or None, got {type(bias).__name__}")
    if bias.shape != weight.shape[:1]:
        raise ValueError(f"{prefix}_bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype or bias.device != weight.device:
        raise TypeError(f"{prefix}_bias: expected {weight.dtype} on {weight.device} like {prefix}_weight, "
                        f"got {bias.dtype} on {bias.device}")


def check_fused_options(chunk_size, logit_scale, softcap, teacher_logit_scale=None, teacher_softcap=None):
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected None or an integer >= 1, got {chunk_size!r}")
    check_number("logit_scale", logit_scale, low=0.0, low_open=True)
    if softcap is not None:
        check_number("softcap", softcap, low=0.0, low_open=True)
    if teacher_logit_scale is not None:
        check_number("teacher_logit_scale", teacher_logit_scale, low=0.0, low_open=True)
    if teacher_softcap is not None:
        check_number("teacher_softcap", teacher_softcap, low=0.0)  # 0: no cap on the teacher
