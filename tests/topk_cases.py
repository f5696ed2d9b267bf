"""Shared helpers of the topk_distill_loss tests: teacher top-k inputs and the float64 oracle check."""
from __future__ import annotations

import os

import torch

import fastdistill
from fastdistill.reference.topk_distill_loss import _category_logs, topk_distill_loss_ref
from fastdistill.testing import assert_close_to_oracle, make_logits, reduced_reference

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl")
TAILS = ("renormalize", "bucket")


def make_topk(shape, k, *, temperature=1.0, seed=0, device="cpu", dtype=torch.float32,
              index_dtype=torch.int64, kind="normal", scale=2.0):
    """A teacher's top-k log_softmax(teacher / T) (rounded to dtype, as a cache stores it) and ids,
    shuffled within each row: the kernels must not rely on any order."""
    teacher = make_logits(shape, dtype=torch.float64, seed=seed, scale=scale, kind=kind)
    lp, ids = torch.log_softmax(teacher / temperature, -1).topk(k, -1)
    g = torch.Generator().manual_seed(seed + 3)
    order = torch.rand(lp.shape, generator=g).argsort(-1)
    lp, ids = lp.gather(-1, order), ids.gather(-1, order)
    return lp.to(dtype).to(device), ids.to(index_dtype).to(device)


def _grad(loss, x, upstream):
    (g,) = torch.autograd.grad(loss, x, upstream)
    return g


def tvd_mask(student, lp, ids, tail, temperature):
    """TVD's gradient jumps where p == q in a category: compare only entries clearly away from a tie."""
    log_p, log_q = _category_logs(student.double(), lp.double(), ids.long(), tail, temperature)
    p, q = log_p.exp(), log_q.exp()
    far = (p - q).abs() > 1e-4 * (p + q)
    k = ids.shape[-1]
    mask = torch.ones(student.shape, dtype=torch.bool, device=student.device)
    if far.shape[-1] > k:  # the rest bucket: every entry outside the ids
        mask &= far[..., k:]
    return mask.scatter(-1, ids.long(), far[..., :k])


def check_topk_against_oracle(backend, student, lp, ids, labels=None, *, seed=0, **options):
    """topk_distill_loss(backend) vs the float64 reference: loss, and gradient under a random upstream grad."""
    reduction = options.get("reduction", "batchmean")
    s = student.detach().requires_grad_(True)
    out = fastdistill.topk_distill_loss(s, lp, ids, labels=labels, backend=backend, **options)
    assert out.dtype == torch.float32

    g = torch.Generator().manual_seed(seed + 7)
    upstream = (torch.rand(out.shape, generator=g, dtype=torch.float64) + 0.5).to(out.device)
    if reduction == "batchmean":
        upstream = torch.ones_like(upstream)
    s64 = student.detach().double().requires_grad_(True)
    oracle = topk_distill_loss_ref(s64, lp.double(), ids, labels, **options)
    grad = _grad(out, s, upstream.float())
    grad64 = _grad(oracle, s64, upstream)
    s_low = student.detach().requires_grad_(True)
    ref = topk_distill_loss_ref(s_low, lp, ids, labels, **options)
    ref_grad = _grad(ref, s_low, upstream.float())

    tag = f"{backend} {options} k={ids.shape[-1]} dtype={student.dtype}/{lp.dtype} seed={seed}"
    if reduction != "none":
        rows_options = {**options, "reduction": "none"}
        ref = reduced_reference(topk_distill_loss_ref(student, lp, ids, labels, **rows_options),
                                topk_distill_loss_ref(student.double(), lp.double(), ids, labels, **rows_options),
                                oracle, labels=labels, reduction=reduction, num_items=options.get("num_items"),
                                ignore_index=options.get("ignore_index", -100))
    # Known limitation: triton's bucket tail forms log q_rest from fp32 logs of O(log V) row sums, so
    # its row losses carry a few fp32 ulps of 1 in absolute error (the cpu kernel works in double).
    loose = backend == "triton" and options.get("tail") == "bucket"
    assert_close_to_oracle(out, oracle, ref, abs_floor=1e-6 if loose else None, msg=f"loss {tag}")
    assert grad.dtype == student.dtype and grad.shape == student.shape
    mask = None
    if options.get("divergence") == "tvd":
        mask = tvd_mask(student, lp, ids, options.get("tail", "renormalize"), options.get("temperature", 1.0))
    roundings = 1 if reduction == "batchmean" or student.dtype == torch.float32 else 2
    if backend == "triton" and student.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        roundings += 1  # the interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest even)
    assert_close_to_oracle(grad, grad64, ref_grad, mask=mask, roundings=roundings, msg=f"grad {tag}")
    if labels is not None:
        ignored = labels == options.get("ignore_index", -100)
        assert torch.all(grad[ignored] == 0)
        if reduction == "none":
            assert torch.all(out[ignored] == 0)
    return out, grad
