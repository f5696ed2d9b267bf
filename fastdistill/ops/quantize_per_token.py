"""fastdistill.quantize_per_token: symmetric per-row int8 quantization (fused absmax + round + cast).

Custom ops (same schema, same bits; formula in csrc/ops.cpp):
    fastdistill::quantize_per_token_cpu / _cuda   kernels in csrc/
    fastdistill::quantize_per_token_triton        kernel in fastdistill/kernels/int8_linear.py
Not differentiable (int8 output); Int8Linear's straight-through estimator handles training.
"""
from __future__ import annotations

import torch

from fastdistill import dispatch
from fastdistill.ops.common import (check_finite, check_float, contiguous_rows, interpreting, launch_guard, native,
                                    new_output, poison_enabled, register_native)
from fastdistill.reference.int8_linear import quantize_per_token_ref


def _outputs(x):
    # int8 cannot hold the NaN poison: -128, which the symmetric quantizer never writes
    q = torch.full(x.shape, -128, dtype=torch.int8, device=x.device) if poison_enabled() else torch.empty_like(
        x, dtype=torch.int8)
    return q, new_output(x.shape[:1], like=x, dtype=torch.float32)


@torch.library.custom_op("fastdistill::quantize_per_token_triton", mutates_args=())
def quantize_per_token_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from fastdistill.kernels.int8_linear import quantize_per_token_launch

    q, scale = _outputs(x)
    with launch_guard(x):
        quantize_per_token_launch(x, q, scale, interpret=interpreting())
    return q, scale


def _fake(x):
    return torch.empty(x.shape, dtype=torch.int8, device=x.device), torch.empty(x.shape[:1], device=x.device)


torch.library.register_fake("fastdistill::quantize_per_token_triton")(_fake)

register_native(("quantize_per_token_cpu", "quantize_per_token_cuda"), _fake)


def quantize_per_token(x: torch.Tensor, *, backend: str = "auto", validate: bool = False):
    """x [..., K] float32/bf16/fp16 -> (int8 [..., K], float32 scale [...]) with scale = max|row| / 127 and
    q = round_half_even(x * (127 / max|row|)) clamped to ±127, the same bits on every backend. All-zero rows
    give scale 0 and zeros; a row with a NaN gets scale NaN, a row with inf (and no NaN) scale inf, both with
    q = 0, so they stay non-finite downstream (validate=True raises instead). Rows with max|row| < 2^-64
    (tiny, denormal) are scaled by 2^64 first, exactly, so they quantize like any other row."""
    check_float("x", x)
    if validate:
        check_finite("x", x)
    x = x.detach()
    name = dispatch.select("quantize_per_token", backend, x.device, (x.dtype,))
    if name == "reference":
        return quantize_per_token_ref(x)
    rows = contiguous_rows(x)
    op = quantize_per_token_triton if name == "triton" else native(f"quantize_per_token_{name}")
    q, scale = op(rows)
    return q.view(x.shape), scale.view(x.shape[:-1])
