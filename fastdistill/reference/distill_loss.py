"""Pure-PyTorch distillation loss: the fallback backend, the test oracle and the benchmark baseline.

Straightforward full-[rows, V] math in float32 (float64 when given float64), gradients by autograd.
Every log term is masked where its weight is zero so that -inf logits (padded vocabulary) give
finite values and gradients wherever the math is finite.

The NaN rule, the same on every backend: a row with NaN or +inf in its student or teacher logits
(softmax undefined) gets a NaN loss and an all-NaN gradient row; -inf is a masked token
(probability 0); rows whose label is ignore_index are exact zeros whatever they hold.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "mse")
REDUCTIONS = ("batchmean", "sum", "none")


def _weighted_log_ratio(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_k a_k (log a_k - log b_k) over the last dim, with 0 · log 0 = 0 (also in the gradient)."""
    live = a > 0
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    log_a = torch.where(live, log_a, zero)
    log_b = torch.where(live, log_b, zero)
    return torch.where(live, a * (log_a - log_b), zero).sum(-1)


def _log_mix(log_a: torch.Tensor, wa: float, log_b: torch.Tensor, wb: float) -> torch.Tensor:
    """log(wa · e^log_a + wb · e^log_b); -inf where both terms vanish."""
    x = log_a + (math.log(wa) if wa > 0 else -math.inf)
    y = log_b + (math.log(wb) if wb > 0 else -math.inf)
    dead = torch.isneginf(x) & torch.isneginf(y)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    out = torch.logaddexp(torch.where(dead, zero, x), torch.where(dead, zero, y))
    return torch.where(dead, torch.full_like(out, -math.inf), out)


def divergence_from_logs(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, beta: float = 0.5,
                         skew: float = 0.1) -> torch.Tensor:
    """D(p ‖ q) over the last dim from log-probabilities. p is used as given (top-k's bucket tail
    passes a p that may not sum to exactly 1)."""
    p, q = log_p.exp(), log_q.exp()
    if divergence == "kl" or (divergence == "jsd" and beta == 0.0):
        return _weighted_log_ratio(p, log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _weighted_log_ratio(q, log_q, log_p)
    if divergence == "jsd":
        log_m = _log_mix(log_p, beta, log_q, 1.0 - beta)
        return beta * _weighted_log_ratio(p, log_p, log_m) + (1.0 - beta) * _weighted_log_ratio(q, log_q, log_m)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if divergence == "skew_kl":
        return _weighted_log_ratio(p, log_p, _log_mix(log_p, skew, log_q, 1.0 - skew))
    if divergence == "skew_reverse_kl":
        return _weighted_log_ratio(q, log_q, _log_mix(log_p, 1.0 - skew, log_q, skew))
    raise ValueError(f"divergence: {divergence!r} is not a divergence of distributions; expected one of "
                     f"{DIVERGENCES[:-1]}")


def divergence_ref(student: torch.Tensor, teacher: torch.Tensor, divergence: str, temperature: float,
                   beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """Per-row divergence D of (..., V) logits in the compute dtype (no T², no weights)."""
    if divergence == "mse":
        return (student - teacher).square().mean(-1)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence: unknown {divergence!r}; expected one of {DIVERGENCES}")
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1).detach()
    return divergence_from_logs(log_p, log_q, divergence, beta, skew)


def poisoned_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows (last dim) holding NaN or +inf: one NaN-propagating max per row."""
    return ~(x.amax(-1) < math.inf) if x.shape[-1] else torch.zeros(x.shape[:-1], dtype=torch.bool,
                                                                    device=x.device)


def poison(x: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """x with its `bad` rows multiplied by NaN: their values and their whole gradient become NaN
    (the masks inside the divergences would otherwise turn NaN into 0)."""
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return x * torch.where(bad, torch.full((), math.nan, dtype=x.dtype, device=x.device), one).unsqueeze(-1)


def distill_loss_rows_ref(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None, *,
                          divergence: str = "kl", temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                          soft_weight: float = 1.0, hard_weight: float = 0.0, scale_t2: bool = True,
                          ignore_index: int = -100) -> torch.Tensor:
    """Per-row loss of (..., V) logits, shape (...): zero on rows whose label is ignore_index."""
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    z, y = student.to(dtype), teacher.detach().to(dtype)
    valid = None
    if labels is not None:
        valid = labels != ignore_index
        # Ignored rows may hold anything (e.g. all -inf padding): zero them so nothing leaks into grads.
        z = torch.where(valid.unsqueeze(-1), z, torch.zeros((), dtype=dtype, device=z.device))
        y = torch.where(valid.unsqueeze(-1), y, torch.zeros((), dtype=dtype, device=y.device))
    bad = poisoned_rows(z) | poisoned_rows(y)
    z = poison(z, bad)
    coef = soft_weight * (temperature ** 2 if scale_t2 and divergence != "mse" else 1.0)
    rows = coef * divergence_ref(z, y, divergence, temperature, beta, skew)
    if hard_weight != 0.0:
        if labels is None:
            raise ValueError("labels: required when hard_weight != 0")
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), safe.reshape(-1), reduction="none").view(rows.shape)
        rows = rows + hard_weight * ce
    rows = torch.where(bad, torch.full((), math.nan, dtype=dtype, device=rows.device), rows)
    if valid is not None:
        rows = torch.where(valid, rows, torch.zeros((), dtype=dtype, device=rows.device))
    return rows


def distill_loss_ref(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None, *,
                     reduction: str = "batchmean", num_items=None, **options) -> torch.Tensor:
    """The reference distill_loss: same options and semantics as fastdistill.distill_loss."""
    rows = distill_loss_rows_ref(student, teacher, labels, **options)
    return reduce_rows(rows, labels, reduction, num_items, options.get("ignore_index", -100))


def reduce_rows(rows: torch.Tensor, labels, reduction: str, num_items, ignore_index: int) -> torch.Tensor:
    """The losses' reductions: "none", "sum", "batchmean" (/ num_items, or / valid rows)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if num_items is not None:
        return total / num_items
    count = rows.numel() if labels is None else (labels != ignore_index).sum()
    return total / max(count, 1) if isinstance(count, int) else total / count.clamp(min=1)
