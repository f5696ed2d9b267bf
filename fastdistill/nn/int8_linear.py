"""Int8Linear: an nn.Linear with int8 weights (W8A8 or W8A16) that can still be trained.

trainable=False stores only int8 weights + float32 scales (+ bias): 4x smaller than fp32.
trainable=True also keeps an fp32 master weight; the forward runs the real int8 kernels and the backward
is straight-through: dx = dy @ dequantized weight, d(master) = dy^T x, d(bias) = sum dy. The int8 copy is
re-quantized lazily when the master weight's version counter changed (every optimizer step and
load_state_dict bump it; reading it is a Python int, no host sync). Under torch.compile the counter is
not traced, so compiled forwards re-quantize every call (one pass over the weight).

SmoothQuant: with per-input-channel factors s (fastdistill.quant.calibrate), the layer stores W * s and
multiplies activations by 1 / s (buffer smooth_inv) before quantizing them.
"""
from __future__ import annotations

import torch
from torch import nn

from fastdistill.ops.int8_linear import int8_linear
from fastdistill.ops.int8_weight_only_linear import int8_weight_only_linear
from fastdistill.ops.quantize_per_token import quantize_per_token
from fastdistill.reference.int8_linear import dequantize_weight_ref

MODES = ("w8a8", "w8a16")


def quantize_weight(w: torch.Tensor, group_size: int = 0, backend: str = "auto"):
    """Symmetric per-channel (group_size 0) or per-group int8 weight: the per-token kernel on rows / groups
    (same formula as quantize_weight_ref, same bits)."""
    N, K = w.shape
    q, s = quantize_per_token(w.detach().float().reshape(-1, group_size or K), backend=backend)
    return q.reshape(N, K), (s if not group_size else s.reshape(N, K // group_size))


class _StraightThrough(torch.autograd.Function):
    """Forward: the int8 kernels. Backward: as if the weight were its dequantized value (and, in W8A8,
    as if activation quantization were the identity)."""

    @staticmethod
    def forward(x, master, bias, w_int8, w_scale, mode, group_size, backend):
        return _int8_forward(x, w_int8, w_scale, bias, mode, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, master, bias, w_int8, w_scale, mode, group_size, backend = inputs
        ctx.save_for_backward(x, w_int8, w_scale)
        ctx.group_size = group_size
        ctx.master_dtype = master.dtype
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, dy):
        x, w_int8, w_scale = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).float()
        dx = dmaster = dbias = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ dequantize_weight_ref(w_int8, w_scale, ctx.group_size)).to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[1]:
            dmaster = (dy2.t() @ x.reshape(-1, x.shape[-1]).float()).to(ctx.master_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy2.sum(0)
        return dx, dmaster, dbias, None, None, None, None, None


def _int8_forward(x, w_int8, w_scale, bias, mode, backend):
    if mode == "w8a16":
        return int8_weight_only_linear(x, w_int8, w_scale, bias, backend=backend)
    xq, xs = quantize_per_token(x, backend=backend)
    return int8_linear(xq, xs, w_int8, w_scale, bias, out_dtype=x.dtype, backend=backend)


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8: mode "w8a8" (per-token dynamic int8 activations, per-channel weights,
    int32 accumulation) or "w8a16" (per-channel or per-group weights, float activations)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "w8a8",
                 group_size: int | None = None, trainable: bool = False, smooth: bool = False,
                 backend: str = "auto", device=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if group_size is not None:
            if mode != "w8a16":
                raise ValueError("group_size: only mode='w8a16' has per-group scales (w8a8 is per channel)")
            if not isinstance(group_size, int) or group_size < 1 or in_features % group_size != 0:
                raise ValueError(f"group_size: must be a positive divisor of in_features={in_features}, "
                                 f"got {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.group_size, self.trainable, self.backend = mode, group_size or 0, trainable, backend
        scale_shape = (out_features,) if not group_size else (out_features, in_features // group_size)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("smooth_inv", torch.ones(in_features, device=device) if smooth else None)
        b = torch.zeros(out_features, device=device) if bias else None
        if trainable:
            self.weight = nn.Parameter(torch.zeros(out_features, in_features, device=device))
            self.bias = nn.Parameter(b) if bias else None
        else:
            self.register_buffer("bias", b)
        self._qversion = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "w8a8", *, group_size: int | None = None,
                    trainable: bool = False, smooth: torch.Tensor | None = None, backend: str = "auto"):
        """Quantizes `linear` (its weights are read, not modified). smooth: per-input-channel factors s
        (W is stored as W * s, activations are multiplied by 1 / s)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected nn.Linear, got {type(linear).__name__}")
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, group_size, trainable,
                  smooth is not None, backend, device=linear.weight.device)
        w = linear.weight.detach().float()
        if smooth is not None:
            if tuple(smooth.shape) != (linear.in_features,):
                raise ValueError(f"smooth: expected shape ({linear.in_features},), got {tuple(smooth.shape)}")
            smooth = smooth.to(w.device, torch.float32)
            w = w * smooth
            out.smooth_inv.copy_(torch.where(smooth > 0, 1.0 / smooth, torch.ones_like(smooth)))
        with torch.no_grad():
            if trainable:
                out.weight.copy_(w)
            out._set_int8(w)
            if linear.bias is not None:
                out.bias.copy_(linear.bias.detach().float())
        return out

    def _set_int8(self, w: torch.Tensor) -> None:
        q, s = quantize_weight(w, self.group_size, self.backend)
        self.weight_int8.copy_(q)
        self.weight_scale.copy_(s)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the int8 layer multiplies by (smoothing undone)."""
        w = dequantize_weight_ref(self.weight_int8, self.weight_scale, self.group_size)
        return w if self.smooth_inv is None else w * self.smooth_inv

    def to_linear(self) -> nn.Linear:
        """An nn.Linear with the dequantized weight (what this layer computes, without activation rounding)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight_int8.device)
        with torch.no_grad():
            lin.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias.detach())
        return lin

    @torch.no_grad()
    def frozen(self) -> "Int8Linear":
        """A non-trainable Int8Linear holding exactly the int8 weights and scales this layer computes with
        (a trainable layer is re-quantized from its master weight first): the same outputs, bit for bit."""
        if self.trainable:
            self._refresh()
        out = Int8Linear(self.in_features, self.out_features, self.bias is not None, self.mode, self.group_size or None,
                         False, self.smooth_inv is not None, self.backend, device=self.weight_int8.device)
        for name in ("weight_int8", "weight_scale", "smooth_inv", "bias"):
            if getattr(out, name) is not None:
                getattr(out, name).copy_(getattr(self, name))
        return out

    def _refresh(self) -> None:
        compiling = torch.compiler.is_compiling()
        if compiling or self.weight._version != self._qversion:
            with torch.no_grad():
                self._set_int8(self.weight)
            if not compiling:
                self._qversion = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth_inv is not None:
            x = x * self.smooth_inv.to(x.dtype)
        if not self.trainable:  # .float(): a no-op unless model.to(bf16/fp16) converted the scale buffer
            return _int8_forward(x, self.weight_int8, self.weight_scale.float(), self.bias, self.mode, self.backend)
        self._refresh()
        return _StraightThrough.apply(x, self.weight, self.bias, self.weight_int8, self.weight_scale, self.mode,
                                      self.group_size, self.backend)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Shape mismatches are reported by nn.Module; a dtype mismatch would be silently cast by copy_.
        for name, dtype in (("weight_int8", torch.int8), ("weight_scale", torch.float32)):
            t = state_dict.get(prefix + name)
            if t is not None and t.dtype != dtype:
                error_msgs.append(f"{prefix}{name}: expected {dtype}, got {t.dtype} (shape {tuple(t.shape)})")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._qversion = None

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode}{g}, trainable={self.trainable}, smooth={self.smooth_inv is not None}")
