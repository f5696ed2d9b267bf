"""Sampled teacher targets (RS-KD, "Sparse Logit Sampling", arXiv 2503.16870): k token ids per position
drawn with replacement from the teacher's distribution at temperature T, with the teacher's
log-probabilities at those ids.

Estimator "counts": the proposal is the teacher's own p_T (importance weight p/q = 1), so the target
distribution is the draws' empirical frequency, p_hat(x) = #{j : x_j = x} / k, and E[p_hat] = p_T exactly.
The forward-KL gradient is linear in the target (d/dz = (q_T - p) / T), so the gradient against p_hat
is an unbiased estimate of the full-distribution gradient; the stored log-probabilities make the loss
value, mean_j (log p_T(x_j) - log q_T(x_j)), an unbiased estimate of KL(p_T || q_T) too.
Storage: k ids (int32) + k log-probabilities (fp16/bf16) per position, the bytes of a top-k cache.
"""
from __future__ import annotations

import hashlib
import math

import torch

ESTIMATOR = "counts"  # recorded in the cache manifest; the only estimator the sampled losses implement
METHOD = "multinomial_with_replacement"


def sequence_seed(seed: int, sequence: int) -> int:
    """The generator seed of one sequence: a hash of (seed, sequence index), so that a sequence's draws
    depend on neither the batch it was built in nor the order shards were (re)built."""
    digest = hashlib.sha256(f"fastdistill.sampled:{int(seed)}:{int(sequence)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_teacher_targets(logits: torch.Tensor, k: int, temperature: float = 1.0, *,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs (..., k) float32, indices (..., k) int64) of k draws per row of `logits` (..., V) from
    softmax(logits / temperature), with replacement; ids sorted ascending within a row (duplicates are
    kept: they carry the counts), logprobs = log_softmax(logits.float() / temperature) at those ids.

    `generator` must live on logits' device (None: the default generator). The same generator state,
    device and inputs give the same draws. Rows holding NaN or +inf, or only -inf, have no distribution
    to draw from: ValueError naming the row.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k: expected an integer >= 1 (draws per position), got {k!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    V = logits.shape[-1]
    logprobs = torch.log_softmax(logits.float().reshape(-1, V) / temperature, dim=-1)
    bad = torch.isnan(logprobs.amax(-1))  # amax propagates NaN: one reduction, no [rows, V] mask
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"logits: row {row} has no distribution to sample (NaN or +inf logits, or all -inf)")
    if logprobs.shape[0] == 0:
        ids = torch.empty((0, k), dtype=torch.int64, device=logits.device)
    else:
        ids = torch.multinomial(logprobs.exp(), k, replacement=True, generator=generator).sort(-1).values
    values = logprobs.gather(-1, ids)
    return values.view(*logits.shape[:-1], k), ids.view(*logits.shape[:-1], k)
