"""causal_lm_distill_loss: the fused distillation loss of two HF causal LMs on one batch."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastdistill.distributed.forward import is_fsdp, run_in_forward, unwrap
from fastdistill.hf.heads import HeadSpec, final_hidden_states, output_head
from fastdistill.nn.fused_linear_distill_loss import FusedLinearDistillLoss
from fastdistill.ops.fused_linear_distill_loss import fused_linear_distill_loss

# Options that come from the models' heads here, not from the loss module.
_HEAD_OPTIONS = ("logit_scale", "softcap", "teacher_logit_scale", "teacher_softcap")
_DEFAULT = FusedLinearDistillLoss()


def shift_labels(labels: torch.Tensor, attention_mask: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    """targets[..., t] = labels[..., t + 1] (position t predicts token t + 1); ignore_index where either
    position is padding (attention_mask == 0) and at the last position."""
    if attention_mask is not None:
        pad = attention_mask == 0
        labels = labels.masked_fill(pad, ignore_index)
        targets = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
        return targets.masked_fill(pad, ignore_index)
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _check_batch(input_ids, attention_mask, labels) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dim() != 2:
        what = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected an integer tensor of shape (batch, sequence), got {what}")
    for name, t in (("attention_mask", attention_mask), ("labels", labels)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
        if t.shape != input_ids.shape:
            raise ValueError(f"{name}: expected shape {tuple(input_ids.shape)} like input_ids (one entry per token; "
                             f"labels are not shifted: the loss shifts them), got {tuple(t.shape)}")
        if t.device != input_ids.device:
            raise ValueError(f"{name}: on {t.device}, input_ids on {input_ids.device}")
    if labels is not None and labels.is_floating_point():
        raise TypeError(f"labels: expected an integer tensor, got {labels.dtype}")


def _loss_options(loss) -> dict:
    if loss is None:
        loss = _DEFAULT
    if not isinstance(loss, FusedLinearDistillLoss):
        raise TypeError(f"loss: expected a fastdistill.FusedLinearDistillLoss or None, got {type(loss).__name__}")
    options = dict(loss.options)
    set_here = [k for k in _HEAD_OPTIONS if options[k] != _DEFAULT.options[k]]
    if set_here:
        raise ValueError(f"loss: {', '.join(set_here)} come from the models' configs here (each model's head); "
                         f"build the loss without them")
    for k in _HEAD_OPTIONS:
        del options[k]
    return options


def _matched(who: str, hidden: torch.Tensor, weight: torch.Tensor, bias):
    """hidden, weight, bias in one dtype: under torch.autocast, its dtype (as the model's own lm_head call
    would compute); otherwise they must already agree."""
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{who}: its final hidden states are {hidden.dtype} and its output head {weight.dtype}; cast "
                        f"the whole model with {who}.to(dtype), or run under torch.autocast")
    return hidden, weight, bias


def _teacher_states(teacher: nn.Module, model_inputs: dict) -> tuple[torch.Tensor, HeadSpec]:
    """The teacher's hidden states and head, in eval mode under no_grad; its modes are restored after."""
    modules = list(unwrap(teacher).modules())
    modes = [m.training for m in modules]
    teacher.eval()
    try:
        with torch.no_grad():
            hidden, head = final_hidden_states(unwrap(teacher), **model_inputs)
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode
    hidden, weight, bias = _matched("teacher", hidden, head.weight, head.bias)
    return hidden, HeadSpec(weight, bias, head.logit_scale, head.softcap, head.module)


def _check_devices(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor) -> None:
    sw, tw = output_head(unwrap(student), "student").weight, output_head(unwrap(teacher), "teacher").weight
    if tw.device != sw.device:
        raise ValueError(f"teacher: its output head is on {tw.device} and the student's on {sw.device}; move it "
                         f"with teacher.to({str(sw.device)!r})")
    if not is_fsdp(unwrap(student)) and input_ids.device != sw.device:
        raise ValueError(f"input_ids: on {input_ids.device}, the models on {sw.device}")


def causal_lm_distill_loss(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor,
                           attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, *,
                           loss: Optional[FusedLinearDistillLoss] = None, num_items=None,
                           **forward_kwargs) -> torch.Tensor:
    """Distillation loss of `student` towards `teacher` (transformers *ForCausalLM models) on one batch,
    with fastdistill.fused_linear_distill_loss: the [tokens, V] logits of neither model are materialized.

    Position t predicts token t + 1 of `labels` (default: input_ids; unshifted, like HF's labels); a
    position is ignored where labels is the loss's ignore_index (-100), where attention_mask is 0 at
    either position, and at the end of each sequence. The teacher runs in eval mode under no_grad (its
    modes are restored). `loss` is a fastdistill.FusedLinearDistillLoss holding any divergence and
    option (None: forward KL); logit_scale and softcap come from each model's config (Gemma-2
    softcapping, Cohere's logit_scale, Granite's logits_scaling, ...), not from `loss`. `num_items`
    (int or one-element tensor, like Trainer's num_items_in_batch) replaces the number of non-ignored
    positions as the batchmean divisor: pass the count of the whole accumulated (or global) batch.
    forward_kwargs go to both models' forwards (position_ids, ...).

    The student may be wrapped by DistributedDataParallel or sharded with FSDP2 (fully_shard): the loss
    runs inside its forward, and inside its head's forward when the head is its own fully_shard unit, so
    the head weight is unsharded there and its gradient is reduce-scattered. Teacher and student may
    differ in dtype (a bf16 teacher for an fp32 student); each model's head must match its own hidden
    states (under torch.autocast both are cast to the autocast dtype, as the model's lm_head would be).
    Different vocabularies are allowed: the smaller one is padded with -inf logits (probability 0).
    """
    options = _loss_options(loss)
    _check_batch(input_ids, attention_mask, labels)
    if num_items is not None:
        options["num_items"] = num_items
    _check_devices(student, teacher, input_ids)
    targets = shift_labels(input_ids if labels is None else labels, attention_mask, int(options["ignore_index"]))
    model_inputs = dict(forward_kwargs, input_ids=input_ids)
    if attention_mask is not None:
        model_inputs["attention_mask"] = attention_mask
    teacher_hidden, teacher_head = _teacher_states(teacher, dict(model_inputs))

    def student_loss(**inputs):
        hidden, head = final_hidden_states(student, **inputs)

        def fused(h):
            m = head.module
            h, w, b = _matched("student", h, m.weight, m.bias)
            with torch.autocast(h.device.type, enabled=False):  # the op's own GEMMs must keep its dtypes
                return fused_linear_distill_loss(
                    h, w, teacher_hidden, teacher_head.weight, student_bias=b, teacher_bias=teacher_head.bias,
                    labels=targets, logit_scale=head.logit_scale, softcap=head.softcap,
                    teacher_logit_scale=teacher_head.logit_scale, teacher_softcap=teacher_head.softcap or 0.0,
                    **options)

        if is_fsdp(head.module) and head.module is not unwrap(student):
            return run_in_forward(head.module, fused, hidden)  # its own unit: unsharded in its forward only
        return fused(hidden)

    return run_in_forward(student, student_loss, **model_inputs)
