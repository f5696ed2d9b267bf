"""Shared helper for the distill_loss tests: run a backend and the float64 oracle on the same inputs."""
from __future__ import annotations

import os

import torch

import fastdistill
from fastdistill.reference import distill_loss_ref
from fastdistill.testing import assert_close_to_oracle, loss_abs_floor, reduced_reference

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "mse")


def _grad(loss, x, upstream):
    (g,) = torch.autograd.grad(loss, x, upstream)
    return g


def tvd_mask(student, teacher, temperature):
    """TVD's gradient jumps where p == q: compare only elements clearly away from a tie."""
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student.double() / temperature, -1)
    return (p - q).abs() > 1e-4 * (p + q)


def check_against_oracle(backend, student, teacher, labels=None, *, seed=0, **options):
    """distill_loss(backend) vs the float64 reference: loss, and gradient under a random upstream grad."""
    reduction = options.get("reduction", "batchmean")
    s = student.detach().requires_grad_(True)
    out = fastdistill.distill_loss(s, teacher, labels=labels, backend=backend, **options)
    assert out.dtype == torch.float32

    g = torch.Generator().manual_seed(seed + 7)
    upstream = (torch.rand(out.shape, generator=g, dtype=torch.float64) + 0.5).to(out.device)
    if reduction == "batchmean":
        upstream = torch.ones_like(upstream)
    s64 = student.detach().double().requires_grad_(True)
    oracle = distill_loss_ref(s64, teacher.double(), labels, **options)
    grad = _grad(out, s, upstream.float())
    grad64 = _grad(oracle, s64, upstream)
    s_low = student.detach().requires_grad_(True)
    ref = distill_loss_ref(s_low, teacher, labels, **options)
    ref_grad = _grad(ref, s_low, upstream.float())

    tag = f"{backend} {options} dtype={student.dtype}/{teacher.dtype} seed={seed}"
    if reduction != "none":
        rows = {**options, "reduction": "none"}
        ref = reduced_reference(distill_loss_ref(student, teacher, labels, **rows),
                                distill_loss_ref(student.double(), teacher.double(), labels, **rows), oracle,
                                labels=labels, reduction=reduction, num_items=options.get("num_items"),
                                ignore_index=options.get("ignore_index", -100), abs_floor=loss_abs_floor(options))
    assert_close_to_oracle(out, oracle, ref, abs_floor=loss_abs_floor(options), msg=f"loss {tag}")
    assert grad.dtype == student.dtype and grad.shape == student.shape
    mask = tvd_mask(student, teacher, options.get("temperature", 1.0)) if options.get("divergence") == "tvd" else None
    roundings = 1 if reduction == "batchmean" or student.dtype == torch.float32 else 2
    if backend == "triton" and student.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        roundings += 1  # the interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest even)
    assert_close_to_oracle(grad, grad64, ref_grad, mask=mask, roundings=roundings, msg=f"grad {tag}")
    if labels is not None and reduction == "none":
        ignored = labels == options.get("ignore_index", -100)
        assert torch.all(out[ignored] == 0)
    if labels is not None:
        ignored = labels == options.get("ignore_index", -100)
        assert torch.all(grad[ignored] == 0)
    return out, grad
