"""fused_linear_distill_loss on every backend vs the unfused float64 oracle: loss and the gradients of
the student's hidden states, weight and bias."""
from __future__ import annotations

import os

import pytest
import torch

import fastdistill
from fastdistill.reference import fused_linear_distill_loss_ref
from fastdistill.testing import assert_close_to_oracle, make_labels, reduced_reference

from conftest import backend_device

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "mse")
BACKENDS = ["reference", "cpu", "triton"] + (["cuda"] if torch.cuda.is_available() else [])


def make_problem(seed, *, n=19, h_s=12, h_t=20, v_s=131, v_t=127, dtype=torch.float32, bias=True, device="cpu"):
    """Student/teacher hidden states and heads. Scales keep logits O(3) so every divergence is exercised."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    return dict(student_hidden=rand(n, h_s), student_weight=rand(v_s, h_s, scale=h_s ** -0.5 * 3),
                teacher_hidden=rand(n, h_t), teacher_weight=rand(v_t, h_t, scale=h_t ** -0.5 * 3),
                student_bias=rand(v_s) if bias else None, teacher_bias=rand(v_t) if bias else None)


def check(backend, problem, labels=None, *, seed=0, grads=("student_hidden", "student_weight", "student_bias"),
          **options):
    """Loss and gradients of `backend` vs the float64 oracle, judged by the unfused eager computation in the
    inputs' dtype (what a user writes without fastdistill)."""
    reduction = options.get("reduction", "batchmean")
    grads = [k for k in grads if problem.get(k) is not None]
    inputs = {k: (v.detach().requires_grad_(k in grads) if v is not None else None) for k, v in problem.items()}
    out = fastdistill.fused_linear_distill_loss(**inputs, labels=labels, backend=backend, **options)
    assert out.dtype == torch.float32
    g = torch.Generator().manual_seed(seed + 3)
    upstream = torch.ones(out.shape, dtype=torch.float64) if reduction == "batchmean" else (
        torch.rand(out.shape, generator=g, dtype=torch.float64) + 0.5)
    upstream = upstream.to(out.device)
    actual = torch.autograd.grad(out, [inputs[k] for k in grads], upstream.float()) if grads else ()

    ref_options = {k: v for k, v in options.items() if k != "chunk_size"}
    x64 = {k: (v.detach().double().requires_grad_(k in grads) if v is not None else None) for k, v in problem.items()}
    oracle = fused_linear_distill_loss_ref(**x64, labels=labels, **ref_options)
    oracle_grads = torch.autograd.grad(oracle, [x64[k] for k in grads], upstream) if grads else ()
    low = {k: (v.detach().requires_grad_(k in grads) if v is not None else None) for k, v in problem.items()}
    dtype = problem["student_hidden"].dtype
    ref = fused_linear_distill_loss_ref(**low, labels=labels, dtype=dtype, **ref_options)
    ref_grads = torch.autograd.grad(ref, [low[k] for k in grads], upstream.to(ref.dtype)) if grads else ()

    tag = f"{backend} {options} {dtype} seed={seed}"
    judge = ref.float()
    if reduction != "none":
        rows = {**ref_options, "reduction": "none"}
        judge = reduced_reference(
            fused_linear_distill_loss_ref(**problem, labels=labels, dtype=dtype, **rows).float(),
            fused_linear_distill_loss_ref(**{k: v.double() if v is not None else None for k, v in problem.items()},
                                          labels=labels, **rows),
            oracle, labels=labels, reduction=reduction, num_items=options.get("num_items"))
    assert_close_to_oracle(out, oracle, judge, msg=f"loss {tag}")
    roundings = 1 if reduction == "batchmean" or dtype == torch.float32 else 2
    if backend == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        roundings += 1  # the interpreter truncates fp32 -> bf16 casts
    for name, a, o, r in zip(grads, actual, oracle_grads, ref_grads):
        assert a.dtype == problem[name].dtype and a.shape == problem[name].shape, name
        assert_close_to_oracle(a, o, r, roundings=roundings, msg=f"d/d{name} {tag}")
    return out, actual


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergences_with_labels(backend, divergence, seed):
    """V_s != V_t, H_s != H_t, chunks that do not divide the 19 tokens, ignored rows, hard labels.
    The padded vocabulary has probability 0 on one side: V_s > V_t keeps KL finite, V_s < V_t reverse
    KL; mse compares logits and needs equal vocabularies."""
    device = backend_device(backend)
    v_s = {"reverse_kl": 123, "mse": 127}.get(divergence, 131)
    problem = make_problem(seed, v_s=v_s, device=device)
    labels = make_labels((19,), 123, seed=seed, device=device)
    options = dict(divergence=divergence, temperature=2.0 if divergence != "mse" else 1.0, hard_weight=0.3,
                   chunk_size=7)
    if divergence == "tvd":  # TVD's gradient jumps at p == q; hard labels keep the comparison smooth
        options["temperature"] = 1.0
    check(backend, problem, labels, seed=seed, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_reductions_and_transforms(backend, reduction, seed):
    """logit_scale and softcap (Gemma) on both models; per-row upstream gradients for "none"."""
    device = backend_device(backend)
    problem = make_problem(seed, n=23, v_s=97, v_t=97, device=device)
    check(backend, problem, seed=seed, divergence="jsd", beta=0.3, reduction=reduction, logit_scale=1.7,
          softcap=4.0, chunk_size=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [dict(softcap=4.0, teacher_softcap=0.0),
                                   dict(teacher_logit_scale=0.6, teacher_softcap=3.0),
                                   dict(logit_scale=1.3, softcap=5.0, teacher_logit_scale=2.0)])
def test_per_model_transforms(backend, heads, seed):
    """Teacher and student heads with different logit_scale / softcap (a Gemma-2 teacher, a Llama student)."""
    device = backend_device(backend)
    problem = make_problem(seed, n=17, v_s=97, v_t=97, device=device)
    check(backend, problem, seed=seed, divergence="kl", temperature=1.5, chunk_size=6, **heads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype, seed):
    device = backend_device(backend)
    problem = make_problem(seed, dtype=dtype, device=device)
    labels = make_labels((19,), 127, seed=seed, device=device)
    check(backend, problem, labels, seed=seed, divergence="kl", temperature=1.5, hard_weight=0.5, chunk_size=8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", ["weight", "hidden", "bias_only", "no_bias"])
def test_frozen_subsets(backend, frozen, seed):
    """requires_grad on any subset: frozen lm_head, frozen trunk, only the bias, no bias at all."""
    device = backend_device(backend)
    problem = make_problem(seed, v_s=127, bias=frozen != "no_bias", device=device)
    grads = {"weight": ("student_hidden", "student_bias"), "hidden": ("student_weight",),
             "bias_only": ("student_bias",), "no_bias": ("student_hidden", "student_weight")}[frozen]
    check(backend, problem, seed=seed, grads=grads, divergence="reverse_kl", chunk_size=6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_vocab_larger_and_auto_chunk(backend, seed):
    """V_s > V_t: the teacher is padded with -inf (p = 0), so the student's extra ids are pushed down."""
    device = backend_device(backend)
    problem = make_problem(seed, n=9, v_s=140, v_t=101, device=device)
    check(backend, problem, seed=seed, divergence="skew_kl", skew=0.2)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_deterministic_and_chunk_invariant(backend, seed):
    """Bitwise equal run to run; the chunk size changes only the rounding of the weight-gradient sum."""
    device = backend_device(backend)
    problem = make_problem(seed, device=device)

    def run(chunk):
        inputs = {k: (v.detach().requires_grad_(k.startswith("student")) if v is not None else None)
                  for k, v in problem.items()}
        out = fastdistill.fused_linear_distill_loss(**inputs, divergence="jsd", chunk_size=chunk, backend=backend)
        out.backward()
        return [out] + [inputs[k].grad for k in ("student_hidden", "student_weight", "student_bias")]
    first, second, other = run(4), run(4), run(19)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for a, b in zip(first, other):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_matches_distill_loss_on_materialized_logits(backend, seed):
    """Same kernel, same float32 logits: the fused loss equals distill_loss on h @ Wᵀ + b."""
    device = backend_device(backend)
    p = make_problem(seed, v_s=101, v_t=101, device=device)
    s = torch.addmm(p["student_bias"], p["student_hidden"], p["student_weight"].t())
    t = torch.addmm(p["teacher_bias"], p["teacher_hidden"], p["teacher_weight"].t())
    expected = fastdistill.distill_loss(s, t, divergence="tvd", temperature=0.7, backend=backend)
    actual = fastdistill.fused_linear_distill_loss(**p, divergence="tvd", temperature=0.7, chunk_size=19,
                                                   backend=backend)
    torch.testing.assert_close(actual, expected, rtol=2e-6, atol=0)


def test_module_matches_function(seed):
    p = make_problem(seed)
    labels = make_labels((19,), 127, seed=seed)
    module = fastdistill.FusedLinearDistillLoss(divergence="jsd", hard_weight=0.2, chunk_size=5, backend="cpu")
    expected = fastdistill.fused_linear_distill_loss(**p, labels=labels, divergence="jsd", hard_weight=0.2,
                                                     chunk_size=5, backend="cpu")
    actual = module(p["student_hidden"], p["student_weight"], p["teacher_hidden"], p["teacher_weight"], labels,
                    student_bias=p["student_bias"], teacher_bias=p["teacher_bias"])
    assert torch.equal(actual, expected)
    assert "chunk_size=5" in repr(module)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_leading_dims_empty_and_all_ignored(backend):
    p = make_problem(0, n=12)
    batched = {k: (v.view(3, 4, -1) if k.endswith("hidden") else v) for k, v in p.items()}
    labels = make_labels((3, 4), 127, seed=0)
    flat = fastdistill.fused_linear_distill_loss(**p, labels=labels.view(-1), reduction="none", backend=backend)
    rows = fastdistill.fused_linear_distill_loss(**batched, labels=labels, reduction="none", backend=backend)
    assert rows.shape == (3, 4) and torch.equal(rows.view(-1), flat)
    empty = {k: (v[:0].requires_grad_() if k.endswith("hidden") else v) for k, v in p.items()}
    out = fastdistill.fused_linear_distill_loss(**empty, backend=backend)
    assert out.item() == 0.0
    ignored = torch.full((12,), -100)
    hidden = p["student_hidden"].clone().requires_grad_()
    out = fastdistill.fused_linear_distill_loss(**{**p, "student_hidden": hidden}, labels=ignored, hard_weight=1.0,
                                                backend=backend)
    out.backward()
    assert out.item() == 0.0 and torch.all(hidden.grad == 0)
