"""Int8Linear: an nn.Linear with int8 weights (W8A8 or W8A16) that can still be trained.

trainable=False stores only int8 weights + float32 scales (+ bias): 4x smaller than fp32.
trainable=True also keeps an fp32 master weight; the forward runs the real int8 kernels and the backward
is straight-through: dx = dy @ dequantized weight, d(master) = dy^T x, d(bias) = sum dy. The int8 copy is
re-quantized lazily when the master weight's version counter changed (every optimizer step and
load_state_dict bump it; reading it is a Python int, no host sync). Under torch.compile the counter is
not traced, so compiled forwards re-quantize every call (one pass over the weight).

trainable=False (frozen) layers are not trained but pass gradients on: W8A8 gives x the same straight-through
gradient dy @ dequantized weight (quantizing x has no derivative), W8A16 the exact one, so the layers before
a frozen int8 layer keep training.

SmoothQuant: with per-input-channel factors s (fastdistill.quant.calibrate), the layer stores W * s and
multiplies activations by 1 / s (buffer smooth_inv) before quantizing them. Factors must be finite and > 0.

The int8 kernels take float32/bf16/fp16 activations; a float64 model's layers compute in float32 (int8 is
far coarser than either) and return float64.

CPU: the layer keeps a packed copy of weight_int8 (the kernel's tile layout, fastdistill/ops/int8_*_packed.py) for
its forwards, built when the weight is quantized, frozen, loaded or re-quantized, and rebuilt whenever weight_int8
is replaced or edited in place (its version counter). The copy is a plain attribute, never in state_dict, dropped
by pickling and deepcopy (rebuilt on the next forward): checkpoints keep the portable [N, K] int8 weight.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from fastdistill import dispatch
from fastdistill.ops.int8_linear import int8_linear
from fastdistill.ops.int8_weight_only_linear import int8_weight_only_linear
from fastdistill.ops.quantize_per_token import quantize_per_token
from fastdistill.reference.int8_linear import dequantize_weight_ref

MODES = ("w8a8", "w8a16")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DICT_VERSION = 1  # the portable format: weight_int8 [N, K], weight_scale, smooth_inv, bias (+ weight)
_PACKED_OPS: dict = {}  # mode -> (pack(w_int8, group_size), raw forward op) or None (extension without them)


def _packed_ops(mode: str):
    """The packed CPU ops of `mode` when the extension has them, else None (looked up once)."""
    if mode not in _PACKED_OPS:
        ops = None
        try:
            if mode == "w8a8":
                from fastdistill.ops.int8_linear_packed import pack_w8a8
                ops = (lambda w, g: pack_w8a8(w)), torch.ops.fastdistill.int8_linear_dynamic_cpu.default
            else:
                from fastdistill.ops.int8_weight_only_packed import pack_w8a16
                ops = pack_w8a16, torch.ops.fastdistill.int8_weight_only_linear_packed_cpu.default
            if not torch._C._dispatch_has_kernel_for_dispatch_key(ops[1].name(), "CPU"):
                ops = None
        except (ImportError, AttributeError, RuntimeError):
            ops = None
        _PACKED_OPS[mode] = ops
    return _PACKED_OPS[mode]


def _cpu_backend(backend: str) -> bool:
    """The packed CPU kernels serve `backend` (auto resolves through FASTDISTILL_BACKEND like dispatch.select)."""
    if backend == "auto":
        backend = os.environ.get("FASTDISTILL_BACKEND") or "auto"
    return backend in ("auto", "cpu")


def _packed_call(op, mode, x, packed, w_scale, bias, smooth_inv):
    """The raw packed op on x [..., K] (arguments checked at pack time; float32 scale/bias/smooth_inv)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    out = op(x2, packed, w_scale, bias, smooth_inv, x.dtype) if mode == "w8a8" else \
        op(x2, packed, w_scale, bias, smooth_inv)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])


def check_features(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: must be >= 0, got {value}")
    return value


def check_smooth(name: str, smooth, in_features: int) -> torch.Tensor:
    """SmoothQuant factors: a float tensor [in_features], finite and > 0 (0 or a negative factor would zero or
    flip a channel, inf/NaN would make every output NaN). One host sync, at quantization time."""
    if not isinstance(smooth, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of per-input-channel factors, got {type(smooth).__name__}")
    if not smooth.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {smooth.dtype}")
    if tuple(smooth.shape) != (in_features,):
        raise ValueError(f"{name}: expected shape ({in_features},), got {tuple(smooth.shape)}")
    bad = ~(torch.isfinite(smooth) & (smooth > 0))
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}: factors must be finite and > 0, got {float(smooth[j])} at input channel {j} "
                         f"({int(bad.sum())} bad of {in_features})")
    return smooth


def quantize_weight(w: torch.Tensor, group_size: int = 0, backend: str = "auto"):
    """Symmetric per-channel (group_size 0) or per-group int8 weight: the per-token kernel on rows / groups
    (same formula as quantize_weight_ref, same bits)."""
    N, K = w.shape
    if backend not in dispatch.OP_BACKENDS["quantize_per_token"]:  # e.g. W8A16's "dense": every backend, same bits
        backend = "auto"
    q, s = quantize_per_token(w.detach().float().reshape(-1, group_size or K), backend=backend)
    return q.reshape(N, K), (s if not group_size else s.reshape(N, K // group_size))


def checkpoint_errors(state_dict, prefix: str, local_metadata) -> list[str]:
    """What makes a state dict not an Int8Linear checkpoint this version reads: a newer or unknown format version
    (state_dict._metadata[layer]["version"]; absent: the unversioned format, the same as version 1), or a packed
    weight (uint8) saved under a key: packed layouts depend on the build and CPU, checkpoints must not carry them."""
    errors, where = [], f"state_dict._metadata[{prefix[:-1]!r}]['version']"
    version = (local_metadata or {}).get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or not 1 <= version <= STATE_DICT_VERSION):
        errors.append(f"{where}: Int8Linear state_dict format version {version!r}, this fastdistill reads versions "
                      f"1..{STATE_DICT_VERSION} (saved by a newer fastdistill? upgrade it)")
    for key, t in state_dict.items():
        if key.startswith(prefix) and "." not in key[len(prefix):] and isinstance(t, torch.Tensor) \
                and t.dtype == torch.uint8:
            errors.append(f"{key}: a uint8 tensor {tuple(t.shape)} looks like a packed CPU weight; packed weights "
                          "are a per-process cache and are never saved: load the portable weight_int8 + weight_scale")
    return errors


class _StraightThrough(torch.autograd.Function):
    """Forward: the int8 kernels. Backward: as if the weight were its dequantized value (and, in W8A8,
    as if activation quantization were the identity). master is None for frozen layers (x only)."""

    @staticmethod
    def forward(x, master, bias, w_int8, w_scale, mode, group_size, backend, validate, packed=None):
        return _int8_forward(x, w_int8, w_scale, bias, mode, backend, validate, packed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, master, bias, w_int8, w_scale, mode, group_size, backend, validate = inputs[:9]
        ctx.save_for_backward(x if master is not None else None, w_int8, w_scale)  # x only for d(master)
        ctx.group_size = group_size
        ctx.master_dtype = None if master is None else master.dtype
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, dy):
        x, w_int8, w_scale = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).float()
        dx = dmaster = dbias = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ dequantize_weight_ref(w_int8, w_scale, ctx.group_size)).to(ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dmaster = (dy2.t() @ x.reshape(-1, x.shape[-1]).float()).to(ctx.master_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy2.sum(0)
        return dx, dmaster, dbias, None, None, None, None, None, None, None


def _int8_forward(x, w_int8, w_scale, bias, mode, backend, validate=False, packed=None):
    if x.dtype not in KERNEL_DTYPES:  # float64: computed in float32, returned in x's dtype
        return _int8_forward(x.float(), w_int8, w_scale, bias, mode, backend, validate, packed).to(x.dtype)
    if packed is not None:  # CPU, packed weight current: the same bits (w8a8) as the two calls below
        b = None if bias is None else bias.detach().float()
        return _packed_call(_packed_ops(mode)[1], mode, x.detach(), packed, w_scale, b, None)
    if mode == "w8a16":
        return int8_weight_only_linear(x, w_int8, w_scale, bias, backend=backend, validate=validate)
    xq, xs = quantize_per_token(x, backend=backend, validate=validate)
    return int8_linear(xq, xs, w_int8, w_scale, bias, out_dtype=x.dtype, backend=backend)


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8: mode "w8a8" (per-token dynamic int8 activations, per-channel weights,
    int32 accumulation) or "w8a16" (per-channel or per-group weights, float activations).
    validate=True refuses inf/NaN activations (ValueError, one host sync per call); by default a row with
    inf/NaN gives a non-finite output row."""

    _version = STATE_DICT_VERSION  # recorded in state_dict._metadata; load_state_dict refuses newer versions

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "w8a8",
                 group_size: int | None = None, trainable: bool = False, smooth: bool = False,
                 backend: str = "auto", device=None, validate: bool = False):
        super().__init__()
        check_features("in_features", in_features)
        check_features("out_features", out_features)
        if not isinstance(validate, bool):
            raise TypeError(f"validate: expected a bool, got {type(validate).__name__}")
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
        self.validate = validate
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
        self._packed = self._pack_key = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "w8a8", *, group_size: int | None = None,
                    trainable: bool = False, smooth: torch.Tensor | None = None, backend: str = "auto",
                    validate: bool = False):
        """Quantizes `linear` (its weights are read, not modified). smooth: per-input-channel factors s,
        finite and > 0 (W is stored as W * s, activations are multiplied by 1 / s)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected nn.Linear, got {type(linear).__name__}")
        if smooth is not None:
            check_smooth("smooth", smooth, linear.in_features)
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, group_size, trainable,
                  smooth is not None, backend, device=linear.weight.device, validate=validate)
        w = linear.weight.detach().float()
        if smooth is not None:
            smooth = smooth.to(w.device, torch.float32)
            w = w * smooth
            out.smooth_inv.copy_(1.0 / smooth)
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
        self._pack()

    def _pack(self) -> None:
        """Packs weight_int8 for the CPU kernels (once per weight version); no packed copy where they can't run."""
        if torch.compiler.is_compiling():  # compiled forwards take the unpacked ops; eager re-checks the version
            return
        self._packed = self._pack_key = None
        w, ops = self.weight_int8, _packed_ops(self.mode)
        if ops is None or w.device.type != "cpu" or w.is_inference():  # inference tensors: no version counter
            return
        with torch.no_grad():
            self._packed = ops[0](w, self.group_size)
        self._pack_key = (w, w._version, ops[1])

    def _packed_weight(self, x: torch.Tensor):
        """The packed weight when the packed CPU kernels serve this call (rebuilt if weight_int8 was replaced or
        edited in place), else None: other devices and backends, validate=True, torch.compile."""
        if x.device.type != "cpu" or self.validate or torch.compiler.is_compiling():
            return None
        if not _cpu_backend(self.backend):
            return None
        key, w = self._pack_key, self._buffers["weight_int8"]
        if key is None or key[0] is not w or key[1] != w._version:
            if w.device.type != "cpu" or w.is_inference():
                return None
            self._pack()
        return self._packed

    def _inference(self, x: torch.Tensor, packed: torch.Tensor):
        """The inference fast path: one fused call (smoothing, quantization, GEMM, epilogue), no autograd; None
        where it does not apply (float64 x, buffers converted by model.to(dtype)). The op's arguments were checked
        when packing (the dict lookups skip nn.Module.__getattr__)."""
        if x.dtype not in KERNEL_DTYPES:
            return None
        bufs = self._buffers
        w_scale, inv = bufs["weight_scale"], bufs["smooth_inv"]
        bias = self._parameters.get("bias") if self.trainable else bufs.get("bias")
        if (w_scale.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32)
                or (inv is not None and inv.dtype != torch.float32)):
            return None
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected [..., {self.in_features}], got {tuple(x.shape)}")
        return _packed_call(self._pack_key[2], self.mode, x, packed, w_scale, bias, inv)

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
                         False, self.smooth_inv is not None, self.backend, device=self.weight_int8.device,
                         validate=self.validate)
        for name in ("weight_int8", "weight_scale", "smooth_inv", "bias"):
            if getattr(out, name) is not None:
                getattr(out, name).copy_(getattr(self, name))
        out._pack()
        return out

    def _refresh(self) -> None:
        compiling = torch.compiler.is_compiling()
        if compiling or self.weight._version != self._qversion:
            with torch.no_grad():
                self._set_int8(self.weight)
            if not compiling:
                self._qversion = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = self._pack_key
        if (key is not None and not torch.compiler.is_compiling() and not self.trainable and x.is_cpu
                and not (x.requires_grad and torch.is_grad_enabled()) and key[0] is self._buffers["weight_int8"]
                and key[1] == key[0]._version and not self.validate and _cpu_backend(self.backend)):
            out = self._inference(x, self._packed)  # the common case in a few checks (small layers pay per call)
            if out is not None:
                return out
        if self.trainable:
            self._refresh()
        packed = self._packed_weight(x)
        grad = torch.is_grad_enabled() and (x.requires_grad or self.trainable)
        if packed is not None and not grad:
            out = self._inference(x, packed)
            if out is not None:
                return out
        if self.smooth_inv is not None:
            x = x * self.smooth_inv.to(x.dtype)
        # .float(): a no-op unless model.to(float64/bf16/fp16) converted the scale buffer
        w_scale = self.weight_scale.float()
        if not self.trainable:
            # w8a16 without a packed copy: exact dx through int8_weight_only_linear's autograd; with one, the same
            # dx (dy @ dequantized weight) through _StraightThrough, so outputs never depend on x.requires_grad
            if not grad or (self.mode == "w8a16" and packed is None):
                return _int8_forward(x, self.weight_int8, w_scale, self.bias, self.mode, self.backend, self.validate,
                                     packed)
            return _StraightThrough.apply(x, None, self.bias, self.weight_int8, w_scale, self.mode, self.group_size,
                                          self.backend, self.validate, packed)
        return _StraightThrough.apply(x, self.weight, self.bias, self.weight_int8, w_scale, self.mode,
                                      self.group_size, self.backend, self.validate, packed)

    def __getstate__(self):
        # deepcopy / pickle / torch.save of the module: the packed copy is a per-process cache, rebuilt on use
        state = dict(self.__dict__)
        state["_packed"] = state["_pack_key"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_packed", None)  # a module pickled before the packed cache existed
        self.__dict__.setdefault("_pack_key", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        error_msgs.extend(checkpoint_errors(state_dict, prefix, local_metadata))
        # Shape mismatches are reported by nn.Module; a dtype mismatch would be silently cast by copy_.
        for name, dtype in (("weight_int8", torch.int8), ("weight_scale", torch.float32)):
            t = state_dict.get(prefix + name)
            if t is not None and t.dtype != dtype:
                error_msgs.append(f"{prefix}{name}: expected {dtype}, got {t.dtype} (shape {tuple(t.shape)})")
        inv = state_dict.get(prefix + "smooth_inv")
        if self.smooth_inv is not None and isinstance(inv, torch.Tensor) and inv.shape == self.smooth_inv.shape:
            try:
                check_smooth(f"{prefix}smooth_inv", inv, self.in_features)
            except (TypeError, ValueError) as e:
                error_msgs.append(str(e))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._qversion = None
        self._pack()

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode}{g}, trainable={self.trainable}, smooth={self.smooth_inv is not None}"
                + (", validate=True" if self.validate else ""))
