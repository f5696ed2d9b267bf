"""fused_linear_topk_distill_loss on every backend vs topk_distill_loss on materialized float64 logits: loss
and the gradients of the hidden states, weight and bias."""
from __future__ import annotations

import pytest
import torch

from conftest import KERNEL_BACKENDS, backend_device
from fastdistill.ops.fused_linear_topk_distill_loss import fused_linear_topk_distill_loss
from fastdistill.ops.topk_distill_loss import topk_distill_loss
from fastdistill.testing import make_labels
from fused_targets_cases import HEAD, check, make_problem
from topk_cases import DIVERGENCES, TAILS

BACKENDS = ["reference"] + KERNEL_BACKENDS


def slow_triton(backends):
    return [pytest.param(b, marks=[pytest.mark.slow] if b == "triton" and not torch.cuda.is_available() else [])
            for b in backends]


def cases(values, fast_triton=(), fast_reference=None):
    """(backend, value) pairs; triton (interpreted on CPU, seconds per call) only for `fast_triton` values in
    the default run, the reference only for `fast_reference` ones (None: all); the rest marked slow."""
    def slow(b, v):
        if b == "triton":
            return not torch.cuda.is_available() and v not in fast_triton
        return b == "reference" and fast_reference is not None and v not in fast_reference
    return [pytest.param(b, v, marks=[pytest.mark.slow] if slow(b, v) else []) for b in BACKENDS for v in values]


@pytest.mark.parametrize("backend,divergence", cases(DIVERGENCES, fast_triton=("jsd",),
                                                          fast_reference=("jsd",)))
def test_divergences_and_tails(backend, divergence, seed):
    """Both tails, 7-row chunks over 19 tokens, ignored rows, hard labels and T = 2."""
    device = backend_device(backend)
    p, lp, ids = make_problem(seed, temperature=2.0, device=device)
    labels = make_labels((19,), 131, seed=seed, device=device)
    for tail in TAILS:
        check("topk", backend, p, lp, ids, labels, seed=seed, tail=tail, divergence=divergence, temperature=2.0,
              hard_weight=0.3, chunk_size=7)


@pytest.mark.parametrize("backend,reduction", cases(["batchmean", "sum", "none", "num_items"], fast_triton=("none",)))
def test_reductions_and_transforms(backend, reduction, seed):
    """Odd V (1271), logit_scale and softcap, per-row upstream gradients for "none", num_items."""
    device = backend_device(backend)
    p, lp, ids = make_problem(seed, n=11, v=1271, k=16, device=device)
    options = dict(reduction=reduction) if reduction != "num_items" else dict(num_items=7.5)
    check("topk", backend, p, lp, ids, seed=seed, tail="bucket", divergence="jsd", beta=0.3, logit_scale=1.7,
          softcap=4.0, chunk_size=4, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_hidden_on_ignored_rows_and_bf16(backend, seed):
    """Ignored rows may hold NaN hidden states and padding ids (-1): they give exact zeros; bf16 heads."""
    device = backend_device(backend)
    p, lp, ids = make_problem(seed, n=13, dtype=torch.bfloat16, device=device)
    labels = make_labels((13,), 131, seed=seed, device=device)
    labels[2] = -100
    ignored = labels == -100
    p["student_hidden"][ignored] = float("nan")
    ids = ids.masked_fill(ignored.unsqueeze(-1), -1)
    out, (gh, gw, gb) = check("topk", backend, p, lp, ids, labels, seed=seed, divergence="kl", temperature=1.5,
                              hard_weight=0.5, chunk_size=5, reduction="none")
    assert torch.all(out[ignored] == 0) and torch.all(gh[ignored] == 0)
    assert torch.isfinite(gw).all() and torch.isfinite(gb).all()


@pytest.mark.parametrize("backend,frozen", cases(["weight", "hidden", "no_bias"]))
def test_frozen_subsets(backend, frozen, seed):
    device = backend_device(backend)
    p, lp, ids = make_problem(seed, n=9, v=67, k=5, bias=frozen != "no_bias", device=device)
    grads = {"weight": ("student_hidden", "student_bias"), "hidden": ("student_weight",),
             "no_bias": ("student_hidden", "student_weight")}[frozen]
    check("topk", backend, p, lp, ids, seed=seed, grads=grads, divergence="reverse_kl", chunk_size=4)


@pytest.mark.parametrize("backend", slow_triton(KERNEL_BACKENDS))
def test_matches_topk_distill_loss_on_materialized_logits(backend, seed):
    """Same kernel, same float32 logits: the fused loss equals topk_distill_loss on h @ Wᵀ + b, loss and
    gradient of the hidden states (d logits · W)."""
    device = backend_device(backend)
    p, lp, ids = make_problem(seed, device=device)
    for tail in TAILS:
        h = p["student_hidden"].clone().requires_grad_(True)
        s = torch.addmm(p["student_bias"], h, p["student_weight"].t())
        expected = topk_distill_loss(s, lp, ids, tail=tail, divergence="tvd", temperature=0.7, backend=backend)
        (expected_grad,) = torch.autograd.grad(expected, h)
        h2 = p["student_hidden"].clone().requires_grad_(True)
        actual = fused_linear_topk_distill_loss(h2, p["student_weight"], lp, ids, student_bias=p["student_bias"],
                                                tail=tail, divergence="tvd", temperature=0.7, chunk_size=19,
                                                backend=backend)
        (actual_grad,) = torch.autograd.grad(actual, h2)
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=0)
        torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", slow_triton(KERNEL_BACKENDS) + ["reference"])
def test_deterministic_and_chunk_invariant(backend, seed):
    """Bitwise equal run to run; the chunk size changes only the rounding of the weight-gradient sum."""
    device = backend_device(backend)
    p, lp, ids = make_problem(seed, device=device)

    def run(chunk):
        x = {k: p[k].detach().clone().requires_grad_(True) for k in HEAD}
        out = fused_linear_topk_distill_loss(x["student_hidden"], x["student_weight"], lp, ids,
                                             student_bias=x["student_bias"], tail="bucket", divergence="jsd",
                                             chunk_size=chunk, backend=backend)
        out.backward()
        return [out] + [x[k].grad for k in HEAD]
    first, second, other = run(4), run(4), run(19)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for a, b in zip(first, other):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
