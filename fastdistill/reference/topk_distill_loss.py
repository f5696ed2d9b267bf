"""Pure-PyTorch top-k distillation loss: the fallback backend, the test oracle and the benchmark baseline.

The teacher is given as its top-k log-probabilities (already at temperature T) and their token ids.
Plain full-[rows, V] math in float32 (float64 when given float64), gradients by autograd; the
per-category divergence formulas are those of fastdistill.reference.distill_loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdistill.reference.distill_loss import divergence_from_logs, poison, poisoned_rows, reduce_rows

TAILS = ("renormalize", "bucket")


def _masked_logsumexp(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """logsumexp over the kept entries of the last dim; -inf (with a zero gradient, not NaN) where
    nothing finite is kept."""
    x = torch.where(keep, x, torch.full_like(x, -math.inf))
    dead = torch.isneginf(x.amax(-1, keepdim=True))
    out = torch.logsumexp(torch.where(dead, torch.zeros_like(x), x), -1)
    return torch.where(dead.squeeze(-1), torch.full_like(out, -math.inf), out)


def _category_logs(z, lp, ids, tail, temperature):
    """(log p, log q) over the categories: the k ids (renormalized), or the k ids + the rest bucket."""
    s = z / temperature
    if tail == "renormalize":
        return F.log_softmax(lp, -1), F.log_softmax(s.gather(-1, ids), -1)
    log_q_all = F.log_softmax(s, -1)
    log_q = log_q_all.gather(-1, ids)
    V, k = z.shape[-1], ids.shape[-1]
    if k == V:  # no token outside the top k: no rest bucket
        return lp, log_q
    # p_rest is clamped: fp16-rounded log-probs can sum to slightly more than 1.
    p_rest = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp(min=0.0)
    log_p_rest = torch.where(p_rest > 0, p_rest.clamp(min=torch.finfo(p_rest.dtype).tiny).log(),
                             torch.full_like(p_rest, -math.inf))
    rest = torch.ones_like(s, dtype=torch.bool).scatter(-1, ids, False)
    # q_rest from the rest's own log-probs (no 1 - sum q cancellation when the rest is tiny).
    log_q_rest = _masked_logsumexp(log_q_all, rest).unsqueeze(-1)
    return torch.cat([lp, log_p_rest], -1), torch.cat([log_q, log_q_rest], -1)


def finish_rows(rows, z, labels, valid, bad, hard_weight: float):
    """The end shared by the sparse-target references: + hard_weight · CE(z, labels), NaN on `bad` rows,
    exact 0 on ignored rows (valid False; None: every row counts)."""
    if hard_weight != 0.0:
        if labels is None:
            raise ValueError("labels: required when hard_weight != 0")
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), safe.reshape(-1), reduction="none").view(rows.shape)
        rows = rows + hard_weight * ce
    rows = torch.where(bad, torch.full((), math.nan, dtype=rows.dtype, device=rows.device), rows)
    if valid is not None:
        rows = torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    return rows


def topk_distill_loss_rows_ref(student: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                               teacher_topk_indices: torch.Tensor, labels: torch.Tensor | None = None, *,
                               tail: str = "renormalize", divergence: str = "kl", temperature: float = 1.0,
                               beta: float = 0.5, skew: float = 0.1, soft_weight: float = 1.0,
                               hard_weight: float = 0.0, scale_t2: bool = True,
                               ignore_index: int = -100) -> torch.Tensor:
    """Per-row loss of (..., V) student logits against (..., k) teacher log-probs at ids (..., k).

    Rows with an id outside [0, V) get a NaN loss and gradient (as the Triton kernel does);
    duplicate ids within a row are undefined. Rows whose label is ignore_index are zero.
    The NaN rule (see fastdistill.reference.distill_loss) covers what a row reads: NaN or +inf in its
    top-k log-probs, in the student logits at its ids, or, when the loss reads the whole student row
    (bucket tail, hard-label term), anywhere in that row, gives a NaN loss and gradient row."""
    if tail not in TAILS:
        raise ValueError(f"tail: unknown {tail!r}; expected one of {TAILS}")
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher_topk_logprobs.dtype) else torch.float32
    z, lp = student.to(dtype), teacher_topk_logprobs.detach().to(dtype)
    ids = teacher_topk_indices.long()
    V, k = z.shape[-1], ids.shape[-1]
    valid = None
    if labels is not None:
        valid = labels != ignore_index
        # Ignored rows may hold anything (padding ids, -inf logits): give them harmless values.
        keep = valid.unsqueeze(-1)
        z = torch.where(keep, z, torch.zeros((), dtype=dtype, device=z.device))
        lp = torch.where(keep, lp, torch.full((), -math.log(k), dtype=dtype, device=z.device))
        ids = torch.where(keep, ids, torch.arange(k, device=ids.device))
    in_range = (ids >= 0) & (ids < V)
    ids = torch.where(in_range, ids, torch.zeros_like(ids))
    # NaN loss and gradient on rows with an out-of-range id (never a silently wrong number), or
    # under the NaN rule.
    bad = ~in_range.all(-1) | poisoned_rows(lp) | poisoned_rows(z.gather(-1, ids))
    if tail == "bucket" or hard_weight != 0.0:
        bad = bad | poisoned_rows(z)
    z = poison(z, bad)
    log_p, log_q = _category_logs(z, lp, ids, tail, temperature)
    coef = soft_weight * (temperature ** 2 if scale_t2 else 1.0)
    rows = coef * divergence_from_logs(log_p, log_q, divergence, beta, skew)
    return finish_rows(rows, z, labels, valid, bad, hard_weight)


def topk_distill_loss_ref(student: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                          teacher_topk_indices: torch.Tensor, labels: torch.Tensor | None = None, *,
                          reduction: str = "batchmean", num_items=None, **options) -> torch.Tensor:
    """The reference topk_distill_loss: same options and semantics as fastdistill.topk_distill_loss."""
    rows = topk_distill_loss_rows_ref(student, teacher_topk_logprobs, teacher_topk_indices, labels, **options)
    return reduce_rows(rows, labels, reduction, num_items, options.get("ignore_index", -100))
