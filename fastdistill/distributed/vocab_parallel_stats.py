"""Per-chunk math of a vocabulary-sharded distillation loss: this rank's [rows, V_r] logits, per-row all-reduces.

For a chunk of rows (s = z / T, t = y / T, the student's and teacher's scaled logits on this rank):
  1. MAX  [rows, 2]: max z, max y (shifts for the exponentials; constants for the gradient); not for mse
     without a hard-label term.
  2. SUM  [rows, c]: sum exp(s - max), sum exp(t - max) -> log-partition functions; the label's logit (it lives on
     one rank; the others add 0); sum exp(z - max z) when a hard-label term runs at T != 1; a NaN-rule flag
     (NaN or +inf in any shard); for mse the sum of squares instead of the exponential sums.
  3. SUM  [rows, 2]: D_r = this slice's part of D(p || q) = sum_i f(p_i, q_i), and H_r = sum over the slice of
     h_i = dD/d(log q_i). Every divergence here is such a sum over the vocabulary, so the gradient is local:
     dD/ds_j = h_j - q_j * H with H = sum_r H_r (log q_i = s_i - logsumexp(s)). For kl H = -1 and for
     reverse_kl H = D + 1: they send D_r alone ([rows, 1]) and run in closed form; the other divergences get h
     from autograd on fastdistill.reference.distill_loss.divergence_from_logs over the local slice, so the
     masks of the reference (0 log 0 = 0, -inf logits) hold there as well.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from fastdistill.distributed.vocab_parallel_shards import VocabShards
from fastdistill.reference.distill_loss import divergence_from_logs


@dataclass(frozen=True)
class LossOptions:
    divergence: str  # after ops.loss_common.resolve (jsd at beta 0/1 is kl/reverse_kl, ...)
    weight: float  # beta or skew, resolved
    temperature: float
    soft_weight: float
    hard_weight: float
    scale_t2: bool
    ignore_index: int


def row_max(x: torch.Tensor) -> torch.Tensor:
    """Row maxima of [rows, V_r]; -inf for an empty slice; NaN and +inf rows give -inf (they are poisoned by the
    NaN-rule flag; a NaN must not reach the MAX all-reduce, whose NaN handling differs between backends)."""
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], -math.inf)
    m = x.amax(-1)
    return torch.where(m < math.inf, m, torch.full_like(m, -math.inf))


def poisoned_local(*xs: torch.Tensor) -> torch.Tensor:
    """Rows holding NaN or +inf in any of xs on this rank (one NaN-propagating max per row)."""
    bad = torch.zeros(xs[0].shape[:-1], dtype=torch.bool, device=xs[0].device)
    for x in xs:
        if x.shape[-1]:
            bad |= ~(x.amax(-1) < math.inf)
    return bad


def take(x: torch.Tensor, ids: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """x[row, ids] where `own` (ids local to this slice), 0 elsewhere: summed over ranks, every entry arrives
    exactly once (x + 0 = x)."""
    if x.shape[-1] == 0:
        return x.new_zeros(ids.shape)
    return torch.where(own, x.gather(-1, torch.where(own, ids, torch.zeros_like(ids))), torch.zeros((), dtype=x.dtype))


def label_slot(labels: Optional[torch.Tensor], valid, shards: VocabShards):
    """(label ids local to this slice [rows, 1], whether this rank owns them [rows, 1])."""
    local = (labels - shards.start).unsqueeze(-1)
    own = ((local >= 0) & (local < shards.local)) & valid.unsqueeze(-1)
    return local, own


def dense_chunk(z: torch.Tensor, y: torch.Tensor, labels: Optional[torch.Tensor], scale: torch.Tensor,
                shards: VocabShards, opt: LossOptions, want_grad: bool):
    """(row losses times scale [rows], d(sum of them)/dz [rows, V_r] or None), both in the compute dtype
    (float64 if z or y is float64, else float32). z, y: this rank's [rows, V_r] student / teacher logits."""
    dtype = torch.float64 if torch.float64 in (z.dtype, y.dtype) else torch.float32
    z, y = z.detach().to(dtype), y.detach().to(dtype)
    zero = torch.zeros((), dtype=dtype, device=z.device)
    valid = None
    if labels is not None:
        valid = labels != opt.ignore_index
        z = torch.where(valid.unsqueeze(-1), z, zero)  # ignored rows may hold anything (all -inf padding)
        y = torch.where(valid.unsqueeze(-1), y, zero)
    mse, hard, T = opt.divergence == "mse", opt.hard_weight != 0.0, opt.temperature
    V = shards.vocab
    if not mse or hard:  # mse alone needs no exponentials, hence no shift
        maxima = shards.all_reduce_(torch.stack([row_max(z), row_max(y)], -1), dist.ReduceOp.MAX)
        m_z, m_y = maxima[:, 0:1], maxima[:, 1:2]
    cols = []
    if mse:
        cols.append((z - y).square().sum(-1))
    else:
        s, t = (z, y) if T == 1.0 else (z / T, y / T)
        e_s, e_t = (s - m_z / T).exp(), (t - m_y / T).exp()
        cols += [e_s.sum(-1), e_t.sum(-1)]
    hard_lse_apart = hard and (mse or T != 1.0)
    if hard_lse_apart:
        cols.append((z - m_z).exp().sum(-1))
    if hard:
        local_label, own_label = label_slot(labels, valid, shards)
        cols.append(take(z, local_label, own_label).squeeze(-1))
    cols.append(poisoned_local(z, y).to(dtype))
    sums = shards.all_reduce_(torch.stack(cols, -1))
    bad = sums[:, -1] > 0
    grad = None
    if mse:
        rows = opt.soft_weight * sums[:, 0] / V
        if want_grad:
            grad = (2.0 * opt.soft_weight / V) * (z - y)
    else:
        coef = opt.soft_weight * (T * T if opt.scale_t2 else 1.0)
        lse_s, lse_t = m_z / T + sums[:, 0:1].log(), m_y / T + sums[:, 1:2].log()
        if opt.divergence in ("kl", "reverse_kl"):
            d, g = _kl_sides(s, t, e_s / sums[:, 0:1], e_t / sums[:, 1:2], lse_s, lse_t, opt.divergence, shards,
                             want_grad)
        else:
            d, g = _any_divergence(s - lse_s, t - lse_t, opt, shards, want_grad)
        rows = coef * d
        if want_grad:
            grad = g.mul_(coef / T)
    if hard:
        lse = (m_z + sums[:, -3:-2].log()) if hard_lse_apart else (m_z + sums[:, 0:1].log())
        rows = rows + opt.hard_weight * (lse.squeeze(-1) - sums[:, -2])
        if want_grad:
            onehot = torch.zeros_like(z)
            if z.shape[-1]:
                onehot.scatter_(-1, torch.where(own_label, local_label, 0), own_label.to(dtype))
            grad = grad + opt.hard_weight * ((z - lse).exp() - onehot)
    return finish_rows(rows, grad, bad, valid, scale)


def _kl_sides(s, t, q, p, lse_s, lse_t, divergence: str, shards: VocabShards, want_grad: bool):
    """(D, dD/ds) of kl (D(p ‖ q): dD/ds = q - p, no statistic beyond D) and reverse_kl (D(q ‖ p):
    dD/ds = q (log q - log p - D)) in closed form: one SUM all-reduce [rows, 1]."""
    if divergence == "kl":
        a, log_ratio = p, (t - s) - (lse_t - lse_s)  # log p - log q
    else:
        a, log_ratio = q, (s - t) - (lse_s - lse_t)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    live = a > 0  # 0 · log 0 = 0, also against -inf logits
    d = shards.all_reduce_(torch.where(live, a * log_ratio, zero).sum(-1, keepdim=True))
    if not want_grad:
        return d.squeeze(-1), None
    grad = q - p if divergence == "kl" else torch.where(live, q * (log_ratio - d), zero)
    return d.squeeze(-1), grad


def _any_divergence(log_q, log_p, opt: LossOptions, shards: VocabShards, want_grad: bool):
    """(D, dD/ds) of any divergence: h = dD_r/d(log q) by autograd on the reference's formula over this slice,
    then dD/ds = h - q · H with H = sum of h over the vocabulary; one SUM all-reduce [rows, 2] (D_r, H_r)."""
    with torch.enable_grad():
        leaf = log_q.detach().requires_grad_(want_grad)
        part = divergence_from_logs(log_p, leaf, opt.divergence, opt.weight, opt.weight)
        h = torch.autograd.grad(part.sum(), leaf)[0] if want_grad else torch.zeros_like(log_q)
    totals = shards.all_reduce_(torch.stack([part.detach(), h.sum(-1)], -1))
    return totals[:, 0], (h - log_q.exp() * totals[:, 1:2] if want_grad else None)


def finish_rows(rows, grad, bad, valid, scale):
    """The NaN rule (NaN loss and gradient rows), exact zeros on ignored rows (whatever was computed there: a
    top-k padding row can be inf), and the reduction's scale."""
    scale = scale.to(rows.dtype)
    nan = torch.full((), math.nan, dtype=rows.dtype, device=rows.device)
    factor = torch.where(bad, nan, scale.expand(rows.shape))
    rows = rows * factor
    if grad is not None:
        grad = grad.mul_(factor.unsqueeze(-1))
    if valid is not None:
        zero = torch.zeros((), dtype=rows.dtype, device=rows.device)
        rows = torch.where(valid, rows, zero)
        grad = None if grad is None else torch.where(valid.unsqueeze(-1), grad, zero.to(grad.dtype))
    return rows, grad
