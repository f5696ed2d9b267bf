"""fused_linear_distill_loss with both output heads sharded along the vocabulary (ColwiseParallel lm_head).

Each rank holds rows [start, start + V_r) of the student's and the teacher's head weight (and bias) and the whole
hidden states. Per chunk of tokens: local GEMMs -> this rank's [chunk, V_r] logits in float32 (float64 for
float64 inputs), logit_scale / softcap, then the per-row all-reduces of vocab_parallel_stats.dense_chunk give
the row losses and d(loss)/d(local logits); that gradient goes back through softcap into
  d(weight), d(bias): local (this rank's rows of the head; no communication), and
  d(hidden) = sum over ranks of grad_logits_r @ W_r: accumulated over the chunks and all-reduced once, [N, H]
  (the all-reduce a ColwiseParallel head's backward runs for its replicated input anyway).
Reductions "batchmean"/"sum": gradients are computed in the forward pass and scaled in backward. Reduction
"none": backward runs the chunk loop again with the upstream row gradients as row weights (the weight gradient
mixes rows), with the same collectives as forward.
"""
from __future__ import annotations

import torch

from fastdistill.distributed.vocab_parallel_loss import check_backend, loss_options, row_scale64
from fastdistill.distributed.vocab_parallel_shards import VocabShards, localize
from fastdistill.distributed.vocab_parallel_stats import LossOptions, dense_chunk
from fastdistill.ops.common import check_float, row_labels
from fastdistill.ops.fused_linear_chunks import _chain_, _Head, _transform_, auto_chunk_size
from fastdistill.ops.loss_common import check_label_values, check_loss_options


def run_vocab_chunks(tensors, shards: VocabShards, opt: LossOptions, heads, chunk: int, row_weights, need):
    """(rows times scale [N], d(hidden) [N, H] all-reduced, d(weight) local, d(bias) local); None where not
    in `need` (hidden, weight, bias)."""
    sh, sw, sb, th, tw, tb, labels, scale = tensors
    logit_scale, softcap, teacher_logit_scale, teacher_softcap = heads
    student, teacher = _Head(sw, sb), _Head(tw, tb)
    n, dtype = sh.shape[0], student.dtype
    acc = dict(dtype=dtype, device=sw.device)
    rows = torch.zeros(n, **acc)
    grad_hidden = torch.zeros(sh.shape, **acc) if need[0] else None  # float32: summed over ranks before rounding
    grad_weight = torch.zeros(sw.shape, **acc) if need[1] else None
    grad_bias = torch.zeros(sw.shape[:1], **acc) if need[2] else None
    want = any(need)
    for i in range(0, n, chunk):
        h = sh[i:i + chunk]
        part_labels = None if labels is None else labels[i:i + chunk]
        ignored = None if part_labels is None else (part_labels == opt.ignore_index).unsqueeze(-1)
        if ignored is not None:  # ignored rows may hold anything (NaN padding): 0 · NaN would leak into grads
            h = h.masked_fill(ignored, 0)
        s = _transform_(student.logits(h), logit_scale, softcap)
        with torch.no_grad():
            t = _transform_(teacher.logits(th[i:i + chunk]), teacher_logit_scale, teacher_softcap)
        r, g = dense_chunk(s, t, part_labels, scale, shards, opt, want)
        rows[i:i + chunk] = r
        if not want:
            continue
        if row_weights is not None:
            g = g * row_weights[i:i + chunk].to(g.dtype).unsqueeze(-1)
        _chain_(g, s, logit_scale, softcap)
        if grad_hidden is not None:
            w = sw if student.mixed else student.w
            gh = torch.mm(g.to(w.dtype), w, out_dtype=dtype) if student.mixed else g @ w
            # exact zeros on ignored rows, also when the weight holds NaN (0 · NaN)
            grad_hidden[i:i + chunk] = gh if ignored is None else gh.masked_fill(ignored, 0)
        if grad_weight is not None:
            student.accumulate_grad_weight(grad_weight, g, h)
        if grad_bias is not None:
            grad_bias.add_(g.sum(0))
    if grad_hidden is not None:
        grad_hidden = shards.all_reduce_(grad_hidden).to(sh.dtype)
    if grad_weight is not None:
        grad_weight = grad_weight.to(sw.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(sb.dtype)
    return rows, grad_hidden, grad_weight, grad_bias


class _FusedVocabParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, run, reduce: bool):
        need = tuple(ctx.needs_input_grad[:3])
        ctx.reduce, ctx.need = reduce, need
        if reduce:
            rows, *grads = run(None, need)
            ctx.save_for_backward(*grads)
            return rows.sum()
        ctx.run = run  # backward recomputes with row weights
        return run(None, (False, False, False))[0]

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduce:
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        else:
            grads = list(ctx.run(grad_loss, ctx.need)[1:])
        return (*grads, None, None)


def vocab_parallel_fused_linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, *,
                                             student_bias=None, teacher_bias=None, labels=None, chunk_size=None,
                                             logit_scale: float = 1.0, softcap=None, teacher_logit_scale=None,
                                             teacher_softcap=None, divergence: str = "kl", temperature: float = 1.0,
                                             beta: float = 0.5, skew: float = 0.1, soft_weight: float = 1.0,
                                             hard_weight: float = 0.0, scale_t2: bool = True, ignore_index: int = -100,
                                             reduction: str = "batchmean", num_items=None, backend: str = "auto",
                                             group=None) -> torch.Tensor:
    """fastdistill.fused_linear_distill_loss with the heads split along the vocabulary: weights (and biases)
    DTensors placed Shard(0) on a 1-D mesh, or this rank's (V_r, H) rows with group=; the hidden states and
    labels whole on every rank (plain tensors or replicated DTensors). Both heads must split one vocabulary
    alike. The loss is the same on every rank; d(hidden) is the full gradient (summed over the vocabulary
    slices), d(weight) and d(bias) this rank's rows."""
    from fastdistill.ops.fused_linear_distill_loss import _check_inputs, check_fused_options

    check_backend(backend)
    for name, t in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        check_float(name, t)
    shards, (sw, tw, sb, tb), (sh, th, labels) = localize(
        [("student_weight", student_weight, 0), ("teacher_weight", teacher_weight, 0),
         ("student_bias", student_bias, 0), ("teacher_bias", teacher_bias, 0)],
        [("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden), ("labels", labels)], group)
    _check_inputs(sh, sw, sb, th, tw, tb, labels)
    check_fused_options(chunk_size, logit_scale, softcap, teacher_logit_scale, teacher_softcap)
    check_loss_options(divergence, temperature, beta, skew, soft_weight, hard_weight, reduction, num_items, labels,
                       ignore_index)
    check_label_values(labels, shards.vocab, int(ignore_index))
    lead = sh.shape[:-1]
    hidden = sh.reshape(-1, sh.shape[-1])
    rows_labels = row_labels(labels)
    n = hidden.shape[0]
    scale = row_scale64(reduction, num_items, rows_labels, n, ignore_index, hidden.device)
    opt = loss_options(divergence, beta, skew, temperature, soft_weight, hard_weight, scale_t2, ignore_index)
    heads = (float(logit_scale), float(softcap or 0.0),
             float(logit_scale if teacher_logit_scale is None else teacher_logit_scale),
             float((softcap if teacher_softcap is None else teacher_softcap) or 0.0))
    # chunk_size=None: the single-process op's memory budget, for ~3x its live [chunk, V] buffers (plain PyTorch
    # keeps about a dozen float32 temporaries where the fused kernels keep four)
    chunk = int(chunk_size) if chunk_size is not None else auto_chunk_size(n, 3 * shards.widest, hidden.device)
    teacher = (th.reshape(-1, th.shape[-1]).detach(), tw.detach(), None if tb is None else tb.detach())
    if not torch.is_grad_enabled():
        hidden, sw, sb = hidden.detach(), sw.detach(), None if sb is None else sb.detach()
    detached = (hidden.detach(), sw.detach(), None if sb is None else sb.detach())

    def run(row_weights, need):
        tensors = (*detached, *teacher, rows_labels, scale)
        return run_vocab_chunks(tensors, shards, opt, heads, chunk, row_weights, need)

    loss = _FusedVocabParallel.apply(hidden, sw, sb, run, reduction != "none")
    return loss if reduction != "none" else loss.view(lead)
