"""topk_distill_loss with the student's logits sharded along the vocabulary.

The teacher's top-k log-probabilities and their global ids are per-row data every rank holds whole. Per chunk of
rows, every statistic the loss reads is a sum over the vocabulary of a function of this rank's student slice:
  the student's logits at the k ids (each id lives on one rank, the others add 0), and, when the loss reads the
  whole row (tail="bucket" or a hard-label term): sum exp(s - max s) over the vocabulary, over the "rest" (ids
  outside the top k, shifted by the rest's own max, so that a tiny rest does not underflow), sum exp(z - max z)
  for the hard-label term at T != 1, and the label's logit.
One MAX all-reduce [rows, 2] (only when the whole row is read) and one SUM all-reduce [rows, k + <= 5] carry
them. The loss is then a function of these replicated statistics, computed identically on every rank with the
reference's category formulas; its gradient w.r.t. the statistics (autograd, [rows, k + ...], replicated) pulls
back through the local sums to this rank's [rows, V_r] gradient with no further communication (the maxima are
shifts: constants for the gradient).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastdistill.distributed.vocab_parallel_loss import (ShardedRows, check_backend, loss_options, out_dtype,
                                                         row_scale64)
from fastdistill.distributed.vocab_parallel_shards import VocabShards, chunk_rows, local_rows, localize
from fastdistill.distributed.vocab_parallel_stats import (LossOptions, finish_rows, label_slot, poisoned_local,
                                                          row_max, take)
from fastdistill.ops.common import check_float, row_labels
from fastdistill.ops.loss_common import check_label_values, check_loss_options
from fastdistill.ops.topk_distill_loss import check_topk_tensors
from fastdistill.reference.distill_loss import divergence_from_logs, poisoned_rows
from fastdistill.reference.topk_distill_loss import TAILS


def _rest_mask(own: torch.Tensor, local_ids: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, V_r] True where this slice's id is not among the row's top-k (a spare column takes the ids
    that live on other ranks, so no scatter writes one index twice with different values)."""
    idx = torch.where(own, local_ids, width)
    rest = torch.ones(own.shape[0], width + 1, dtype=torch.bool, device=own.device)
    return rest.scatter_(-1, idx, False)[:, :width]


def _category_rows(stats, lp, m_z, m_rest, k: int, V: int, tail: str, opt: LossOptions):
    """Row losses (no NaN rule, no masks) from the all-reduced statistics, as the reference defines them."""
    T = opt.temperature
    s_ids = stats[:, :k] / T
    col = k
    if tail == "renormalize":
        log_p, log_q = F.log_softmax(lp, -1), F.log_softmax(s_ids, -1)
    else:
        lse = m_z / T + stats[:, col:col + 1].log()
        log_p, log_q = lp, s_ids - lse
        if k < V:
            rest = stats[:, col + 1:col + 2]
            live = rest > 0
            log_rest = m_rest / T + torch.where(live, rest, torch.ones_like(rest)).log() - lse
            log_q_rest = torch.where(live, log_rest, torch.full_like(log_rest, -math.inf))
            # p_rest is clamped: fp16-rounded log-probs can sum to slightly more than 1 (as the reference).
            p_rest = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp(min=0.0)
            log_p_rest = torch.where(p_rest > 0, p_rest.clamp(min=torch.finfo(p_rest.dtype).tiny).log(),
                                     torch.full_like(p_rest, -math.inf))
            log_p, log_q = torch.cat([lp, log_p_rest], -1), torch.cat([log_q, log_q_rest], -1)
    coef = opt.soft_weight * (T * T if opt.scale_t2 else 1.0)
    rows = coef * divergence_from_logs(log_p, log_q, opt.divergence, opt.weight, opt.weight)
    if opt.hard_weight != 0.0:
        sum_exp = stats[:, -2] if T != 1.0 else stats[:, k]
        rows = rows + opt.hard_weight * (m_z.squeeze(-1) + sum_exp.log() - stats[:, -1])
    return rows


def topk_chunk(z, lp, ids, labels, scale, shards: VocabShards, opt: LossOptions, tail: str, want_grad: bool):
    """(row losses times scale, d(sum)/dz of this rank's [rows, V_r] slice or None), in the compute dtype."""
    dtype = torch.float64 if torch.float64 in (z.dtype, lp.dtype) else torch.float32
    z, lp, ids = z.detach().to(dtype), lp.detach().to(dtype), ids.long()
    k, V, T = ids.shape[-1], shards.vocab, opt.temperature
    hard = opt.hard_weight != 0.0
    valid = None
    if labels is not None:  # ignored rows may hold anything (padding ids, -inf logits): harmless values
        valid = labels != opt.ignore_index
        keep = valid.unsqueeze(-1)
        z = torch.where(keep, z, torch.zeros((), dtype=dtype))
        lp = torch.where(keep, lp, torch.full((), -math.log(k), dtype=dtype))
        ids = torch.where(keep, ids, torch.arange(k, device=ids.device))
    in_range = (ids >= 0) & (ids < V)
    ids = torch.where(in_range, ids, torch.zeros_like(ids))
    local_ids = ids - shards.start
    own = (local_ids >= 0) & (local_ids < shards.local)
    whole = tail == "bucket" or hard  # the loss reads the whole row
    with_rest = tail == "bucket" and k < V
    m_z = m_rest = None
    if whole:
        rest = _rest_mask(own, local_ids, z.shape[-1])
        masked = torch.where(rest, z, torch.full((), -math.inf, dtype=dtype))
        maxima = shards.all_reduce_(torch.stack([row_max(z), row_max(masked)], -1), dist.ReduceOp.MAX)
        m_z = maxima[:, 0:1]
        m_rest = torch.where(maxima[:, 1:2] > -math.inf, maxima[:, 1:2], torch.zeros_like(m_z))  # no -inf - -inf
    with torch.enable_grad():
        zl = z.detach().requires_grad_(want_grad)
        cols = [take(zl, local_ids, own)]
        if whole:
            cols.append(((zl - m_z) / T).exp().sum(-1, keepdim=True))
        if with_rest:
            e = torch.where(rest, ((zl - m_rest) / T).exp(), torch.zeros((), dtype=dtype))
            cols.append(e.sum(-1, keepdim=True))
        if hard and T != 1.0:
            cols.append((zl - m_z).exp().sum(-1, keepdim=True))
        if hard:
            cols.append(take(zl, *label_slot(labels, valid, shards)))
        local = torch.cat(cols, -1)
    flags = poisoned_local(z) if whole else torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    stats = shards.all_reduce_(torch.cat([local.detach(), flags.to(dtype).unsqueeze(-1)], -1))
    bad = (stats[:, -1] > 0) | ~in_range.all(-1) | poisoned_rows(lp) | poisoned_rows(stats[:, :k])
    with torch.enable_grad():
        leaf = stats[:, :-1].detach().requires_grad_(want_grad)
        rows = _category_rows(leaf, lp, m_z, m_rest, k, V, tail, opt)
        grad = None
        if want_grad:
            (g_stats,) = torch.autograd.grad(rows.sum(), leaf)
            (grad,) = torch.autograd.grad(local, zl, g_stats, allow_unused=True)  # unused: an empty slice
            grad = torch.zeros_like(z) if grad is None else grad
    return finish_rows(rows.detach(), grad, bad, valid, scale)


def vocab_parallel_topk_distill_loss(student_logits, teacher_topk_logprobs, teacher_topk_indices, *,
                                     tail: str = "renormalize", labels=None, divergence: str = "kl",
                                     temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                                     soft_weight: float = 1.0, hard_weight: float = 0.0, scale_t2: bool = True,
                                     ignore_index: int = -100, reduction: str = "batchmean", num_items=None,
                                     validate: bool = False, backend: str = "auto", group=None) -> torch.Tensor:
    """fastdistill.topk_distill_loss with student_logits split along the vocabulary (a DTensor placed Shard(-1),
    or this rank's slice with group=). The top-k log-probabilities, their global ids and labels are whole on
    every rank (plain tensors or replicated DTensors) and the same everywhere. Ids outside [0, V) give that row a
    NaN loss and gradient (validate=True raises instead, as on one process)."""
    from fastdistill.ops.topk_distill_loss import _validate_indices

    check_backend(backend)
    if divergence == "mse":
        raise ValueError("divergence: 'mse' compares raw logits, which top-k log-probabilities do not give; "
                         "use kl, reverse_kl, jsd, tvd, skew_kl or skew_reverse_kl")
    if tail not in TAILS:
        raise ValueError(f"tail: unknown {tail!r}; expected one of {TAILS}")
    check_float("student_logits", student_logits)
    shards, (student,), (logprobs, indices, labels) = localize(
        [("student_logits", student_logits, -1)],
        [("teacher_topk_logprobs", teacher_topk_logprobs), ("teacher_topk_indices", teacher_topk_indices),
         ("labels", labels)], group)
    V = shards.vocab
    check_topk_tensors(student, logprobs, indices, labels, vocab=V)  # this rank's slice, the whole V
    check_loss_options(divergence, temperature, beta, skew, soft_weight, hard_weight, reduction, num_items, labels,
                       ignore_index)
    check_label_values(labels, V, int(ignore_index))
    if validate:
        _validate_indices(indices, V, labels, ignore_index)
    lead = student.shape[:-1]
    n_rows = math.prod(lead)
    rows_labels = row_labels(labels)
    scale = row_scale64(reduction, num_items, rows_labels, n_rows, ignore_index, student.device)
    opt = loss_options(divergence, beta, skew, temperature, soft_weight, hard_weight, scale_t2, ignore_index)
    if not torch.is_grad_enabled():
        student = student.detach()
    student_rows = local_rows(student)
    detached, lp_rows, id_rows = student_rows.detach(), local_rows(logprobs.detach()), local_rows(indices)

    def chunk_loss(part, want_grad):
        part_labels = None if rows_labels is None else rows_labels[part]
        return topk_chunk(detached[part], lp_rows[part], id_rows[part], part_labels, scale, shards, opt, tail,
                          want_grad)

    rows = ShardedRows.apply(student_rows, chunk_loss, chunk_rows(shards, n_rows), out_dtype(student, logprobs))
    return rows.view(lead) if reduction == "none" else rows.sum()
