"""fused_linear_sampled_distill_loss on every backend vs sampled_distill_loss on materialized float64 logits
(draws with duplicates): loss and the gradients of the hidden states, weight and bias; and its contracts."""
from __future__ import annotations

import pytest
import torch

from conftest import KERNEL_BACKENDS, backend_device
from fastdistill.cache.targets import TeacherTargets
from fastdistill.nn.fused_linear_topk_distill_loss import FusedLinearSampledDistillLoss
from fastdistill.ops.fused_linear_sampled_distill_loss import fused_linear_sampled_distill_loss as loss_fn
from fastdistill.ops.fused_linear_targets import OPS
from fastdistill.ops.sampled_distill_loss import sampled_distill_loss
from fastdistill.testing import make_labels
from fused_targets_cases import HEAD, check, make_problem
from test_fused_linear_topk_distill_loss import cases, slow_triton


def problem(seed, **kw):
    """k = 24 draws over V = 37 by default. Every row gets a duplicated draw: where the sampler gave none
    (possible for any V, k), the second draw repeats the first, which keeps ids sorted and the row a valid
    sample with a repeat, so the duplicate path is always exercised."""
    kw = {"v": 37, "k": 24, **kw}
    p, lp, ids = make_problem(seed, kind="sampled", **kw)
    ids, lp = ids.clone(), lp.clone()
    lone = ~(ids[:, 1:] == ids[:, :-1]).any(-1)
    ids[lone, 1], lp[lone, 1] = ids[lone, 0], lp[lone, 0]
    assert (ids[:, 1:] == ids[:, :-1]).any(-1).all()
    return p, lp, ids


@pytest.mark.parametrize("backend,reduction", cases(["batchmean", "sum", "none", "num_items"],
                                                    fast_triton=("none",)))
def test_matches_oracle(backend, reduction, seed):
    """Duplicated draws, 7-row chunks over 19 tokens, ignored rows, hard labels, T = 2, logit_scale, softcap."""
    device = backend_device(backend)
    p, lp, ids = problem(seed, temperature=2.0, device=device)
    labels = make_labels((19,), 37, seed=seed, device=device)
    options = dict(reduction=reduction) if reduction != "num_items" else dict(num_items=7.5)
    check("sampled", backend, p, lp, ids, labels, seed=seed, temperature=2.0, hard_weight=0.3, chunk_size=7,
          logit_scale=1.3, softcap=6.0, **options)


@pytest.mark.parametrize("backend", slow_triton(["reference"] + KERNEL_BACKENDS))
def test_odd_vocab_nan_padding_rows_bf16(backend, seed):
    """V = 1271, bf16 head, ignored rows holding NaN hidden states and padding ids: exact zeros there."""
    device = backend_device(backend)
    p, lp, ids = problem(seed, n=11, v=1271, k=32, dtype=torch.bfloat16, device=device)
    labels = make_labels((11,), 1271, seed=seed, device=device)
    labels[3] = -100
    ignored = labels == -100
    p["student_hidden"][ignored] = float("nan")
    ids = ids.masked_fill(ignored.unsqueeze(-1), -1)
    out, (gh, gw, gb) = check("sampled", backend, p, lp, ids, labels, seed=seed, chunk_size=4, reduction="none",
                              scale_t2=False, soft_weight=0.7)
    assert torch.all(out[ignored] == 0) and torch.all(gh[ignored] == 0) and torch.isfinite(gw).all()


@pytest.mark.parametrize("backend", slow_triton(KERNEL_BACKENDS))
def test_matches_sampled_distill_loss_on_materialized_logits(backend, seed):
    device = backend_device(backend)
    p, lp, ids = problem(seed, device=device)
    h = p["student_hidden"].clone().requires_grad_(True)
    expected = sampled_distill_loss(torch.addmm(p["student_bias"], h, p["student_weight"].t()), lp, ids,
                                    temperature=0.7, backend=backend)
    (expected_grad,) = torch.autograd.grad(expected, h)
    h2 = p["student_hidden"].clone().requires_grad_(True)
    actual = loss_fn(h2, p["student_weight"], lp, ids, student_bias=p["student_bias"], temperature=0.7,
                     chunk_size=19, backend=backend)
    (actual_grad,) = torch.autograd.grad(actual, h2)
    torch.testing.assert_close(actual, expected, rtol=2e-6, atol=0)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", slow_triton(KERNEL_BACKENDS) + ["reference"])
def test_deterministic(backend, seed):
    device = backend_device(backend)
    p, lp, ids = problem(seed, device=device)

    def run():
        x = {k: p[k].detach().clone().requires_grad_(True) for k in HEAD}
        out = loss_fn(x["student_hidden"], x["student_weight"], lp, ids, student_bias=x["student_bias"],
                      chunk_size=4, backend=backend)
        out.backward()
        return [out] + [x[k].grad for k in HEAD]
    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", slow_triton(KERNEL_BACKENDS))
@pytest.mark.parametrize("reduce", [pytest.param(True, marks=pytest.mark.slow), False])
def test_opcheck(backend, reduce, seed):
    device = backend_device(backend)
    p, lp, ids = problem(seed, n=11, device=device)
    labels = make_labels((11,), 37, seed=seed, device=device)
    scale = torch.full((1,), 0.25, device=device)
    row_weights = None if reduce else torch.rand(11, device=device)
    sh, sw, sb = (p[k].requires_grad_(True) for k in HEAD)
    args = (sh, sw, sb, lp, ids, labels, scale, row_weights, 2.0, 1.0, 0.5, True, -100, 1.3, 6.0, 4, reduce, True,
            True, True)
    torch.library.opcheck(OPS["sampled"].ops[backend], args)


@pytest.mark.parametrize("backend", slow_triton(KERNEL_BACKENDS))
def test_compile_fullgraph_matches_eager(backend, seed):
    device = backend_device(backend)
    torch._dynamo.reset()
    p, lp, ids = problem(seed, n=10, device=device)
    labels = make_labels((2, 5), 37, seed=seed, device=device)

    def step(sh, sw, sb):
        loss = loss_fn(sh.view(2, 5, -1), sw, lp.view(2, 5, -1), ids.view(2, 5, -1), student_bias=sb, labels=labels,
                       temperature=2.0, hard_weight=0.5, softcap=5.0, reduction="none", chunk_size=3,
                       backend=backend)
        return loss.sum() * 3.0

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")):
        x = [p[k].clone().requires_grad_(True) for k in HEAD]
        out = fn(*x)
        out.backward()
        results.append((out.detach(), *(t.grad for t in x)))
    for compiled, eager in zip(results[1], results[0]):
        torch.testing.assert_close(compiled, eager)


def test_teacher_targets_validate_and_bad_input(seed):
    p, lp, ids = problem(seed, temperature=2.0)
    sh, sw = p["student_hidden"], p["student_weight"]
    targets = TeacherTargets("sampled", lp, ids, temperature=2.0, vocab_size=37, estimator="counts")
    expected = loss_fn(sh, sw, lp, ids, temperature=2.0, backend="cpu")
    assert torch.equal(loss_fn(sh, sw, targets, temperature=2.0, backend="cpu"), expected)
    module = FusedLinearSampledDistillLoss(temperature=2.0, chunk_size=6, backend="cpu")
    assert torch.equal(module(sh, sw, targets), loss_fn(sh, sw, lp, ids, temperature=2.0, chunk_size=6,
                                                        backend="cpu"))
    assert "chunk_size=6" in repr(module)
    with pytest.raises(ValueError, match="teacher_sampled_logprobs: got topk teacher targets"):
        loss_fn(sh, sw, TeacherTargets("topk", lp, ids, temperature=2.0, vocab_size=37), temperature=2.0)
    with pytest.raises(ValueError, match="teacher_sampled_logprobs: the targets were built at temperature"):
        loss_fn(sh, sw, targets)
    with pytest.raises(ValueError, match="teacher_sampled_logprobs: the targets come from a teacher with vocab"):
        loss_fn(sh, sw[:36], targets, temperature=2.0)
    bad = ids.clone()
    bad[4, 0] = 37
    with pytest.raises(ValueError, match=r"teacher_sampled_indices: id 37 in row 4 is outside \[0, V = 37\)"):
        loss_fn(sh, sw, lp, bad, temperature=2.0, validate=True)
    neg = lp.clone()
    neg[5, 2] = float("-inf")
    with pytest.raises(ValueError, match="teacher_sampled_logprobs: -inf at draw 2 of row 5"):
        loss_fn(sh, sw, neg, ids, temperature=2.0, validate=True)
    rows = loss_fn(sh, sw, neg, ids, temperature=2.0, reduction="none", backend="reference")
    assert torch.isnan(rows[5]) and torch.isfinite(rows[torch.arange(19) != 5]).all()
    for kw, error, match in ((dict(teacher_sampled_logprobs=lp[:, :0], teacher_sampled_indices=ids[:, :0]),
                              ValueError, "k = 0 draws"),
                             (dict(teacher_sampled_logprobs=lp[1:]), ValueError, "teacher_sampled_logprobs: expect"),
                             (dict(teacher_sampled_indices=ids.float()), TypeError, "teacher_sampled_indices"),
                             (dict(student_bias=torch.zeros(36)), ValueError, "student_bias"),
                             (dict(softcap=0.0), ValueError, "softcap"),
                             (dict(hard_weight=1.0), ValueError, "hard_weight")):
        args = {**dict(teacher_sampled_logprobs=lp, teacher_sampled_indices=ids, temperature=2.0), **kw}
        with pytest.raises(error, match=match):
            loss_fn(sh, sw, **args)
    with pytest.raises(ValueError, match="temperature"):
        FusedLinearSampledDistillLoss(temperature=-1.0)
