"""final_hidden_states: an HF causal LM's final hidden states and output head, without [B, T, V] logits.

The model runs its own forward; a pre-hook on its output head (`model.get_output_embeddings()`)
captures the hidden states the head receives (after the final norm and anything the model does to
them before its head) and lets one position per sequence through, so the model's logits are [B, 1, V].
What a model does to its logits after the head is read from its config (HANDLED below: scales and
softcaps) and, the first time a model is seen, checked against those [B, 1, V] logits: a model that
post-processes its logits in any other visible way raises instead of giving a wrong loss.
"""
from __future__ import annotations

import dataclasses
import math
import re
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastdistill.distributed.forward import in_forward, is_fsdp, unwrap


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """What a model applies to its final hidden states to get its logits:
    logits = softcap · tanh((hidden @ weightᵀ + bias) · logit_scale / softcap) (no tanh when softcap is None).
    `module` is the head itself (nn.Linear); under FSDP2 its weight is only unsharded inside its forward."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    logit_scale: float = 1.0
    softcap: Optional[float] = None
    module: Optional[nn.Module] = dataclasses.field(default=None, repr=False, compare=False)


# Config attributes that the models' forwards apply to the logits after the head, and how.
HANDLED = {
    "final_logit_softcapping": "softcap",  # Gemma 2/3/4, Mistral Large 4, NanoChat, T5Gemma, ...
    "logits_soft_cap": "softcap",  # RecurrentGemma
    "output_logit_soft_cap": "softcap",  # xLSTM
    "logit_scale": "multiply",  # Cohere, Cohere2
    "logits_scaling": "divide",  # Granite family (HyperCLOVA X multiplies: MODEL_TYPE_RULES)
    "lm_head_multiplier": "multiply",  # Falcon-H1
    "output_multiplier": "multiply",  # MuseSpark/MuseGlimmer (before the softcap)
}
MODEL_TYPE_RULES = {
    "hyperclovax": {"logits_scaling": "multiply"},
    "hyperclovax_vision_v2": {"logits_scaling": "multiply"},
    "mpt": {"logit_scale": "ignored"},  # in the config, not applied by transformers' MPT
}
# Attributes that look like logit options but act inside the model (attention, routers, the hidden
# states before the head, which the hook sees) or not in training; all others matching SUSPECT raise.
IGNORED = {
    "output_router_logits", "attn_logit_softcapping", "num_logits_to_keep", "logit_scale_init_value",
    "max_logit_scale", "contrastive_logits_temperature", "output_auxiliary_logits", "mlp_up_softcap",
    "mlp_gate_softcap", "lsd_time_logit_std", "lsd_time_logit_mean", "moe_router_logit_softcapping",
    "conf_attention_logit_cap", "attention_logit_cap", "attention_invalid_logits_value",
    "average_logits_per_cell", "mup_enabled", "logits_mup_width_multiplier", "router_logit_softcapping",
    "gate_soft_cap",
}
SUSPECT = re.compile(r"logit|soft_?cap|output_mult|lm_head_mult|mup")

_OPTIONS: "weakref.WeakKeyDictionary[nn.Module, tuple[float, Optional[float]]]" = weakref.WeakKeyDictionary()
_VERIFIED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def output_head(model: nn.Module, who: str = "model") -> nn.Linear:
    """model.get_output_embeddings(), which must be an nn.Linear (errors name the argument `who`)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    name = type(model).__name__
    if head is None:
        raise ValueError(f"{who}: {name} has no output head (get_output_embeddings() gives None); pass a "
                         f"*ForCausalLM model, not its base model")
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{who}: the output head of {name} is a {type(head).__name__}, not an nn.Linear; the fused "
                        f"loss needs a (V, H) weight and an optional bias (PEFT- or quantization-wrapped heads are "
                        f"not supported)")
    return head


def _config_items(config) -> list[tuple[str, object]]:
    """(name, value) of the config and its text sub-config (composite models keep options there)."""
    items = dict(config.to_dict())
    try:
        sub = config.get_text_config(decoder=True)
    except (AttributeError, TypeError, ValueError):  # no such method, or several text configs
        sub = config
    if sub is not config:
        items.update(sub.to_dict())
    return [(k, v) for k, v in items.items() if not isinstance(v, dict)]


def config_logit_options(config, name: str = "model") -> tuple[float, Optional[float]]:
    """(logit_scale, softcap) that a model with this config applies after its head; raises on config
    attributes that may change the logits and are not in HANDLED (`name` names the model in errors)."""
    rules = {**HANDLED, **MODEL_TYPE_RULES.get(getattr(config, "model_type", None), {})}
    scale, softcap, unknown = 1.0, None, []
    for key, value in _config_items(config):
        if value is None or value is False or key in IGNORED or not SUSPECT.search(key):
            continue
        kind = rules.get(key)
        if kind is None:
            unknown.append(f"{key}={value!r}")
        elif kind == "softcap":
            softcap = float(value)
        elif kind == "multiply":
            scale *= float(value)
        elif kind == "divide":
            scale /= float(value)
    if unknown:
        raise ValueError(f"model: {name}'s config has {', '.join(unknown)}, which may change its logits in a way "
                         f"fastdistill does not know (it handles {', '.join(sorted(HANDLED))}); refusing rather "
                         f"than computing a wrong loss")
    if not (math.isfinite(scale) and scale > 0) or (softcap is not None and not softcap > 0):
        raise ValueError(f"model: logit scale {scale} and softcap {softcap} from {name}'s config must be positive")
    return scale, softcap


def logit_options(model: nn.Module) -> tuple[float, Optional[float]]:
    """config_logit_options of the model's config (1.0, None without one), cached per model."""
    model = unwrap(model)
    if model not in _OPTIONS:
        config = getattr(model, "config", None)
        _OPTIONS[model] = (1.0, None) if config is None else config_logit_options(config, type(model).__name__)
    return _OPTIONS[model]


def apply_logit_options(logits: torch.Tensor, logit_scale: float, softcap: Optional[float]) -> torch.Tensor:
    logits = logits * logit_scale
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


class _Capture:
    """Forward pre-hook on the head: keeps its input, passes on one position per sequence, and (when
    asked) the head's plain output for that position, computed while the weight is unsharded."""

    def __init__(self, reference: bool):
        self.hidden, self.reference, self.calls, self.want_reference = None, None, 0, reference

    def __call__(self, module, args, kwargs):
        self.calls += 1
        if self.calls > 1:
            return None  # a second call is refused after the forward
        hidden = args[0] if args else kwargs.pop("input")
        self.hidden = hidden
        row = hidden[..., -1:, :] if hidden.dim() >= 2 else hidden
        mixed = row.dtype != module.weight.dtype and not torch.is_autocast_enabled(row.device.type)
        if self.want_reference and not mixed:  # mixed: the caller's dtype check names the model
            with torch.no_grad():
                self.reference = F.linear(row, module.weight, module.bias).float()
        return (row, *args[1:]), kwargs


def _check_logits(model: nn.Module, logits, capture: _Capture, scale: float, softcap) -> None:
    name = type(model).__name__
    want = apply_logit_options(capture.reference, scale, softcap)
    if not isinstance(logits, torch.Tensor) or logits.shape != want.shape:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model: {name} returned logits of shape {shape} where its head gives "
                         f"{tuple(want.shape)}; it slices or reshapes its logits (unsupported)")
    got = logits.detach().float()
    eps = torch.finfo(logits.dtype if logits.is_floating_point() else torch.float32).eps
    tol = 16 * eps * (1.0 + want.abs().max().item())
    err = (got - want).abs().max().item()
    if not err <= tol:
        raise ValueError(f"model: {name}'s logits differ from its head's output × logit_scale {scale} capped by "
                         f"softcap {softcap} (from its config) by {err:.3g}: it changes its logits in a way "
                         f"fastdistill does not know; refusing rather than computing a wrong loss")


def final_hidden_states(model: nn.Module, **model_inputs) -> tuple[torch.Tensor, HeadSpec]:
    """(hidden, head): the final hidden states (B, T, H) that `model`'s output head receives, and the head.

    `model` is a transformers *ForCausalLM (or anything whose get_output_embeddings() is the nn.Linear
    it calls once per forward), plain or wrapped by DistributedDataParallel; model_inputs are its forward
    arguments (input_ids, attention_mask, ...; use_cache defaults to False). The [B, T, V] logits are
    never computed. The logits are apply_logit_options(hidden @ head.weightᵀ + head.bias,
    head.logit_scale, head.softcap). An FSDP2 (fully_shard) model with gradients on must be called
    inside fastdistill.distributed.run_in_forward(model, fn) (causal_lm_distill_loss does), where the
    head's weight is unsharded; without gradients (a teacher) a sharded head weight is gathered.
    """
    inner = unwrap(model)
    head = output_head(inner)
    scale, softcap = logit_options(inner)
    for key in ("labels", "logits_to_keep", "num_logits_to_keep"):
        if key in model_inputs:
            raise ValueError(f"model_inputs: {key} is not accepted here (the hidden states of every position are "
                             f"returned and the loss is computed by fastdistill)")
    model_inputs.setdefault("use_cache", False)
    redirected = in_forward(model)
    if is_fsdp(inner) and not redirected and torch.is_grad_enabled():
        raise ValueError(f"model: {type(inner).__name__} is sharded with fully_shard and its head weight is only "
                         f"unsharded inside its forward; use causal_lm_distill_loss, or call final_hidden_states "
                         f"inside fastdistill.distributed.run_in_forward(model, fn)")
    capture = _Capture(reference=inner not in _VERIFIED)
    handle = head.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        out = inner.forward(**model_inputs) if redirected else model(**model_inputs)
    finally:
        handle.remove()
    if capture.calls != 1:
        raise ValueError(f"model: {type(inner).__name__}'s forward called its output head {capture.calls} times "
                         f"(expected once, with the final hidden states); unsupported")
    hidden = capture.hidden
    ids = model_inputs.get("input_ids")
    lead = tuple(ids.shape) if isinstance(ids, torch.Tensor) else None
    if lead is not None and tuple(hidden.shape[:-1]) != lead:
        raise ValueError(f"model: its output head received hidden states of shape {tuple(hidden.shape)} for "
                         f"input_ids of shape {lead}; expected one row per token")
    if capture.reference is not None and capture.reference.numel():  # checked on the first non-empty batch
        logits = out.logits if hasattr(out, "logits") else out[0]
        _check_logits(inner, logits, capture, scale, softcap)
        _VERIFIED.add(inner)
    weight, bias = head.weight, head.bias
    if not torch.is_grad_enabled():
        weight, bias = (_full(t) for t in (weight, bias))
    return hidden, HeadSpec(weight, bias, scale, softcap, head)


def _full(t):
    """A DTensor gathered to a plain tensor (a sharded frozen teacher head); anything else as is."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t
