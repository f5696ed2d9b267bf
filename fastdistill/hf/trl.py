"""TRL's distillation trainers on fastdistill's fused linear loss (TRL 1.16).

    from fastdistill.hf.trl import FastDistillDistillationTrainer   # for trl.DistillationTrainer
    from fastdistill.hf.trl import FastDistillGKDTrainer            # for trl.experimental.gkd.GKDTrainer

Each is its TRL trainer with only the loss replaced: same constructor and config (`beta`, `temperature`),
same generation, masking, `num_items_in_batch` normalisation and logged metrics, but the divergence comes
from `fastdistill.fused_linear_distill_loss` on the final hidden states and output heads, so neither model's
[tokens, V] logits exist (GKDTrainer's own loss builds several of them; DistillationTrainer's chunked
loss is already fused on Triton GPUs but falls back to [4096, 32768] torch tiles elsewhere).
Extra keyword arguments: `backend=` and `chunk_size=` (fastdistill's), and for DistillationTrainer
`log_entropy=True` (its "entropy" metric costs one extra no-grad pass over the student's head; False
skips it and the metric is logged as None).

TRL's `beta` (both trainers; `0 <= beta <= 1`) maps onto fastdistill's options exactly (`trl_loss_options`):

    TRL beta       TRL's loss (p_t teacher, p_s student)      fastdistill options
    0              KL(p_t || p_s)          forward KL         divergence="kl"
    1              KL(p_s || p_t)          reverse KL         divergence="reverse_kl"
    0 < beta < 1   beta KL(p_t || m) + (1 - beta) KL(p_s || m),  divergence="jsd", beta=beta
                   m = beta p_t + (1 - beta) p_s               (fastdistill's jsd is this same formula)
    always         logits / temperature, no T² factor        temperature=T, scale_t2=False

TRL's own conventions that these trainers keep: DistillationTrainer applies its `temperature` to the loss
(and to sampling); GKDTrainer (TRL 1.16) samples with `temperature` but computes its loss at temperature 1.
Per-model logit options become fastdistill's logit_scale / softcap / teacher_logit_scale / teacher_softcap:
for DistillationTrainer as TRL reads them from each config (`trl_head_options`: `logit_scale`,
`output_multiplier`, `lm_head_multiplier`, `logits_scaling`, `final_logit_softcapping`); for GKDTrainer,
whose loss takes each model's own logits, from `fastdistill.hf.final_hidden_states` (the model's own
post-processing, verified against its logits).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
try:
    from trl import DistillationTrainer
    from trl.experimental.gkd import GKDTrainer
except ImportError as error:  # an optional dependency, not in the hf extra
    raise ImportError(f"fastdistill.hf.trl needs TRL 1.16 (pip install trl==1.16.0): {error}") from error

from fastdistill import fused_linear_distill_loss
from fastdistill.hf.heads import final_hidden_states
from fastdistill.ops.fused_linear_chunks import auto_chunk_size
from fastdistill.ops.fused_linear_distill_loss import check_fused_options

__all__ = ["trl_loss_options", "trl_head_options", "fused_chunked_divergence_loss", "fused_generalized_jsd_loss",
           "FastDistillDistillationTrainer", "FastDistillGKDTrainer"]


def trl_loss_options(beta: float, temperature: float = 1.0) -> dict:
    """fastdistill loss options equal to TRL's generalized JSD with `beta` and `temperature` (table above)."""
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: expected a number in [0, 1] (TRL's convention), got {beta!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
    divergence = "kl" if beta == 0 else "reverse_kl" if beta == 1 else "jsd"
    return {"divergence": divergence, "beta": float(beta), "temperature": float(temperature), "scale_t2": False}


def trl_head_options(config) -> tuple[float, Optional[float]]:
    """(logit_scale, final_logit_softcapping or None) of one model, read from its text config as TRL 1.16's
    DistillationTrainer reads them (Cohere's logit_scale, output_multiplier, Falcon-H1's lm_head_multiplier,
    Granite/MiniCPM3's 1/logits_scaling, HyperCLOVA X's logits_scaling; Gemma's final_logit_softcapping)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(config, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        scale = getattr(config, name, None) if scale is None else scale
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(config, "final_logit_softcapping", None)


def _full(weight, bias):
    """A DTensor head (FSDP2) as plain tensors, gathered once per call (as TRL does); others as they are."""
    gather = (lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t)
    return gather(weight), (None if bias is None else gather(bias))


def _cast(weight, bias, dtype):
    return weight.to(dtype), (None if bias is None else bias.to(dtype))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """TRL's rule for one model's head: the autocast dtype when autocast is on, else the hidden states' dtype
    (an FSDP2 teacher's gathered fp32 master weight meets bf16 hidden states: the weight is cast)."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


def _loss_sum(h_s, w_s, b_s, h_t, w_t, b_t, *, beta, temperature, student_scale, student_softcap, teacher_scale,
              teacher_softcap, chunk_size, backend):
    """Sum over the rows of TRL's per-token divergence, from [N, H] hidden states (every row counts)."""
    ws, bs = _cast(w_s, b_s, _compute_dtype(h_s))
    wt, bt = _cast(w_t, b_t, _compute_dtype(h_t))
    with torch.autocast(h_s.device.type, enabled=False):  # dtypes are settled above; the op runs as given
        return fused_linear_distill_loss(
            h_s.to(ws.dtype), ws, h_t.detach().to(wt.dtype), wt.detach(), student_bias=bs,
            teacher_bias=None if bt is None else bt.detach(), chunk_size=chunk_size, logit_scale=student_scale,
            softcap=student_softcap, teacher_logit_scale=teacher_scale,
            teacher_softcap=0.0 if teacher_softcap is None else teacher_softcap, reduction="sum", backend=backend,
            **trl_loss_options(beta, temperature))


@torch.no_grad()
def _entropy_sum(hidden, weight, bias, scale, softcap, temperature, chunk_size=None) -> torch.Tensor:
    """Sum over rows of the student's entropy (nats) after scale, softcap and temperature: TRL's metric."""
    hidden = hidden.to(weight.dtype)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    step = chunk_size or auto_chunk_size(hidden.shape[0], weight.shape[0], hidden.device)
    for start in range(0, hidden.shape[0], step):
        z = F.linear(hidden[start:start + step], weight, bias).float() * scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        log_p = F.log_softmax(z / temperature, dim=-1)
        total -= (log_p.exp() * log_p).sum()
    return total


def fused_chunked_divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                                  teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=None,
                                  student_lm_head_bias=None, teacher_lm_head_bias=None, student_logit_scale=1.0,
                                  teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                                  teacher_final_logit_softcapping=None, temperature=1.0, *,
                                  chunk_size: Optional[int] = None, backend: str = "auto", log_entropy: bool = True):
    """Drop-in for TRL's `trl.trainer.distillation_trainer._chunked_divergence_loss`, same arguments and
    returns: (loss, sum of the student's per-token entropy, number of valid positions), the loss being the
    sum of the per-token divergence over positions where completion_mask != 0, divided by
    num_items_in_batch (or by the valid count, at least 1). The entropy sum is NaN when log_entropy=False."""
    check_fused_options(chunk_size, 1.0, None)
    if tuple(completion_mask.shape) != tuple(student_hidden_states.shape[:-1]):
        raise ValueError(f"completion_mask: shape {tuple(completion_mask.shape)} does not match the hidden states' "
                         f"leading shape {tuple(student_hidden_states.shape[:-1])} (one entry per position)")
    student_lm_head_weight, student_lm_head_bias = _full(student_lm_head_weight, student_lm_head_bias)
    teacher_lm_head_weight, teacher_lm_head_bias = _full(teacher_lm_head_weight, teacher_lm_head_bias)
    valid = completion_mask.reshape(-1) != 0
    n_valid = valid.sum()
    # Only the valid rows are projected (TRL does the same on Triton devices).
    h_s = student_hidden_states.reshape(-1, student_hidden_states.shape[-1])[valid]
    h_t = teacher_hidden_states.reshape(-1, teacher_hidden_states.shape[-1])[valid]
    loss = _loss_sum(h_s, student_lm_head_weight, student_lm_head_bias, h_t, teacher_lm_head_weight,
                     teacher_lm_head_bias, beta=beta, temperature=temperature, student_scale=student_logit_scale,
                     student_softcap=student_final_logit_softcapping, teacher_scale=teacher_logit_scale,
                     teacher_softcap=teacher_final_logit_softcapping, chunk_size=chunk_size, backend=backend)
    if log_entropy:
        entropy = _entropy_sum(h_s.detach(), student_lm_head_weight.detach(),
                               None if student_lm_head_bias is None else student_lm_head_bias.detach(),
                               student_logit_scale, student_final_logit_softcapping, temperature, chunk_size)
    else:
        entropy = torch.full((), math.nan, device=loss.device)
    if num_items_in_batch is None:
        return loss / n_valid.clamp(min=1), entropy, n_valid
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch, entropy, n_valid


def fused_generalized_jsd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                               beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean",
                               num_items_in_batch=None, *, student_bias=None, teacher_bias=None,
                               logit_scale: float = 1.0, softcap: Optional[float] = None,
                               teacher_logit_scale: Optional[float] = None, teacher_softcap: Optional[float] = None,
                               chunk_size: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """GKDTrainer.generalized_jsd_loss(student_hidden @ student_weightᵀ, teacher_hidden @ teacher_weightᵀ,
    labels, beta, temperature, reduction, num_items_in_batch) without the logits. Hidden states (..., H),
    labels (...) with -100 on ignored positions (TRL's fixed ignore value). Reductions: "batchmean" (sum /
    num_items_in_batch when given, else / the unignored count, at least 1) and "sum"."""
    if reduction not in ("batchmean", "sum"):
        raise ValueError(f"reduction: expected 'batchmean' or 'sum', got {reduction!r}")
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    rows = None
    if labels is not None:
        if labels.shape != student_hidden.shape[:-1]:
            raise ValueError(f"labels: shape {tuple(labels.shape)} does not match student_hidden's leading shape "
                             f"{tuple(student_hidden.shape[:-1])}")
        rows = labels.reshape(-1) != -100
        h_s, h_t = h_s[rows], h_t[rows]
    student_weight, student_bias = _full(student_weight, student_bias)
    teacher_weight, teacher_bias = _full(teacher_weight, teacher_bias)
    t_scale = logit_scale if teacher_logit_scale is None else teacher_logit_scale
    t_cap = softcap if teacher_softcap is None else (teacher_softcap or None)
    total = _loss_sum(h_s, student_weight, student_bias, h_t, teacher_weight, teacher_bias, beta=beta,
                      temperature=temperature, student_scale=logit_scale, student_softcap=softcap,
                      teacher_scale=t_scale, teacher_softcap=t_cap, chunk_size=chunk_size, backend=backend)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    count = rows.sum().clamp(min=1) if rows is not None else max(h_s.shape[0], 1)
    return total / count


def _check_fastdistill_options(backend, chunk_size) -> None:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    check_fused_options(chunk_size, 1.0, None)


class FastDistillDistillationTrainer(DistillationTrainer):
    """trl.DistillationTrainer whose loss is fastdistill's fused linear loss (see the module docstring).
    Extra keyword arguments: backend="auto", chunk_size=None, log_entropy=True."""

    def __init__(self, *args, backend: str = "auto", chunk_size: Optional[int] = None, log_entropy: bool = True,
                 **kwargs):
        _check_fastdistill_options(backend, chunk_size)
        self.fastdistill_backend, self.fastdistill_chunk_size = backend, chunk_size
        self.log_entropy = bool(log_entropy)
        super().__init__(*args, **kwargs)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # TRL 1.16's _compute_loss with the divergence call replaced (its hidden states, masks and head options).
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        multimodal = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "pixel_attention_mask",
                                             "spatial_shapes", "image_sizes", "token_type_ids", "mm_token_type_ids",
                                             "image_position_ids") if k in inputs}
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep,
                                                     **multimodal)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                                       self._get_last_hidden_state, unwrapped_teacher, input_ids,
                                                       attention_mask, logits_to_keep, **multimodal)
        student_head = unwrapped_student.get_output_embeddings()
        teacher_head = unwrapped_teacher.get_output_embeddings()
        if student_head.weight.device != teacher_head.weight.device:
            raise ValueError(f"teacher_model: its lm_head is on {teacher_head.weight.device}, the student's on "
                             f"{student_head.weight.device}; place both heads on one device")
        device = student_head.weight.device
        s_scale, s_cap = trl_head_options(unwrapped_student.config)
        t_scale, t_cap = trl_head_options(unwrapped_teacher.config)
        return fused_chunked_divergence_loss(
            student_hidden.to(device), teacher_hidden.to(device), student_head.weight, teacher_head.weight,
            loss_mask.to(device), self.beta, num_items_in_batch=num_items_in_batch,
            student_lm_head_bias=student_head.bias, teacher_lm_head_bias=teacher_head.bias,
            student_logit_scale=s_scale, teacher_logit_scale=t_scale, student_final_logit_softcapping=s_cap,
            teacher_final_logit_softcapping=t_cap, temperature=self.temperature,
            chunk_size=self.fastdistill_chunk_size, backend=self.fastdistill_backend, log_entropy=self.log_entropy)


class FastDistillGKDTrainer(GKDTrainer):
    """trl.experimental.gkd.GKDTrainer whose loss is fastdistill's fused linear loss (see the module
    docstring): the same causal shift, -100 label mask, beta and num_items_in_batch, loss at temperature 1
    as TRL 1.16's. The hidden states and head options come from fastdistill.hf.final_hidden_states (each
    model's own forward and its own logit post-processing, as GKDTrainer's logits). Extra keyword arguments:
    backend="auto", chunk_size=None. compute_loss(..., return_outputs=True) returns {"loss": loss} as the
    outputs: there are no logits to return."""

    def __init__(self, *args, backend: str = "auto", chunk_size: Optional[int] = None, **kwargs):
        _check_fastdistill_options(backend, chunk_size)
        self.fastdistill_backend, self.fastdistill_chunk_size = backend, chunk_size
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # TRL computes the logits inside each model's forward, under the autocast that accelerate wraps around
        # it (bf16=True: bf16 autocast): the loss runs under the same autocast, so its compute dtype matches.
        with self.accelerator.autocast():
            loss = self._fused_loss(model, inputs, num_items_in_batch)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _fused_loss(self, model, inputs, num_items_in_batch):
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        student_hidden, s_head = final_hidden_states(model, **batch)
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_hidden, t_head = final_hidden_states(self.teacher_model, **batch)
        return fused_generalized_jsd_loss(
            student_hidden[:, :-1], s_head.weight, teacher_hidden[:, :-1].to(student_hidden.device), t_head.weight,
            inputs["labels"][:, 1:], beta=self.beta, num_items_in_batch=num_items_in_batch,
            student_bias=s_head.bias, teacher_bias=t_head.bias, logit_scale=s_head.logit_scale,
            softcap=s_head.softcap, teacher_logit_scale=t_head.logit_scale,
            teacher_softcap=0.0 if t_head.softcap is None else t_head.softcap,
            chunk_size=self.fastdistill_chunk_size, backend=self.fastdistill_backend)
