"""Pure-PyTorch references of the int8 ops (formulas fixed in csrc/ops.cpp; every backend matches
quantize_per_token_ref and int8_linear_ref bit for bit, int8_weight_only_linear_ref within tolerance).

Symmetric int8 everywhere: for a row (token, output channel or group) with a = max|v| in float32,
scale = a / 127 and q = rint(clamp(v * (127 / a), -127, 127)) (round half to even). Special rows:
- a == 0: scale 0, q 0.  NaN anywhere in the row: scale NaN (the quiet NaN 0x7fc00000), q 0.
  inf (and no NaN): scale inf, q 0. So a non-finite input row gives a non-finite output row downstream.
- a < 2^-64 (tiny or denormal rows): 127 / a would overflow for a < ~3.7e-37, so v and a are first
  multiplied by 2^64 (exact: a power of two): q = rint(clamp((v * 2^64) * (127 / (a * 2^64)))). This
  gives the bits the plain formula would give with an unbounded exponent.
"""
from __future__ import annotations

import torch

TINY = 2.0**-64  # rows with max|v| below this are quantized in units of 2^-64 (see above)


def _symmetric(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes the last dim of float32 `v`: (int8 values, float32 scale of shape v.shape[:-1])."""
    a = v.abs().amax(-1) if v.shape[-1] > 0 else v.new_zeros(v.shape[:-1])  # amax propagates NaN
    nan = a.isnan()
    scale = torch.where(nan, torch.full_like(a, float("nan")), a / 127.0)  # one NaN bit pattern for all
    ok = (a > 0) & (a < float("inf"))  # false for 0, inf, NaN: those rows quantize to zeros
    p = torch.where(a < TINY, torch.full_like(a, 2.0**64), torch.ones_like(a))
    inv = torch.where(ok, torch.full_like(a, 127.0) / torch.where(ok, a * p, 1.0), torch.zeros_like(a))
    v = v * p.unsqueeze(-1)
    q = torch.round((v * inv.unsqueeze(-1)).clamp(-127.0, 127.0))
    q = torch.where(ok.unsqueeze(-1), q, 0.0).to(torch.int8)
    return q, scale


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (int8 [..., K], float32 scale [...]): one symmetric scale per row."""
    return _symmetric(x.float())


def quantize_weight_ref(w: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (int8 [N, K], scale float32 [N] (group_size 0: per output channel) or
    [N, K // group_size] (per group of consecutive input channels))."""
    w = w.detach().float()
    if not group_size:
        return _symmetric(w)
    N, K = w.shape
    q, scale = _symmetric(w.reshape(N, K // group_size, group_size))
    return q.reshape(N, K), scale


def dequantize_weight_ref(w_int8: torch.Tensor, w_scale: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """float32 w[n, k] = q[n, k] * scale[n (, k // group_size)]."""
    q = w_int8.to(w_scale.dtype)
    if not group_size:
        return q * w_scale.unsqueeze(-1)
    N, K = q.shape
    return (q.reshape(N, K // group_size, group_size) * w_scale.unsqueeze(-1)).reshape(N, K)


def int8_matmul_exact(x_int8: torch.Tensor, w_int8: torch.Tensor) -> torch.Tensor:
    """x_int8 [M, K] @ w_int8[N, K]^T as int32, exact: float64 holds every int8 product sum for K < 2^37."""
    return (x_int8.double() @ w_int8.double().t()).to(torch.int32)


def int8_epilogue_ref(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias=None,
                      out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """((float(acc) * x_scale[m]) * w_scale[n]) (+ float(bias[n])), each step one fp32 rounding."""
    t = (acc.float() * x_scale.float().unsqueeze(-1)) * w_scale.float()
    if bias is not None:
        t = t + bias.float()
    return t.to(out_dtype)


def int8_linear_ref(x_int8: torch.Tensor, x_scale: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                    bias=None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W8A8: x_int8 [..., K], x_scale [...], w_int8 [N, K], w_scale [N] -> [..., N] in out_dtype."""
    lead = x_int8.shape[:-1]
    acc = int8_matmul_exact(x_int8.reshape(x_scale.numel(), x_int8.shape[-1]), w_int8)
    out = int8_epilogue_ref(acc, x_scale.reshape(-1), w_scale, bias, out_dtype)
    return out.reshape(*lead, w_int8.shape[0])


def int8_weight_only_linear_ref(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias=None,
                                group_size: int = 0) -> torch.Tensor:
    """W8A16: x [..., K] float, fp32 dequantized weight and accumulation, output in x.dtype.
    Differentiable in x (and bias) through autograd."""
    w = dequantize_weight_ref(w_int8, w_scale, group_size)
    out = x.float() @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def int8_weight_only_linear_f64(x, w_int8, w_scale, bias=None, group_size: int = 0) -> torch.Tensor:
    """The float64 oracle of int8_weight_only_linear (tests)."""
    w = dequantize_weight_ref(w_int8.double(), w_scale.double(), group_size)
    out = x.double() @ w.t()
    return out if bias is None else out + bias.double()
