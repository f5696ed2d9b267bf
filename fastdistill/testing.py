"""Test and benchmark helpers: the tolerance table, input generators, and oracle comparisons.

Rule for every backend (flash-attention's): compute the reference in float64 (the oracle) and in
the backend's own precision on the same inputs; the backend's max error vs the oracle may be at
most `factor` x the reference's own max error, plus a floor relative to the largest |oracle| value
(about one rounding of that dtype). This adapts to the conditioning of each case (cancellation,
extreme logits) instead of one fixed atol/rtol.
"""
from __future__ import annotations

import math

import torch

from fastdistill.ops.common import POISON_ENV, new_output, poison_enabled  # noqa: F401  (re-exported)

# Tolerance table: (factor, relative floor, absolute floor) by result dtype. The relative floor is
# half an ulp of bf16/fp16 times max|oracle|; the absolute floor covers oracles that are exactly 0.
# Losses are float32 for every input dtype (math in fp32 on the same rounded inputs): float32 row.
TOLERANCES = {
    # fp32 gradients come from analytic formulas in the kernels and from autograd's chain rule in
    # the reference: same conditioning, different rounding paths (seen up to ~3x at T = 0.5, jsd, and
    # 4.5x at T = 0.25, reverse_kl, found by the property test, where the reference was lucky).
    torch.float32: (6.0, 1e-6, 1e-7),
    torch.bfloat16: (2.0, 2.0**-8, 1e-6),
    torch.float16: (2.0, 2.0**-11, 1e-6),
}


def make_logits(shape, *, dtype=torch.float32, device="cpu", seed: int = 0, scale: float = 3.0,
                kind: str = "normal") -> torch.Tensor:
    """Random logits. kind: "normal" (N(0, scale²)), "extreme" (±1e4 spikes on a normal base),
    "neginf" (about 10% of entries and the last 7 columns -inf, as in a padded vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if kind == "extreme":
        spikes = torch.rand(shape, generator=g, dtype=torch.float64) < 0.05
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()
        x = torch.where(spikes, sign * 1e4, x)
    elif kind == "neginf":
        holes = torch.rand(shape, generator=g) < 0.1
        x = torch.where(holes, torch.tensor(float("-inf"), dtype=x.dtype), x)
        x[..., -7:] = float("-inf")
        x[..., 0] = 0.0  # keep every row with at least one finite entry
    elif kind != "normal":
        raise ValueError(f"kind: unknown {kind!r}")
    return x.to(dtype).to(device)


def make_labels(shape, vocab: int, *, ignore_fraction: float = 0.25, ignore_index: int = -100, seed: int = 0,
                device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_fraction] = ignore_index
    return labels.to(device)


def max_error(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    diff = (actual.double() - expected.double()).abs()
    if mask is not None:
        diff = diff[mask]
    return diff.max().item() if diff.numel() else 0.0


def assert_close_to_oracle(actual: torch.Tensor, oracle: torch.Tensor, reference: torch.Tensor, *,
                           mask: torch.Tensor | None = None, roundings: int = 1, abs_floor: float | None = None,
                           msg: str = "") -> None:
    """actual vs the float64 oracle, judged by `reference` (the reference in actual's precision).
    mask selects the elements compared; non-finite elements must match the oracle's exactly.
    roundings: how many times actual was rounded to its dtype (a gradient computed in the forward
    pass and then scaled by a grad_output != 1 in backward is rounded twice). abs_floor replaces the
    table's absolute floor where a kernel documents a larger absolute error."""
    assert actual.shape == oracle.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    assert actual.dtype == reference.dtype, f"{msg}: dtype {actual.dtype} != reference's {reference.dtype}"
    finite = torch.isfinite(oracle)
    assert torch.equal(torch.isfinite(actual), finite), f"{msg}: non-finite pattern differs from the oracle"
    assert torch.equal(actual[~finite].double(), oracle[~finite]), f"{msg}: non-finite values differ"
    both = finite if mask is None else (finite & mask)
    k, rel_floor, table_abs_floor = TOLERANCES[actual.dtype]
    abs_floor = table_abs_floor if abs_floor is None else abs_floor
    k, rel_floor = k + roundings - 1, rel_floor * roundings
    err = max_error(actual, oracle, both)
    ref_err = max_error(reference, oracle, both)
    scale = oracle[both].abs().max().item() if both.any() else 0.0
    bound = k * ref_err + rel_floor * scale + abs_floor
    assert err <= bound, (f"{msg}: max error {err:.3e} > {k} x reference's {ref_err:.3e} "
                          f"+ {rel_floor:.1e} x max|oracle| {scale:.3e} + {abs_floor:.0e}")


def reduced_reference(reference_rows: torch.Tensor, oracle_rows: torch.Tensor, oracle: torch.Tensor, *,
                      labels=None, reduction: str, num_items=None, ignore_index: int = -100,
                      abs_floor: float | None = None) -> torch.Tensor:
    """Stand-in for the low-precision reference of a reduced (scalar) loss: a value whose error vs the
    oracle is the reduction of the per-row allowances, each row's reference error plus the table's
    absolute floor. Rows are rounded independently, so the reference's own total can be right by
    luck (row errors cancel, or every row is exactly 0 as at V = 1) while a kernel's equally accurate
    rows add up."""
    from fastdistill.reference.distill_loss import reduce_rows

    floor = TOLERANCES[reference_rows.dtype][2] if abs_floor is None else abs_floor
    row_err = (reference_rows.double() - oracle_rows.double()).abs() + floor
    bound = reduce_rows(row_err, labels, reduction, num_items, ignore_index).double()
    oracle = oracle.double()
    standin = (oracle + bound).to(reference_rows.dtype)
    while (standin.double() - oracle).abs() < bound:  # rounding to the dtype must not shrink the allowance
        standin = torch.nextafter(standin, torch.full_like(standin, math.inf))
    return standin


def loss_abs_floor(options: dict) -> float:
    """The float32 absolute floor for a row loss: the divergence's floor times its multiplier
    soft_weight · T² (a divergence that is 0 up to rounding stays so only up to that factor)."""
    t = options.get("temperature", 1.0)
    coef = abs(options.get("soft_weight", 1.0)) * (t * t if options.get("scale_t2", True) else 1.0)
    return TOLERANCES[torch.float32][2] * max(1.0, coef)


def sqnr(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(‖expected‖² / ‖expected − actual‖²), in float64.

    Identical tensors give +inf; used by the int8 and sparse tests and benchmarks.
    """
    e = expected.detach().double()
    noise = (e - actual.detach().double()).pow(2).sum()
    signal = e.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
