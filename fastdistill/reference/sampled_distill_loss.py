"""Pure-PyTorch sampled (RS-KD) distillation loss: the fallback backend, the test oracle and the benchmark
baseline.

The teacher is given as k token ids drawn with replacement from p_T = softmax(teacher / T) (duplicates kept)
and the teacher's log-probabilities at each draw (fastdistill.cache.sampling, estimator "counts"). With
q_T = softmax(student / T) over the full vocabulary and coef = soft_weight * (T² if scale_t2):
    row = coef * mean_j (lp_j - log q_T(x_j)) + hard_weight * CE(student, label)
whose gradient, coef / T * (q_T - p_hat) with p_hat the draws' frequencies, is an unbiased estimate of the
full forward-KL gradient. Plain math in float32 (float64 when given float64), gradients by autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdistill.reference.distill_loss import poison, poisoned_rows, reduce_rows
from fastdistill.reference.topk_distill_loss import finish_rows


def sampled_distill_loss_rows_ref(student: torch.Tensor, teacher_sampled_logprobs: torch.Tensor,
                                  teacher_sampled_indices: torch.Tensor, labels: torch.Tensor | None = None, *,
                                  temperature: float = 1.0, soft_weight: float = 1.0, hard_weight: float = 0.0,
                                  scale_t2: bool = True, ignore_index: int = -100) -> torch.Tensor:
    """Per-row loss of (..., V) student logits against k draws: ids (..., k) and their log-probs (..., k).

    Rows whose label is ignore_index are zero (their ids and log-probs are never read). The NaN rule
    (see fastdistill.reference.distill_loss): NaN or +inf in a counted row's log-probs or student row, a
    -inf log-prob at a draw (a drawn token has probability > 0), or an id outside [0, V) gives that row a
    NaN loss and gradient."""
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher_sampled_logprobs.dtype) else torch.float32
    z, lp = student.to(dtype), teacher_sampled_logprobs.detach().to(dtype)
    ids = teacher_sampled_indices.long()
    V = z.shape[-1]
    valid = None
    if labels is not None:
        valid = labels != ignore_index
        # Ignored rows may hold anything (padding ids, -inf logits): give them harmless values.
        keep = valid.unsqueeze(-1)
        z = torch.where(keep, z, torch.zeros((), dtype=dtype, device=z.device))
        lp = torch.where(keep, lp, torch.zeros((), dtype=dtype, device=z.device))
        ids = torch.where(keep, ids, torch.zeros_like(ids))
    in_range = (ids >= 0) & (ids < V)
    ids = torch.where(in_range, ids, torch.zeros_like(ids))
    bad = ~in_range.all(-1) | poisoned_rows(lp) | torch.isneginf(lp).any(-1) | poisoned_rows(z)
    z = poison(z, bad)
    log_q = F.log_softmax(z / temperature, -1)
    coef = soft_weight * (temperature ** 2 if scale_t2 else 1.0)
    rows = coef * (lp - log_q.gather(-1, ids)).mean(-1)
    return finish_rows(rows, z, labels, valid, bad, hard_weight)


def sampled_distill_loss_ref(student: torch.Tensor, teacher_sampled_logprobs: torch.Tensor,
                             teacher_sampled_indices: torch.Tensor, labels: torch.Tensor | None = None, *,
                             reduction: str = "batchmean", num_items=None, **options) -> torch.Tensor:
    """The reference sampled_distill_loss: same options and semantics as fastdistill.sampled_distill_loss."""
    rows = sampled_distill_loss_rows_ref(student, teacher_sampled_logprobs, teacher_sampled_indices, labels,
                                         **options)
    return reduce_rows(rows, labels, reduction, num_items, options.get("ignore_index", -100))
