"""fused_linear_distill_loss contracts: opcheck, torch.compile, bad input, the auto chunk size."""
import pytest
import torch

import fastdistill
from conftest import KERNEL_BACKENDS, backend_device
from fastdistill.ops.loss_common import DIVERGENCE_CODES
from fastdistill.ops.fused_linear_chunks import CHUNK_BUDGET_BYTES, auto_chunk_size
from fastdistill.ops.fused_linear_distill_loss import _OPS
from fastdistill.testing import make_labels

from test_fused_linear_distill_loss import make_problem


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduce", [True, False])
def test_opcheck(backend, reduce, seed):
    device = backend_device(backend)
    p = make_problem(seed, n=11, v_s=41, v_t=37, device=device)
    labels = make_labels((11,), 37, seed=seed, device=device)
    scale = torch.full((1,), 0.25, device=device)
    row_weights = None if reduce else torch.rand(11, device=device)
    sh, sw, sb = (p[k].requires_grad_(True) for k in ("student_hidden", "student_weight", "student_bias"))
    args = (sh, sw, sb, p["teacher_hidden"], p["teacher_weight"], p["teacher_bias"], labels, scale, row_weights,
            DIVERGENCE_CODES["jsd"], 2.0, 0.4, 1.0, 0.5, True, -100, 1.3, 6.0, 0.7, 0.0, 4, reduce, True, True,
            True)
    torch.library.opcheck(_OPS[backend], args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
def test_compile_fullgraph_matches_eager(backend, reduction, seed):
    device = backend_device(backend)
    torch._dynamo.reset()
    p = make_problem(seed, n=10, device=device)
    labels = make_labels((2, 5), 123, seed=seed, device=device)

    def step(sh, sw, sb, th, tw, tb, labels):
        loss = fastdistill.fused_linear_distill_loss(
            sh.view(2, 5, -1), sw, th.view(2, 5, -1), tw, student_bias=sb, teacher_bias=tb, labels=labels,
            divergence="kl", temperature=2.0, hard_weight=0.5, softcap=5.0, reduction=reduction, chunk_size=3,
            backend=backend)
        return loss.sum() * 3.0

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")):
        sh, sw, sb = (p[k].clone().requires_grad_(True) for k in ("student_hidden", "student_weight", "student_bias"))
        out = fn(sh, sw, sb, p["teacher_hidden"], p["teacher_weight"], p["teacher_bias"], labels)
        out.backward()
        results.append((out.detach(), sh.grad, sw.grad, sb.grad))
    for compiled, eager in zip(results[1], results[0]):
        torch.testing.assert_close(compiled, eager)


def test_teacher_gets_no_gradient_and_second_backward_is_refused():
    p = make_problem(0)
    p = {k: v.requires_grad_(True) for k, v in p.items()}
    loss = fastdistill.fused_linear_distill_loss(**p, backend="cpu")
    loss.backward(retain_graph=True)
    assert p["teacher_hidden"].grad is None and p["teacher_weight"].grad is None
    assert p["student_weight"].grad is not None
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # the saved gradients were scaled in place: autograd's version counter refuses


def test_auto_chunk_size_follows_the_budget():
    rows = auto_chunk_size(8192, 128256, torch.device("cuda"))
    assert rows % 16 == 0 and rows * 128256 * 4 * 4 <= CHUNK_BUDGET_BYTES["cuda"]
    assert auto_chunk_size(5, 32000, torch.device("cpu")) == 5
    assert auto_chunk_size(10**6, 10**9, torch.device("cpu")) == 1


def _bad(**changes):
    p = make_problem(0)
    p.update(changes)
    return p


@pytest.mark.parametrize("inputs,options,error,match", [
    (_bad(student_weight=torch.randn(131, 13)), {}, ValueError, r"student_weight: shape \(131, 13\) does not match"),
    (_bad(teacher_weight=torch.randn(127)), {}, ValueError, "teacher_weight: expected shape"),
    (_bad(student_bias=torch.randn(130)), {}, ValueError, r"student_bias: expected shape \(131,\)"),
    (_bad(student_bias=torch.randn(131, dtype=torch.float64)), {}, TypeError, "student_bias: expected torch.float32"),
    (_bad(teacher_hidden=torch.randn(18, 20)), {}, ValueError, "teacher_hidden: leading shape"),
    (_bad(student_hidden=torch.randn(19, 12, dtype=torch.bfloat16)), {}, TypeError, "student_weight: dtype"),
    (_bad(student_hidden=torch.ones(19, 12, dtype=torch.int64)), {}, TypeError, "student_hidden: expected a float"),
    (_bad(teacher_weight=[[1.0]]), {}, TypeError, "teacher_weight: expected a torch.Tensor"),
    (_bad(), {"labels": torch.zeros(18, dtype=torch.long)}, ValueError, r"labels: expected shape \(19,\)"),
    (_bad(), {"labels": torch.zeros(19)}, TypeError, "labels: expected an integer"),
    (_bad(), {"chunk_size": 0}, ValueError, "chunk_size"),
    (_bad(), {"chunk_size": 2.5}, ValueError, "chunk_size"),
    (_bad(), {"softcap": 0.0}, ValueError, "softcap"),
    (_bad(), {"logit_scale": float("nan")}, ValueError, "logit_scale"),
    (_bad(), {"teacher_logit_scale": 0.0}, ValueError, "teacher_logit_scale"),
    (_bad(), {"teacher_softcap": -1.0}, ValueError, "teacher_softcap"),
    (_bad(), {"divergence": "mse"}, ValueError, "needs equal vocabularies"),
    (_bad(), {"divergence": "kld"}, ValueError, "divergence: unknown"),
    (_bad(), {"hard_weight": 1.0}, ValueError, "hard_weight"),
    (_bad(), {"backend": "cuda"}, fastdistill.dispatch.BackendError, "cuda"),
])
def test_bad_input_names_the_argument(inputs, options, error, match):
    with pytest.raises(error, match=match):
        fastdistill.fused_linear_distill_loss(**inputs, **options)


def test_module_checks_options_at_construction():
    with pytest.raises(ValueError, match="softcap"):
        fastdistill.FusedLinearDistillLoss(softcap=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        fastdistill.FusedLinearDistillLoss(temperature=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_casts_heads_like_f_linear(dtype, seed):
    """Under autocast the op equals itself on inputs cast to the autocast dtype (F.linear's rule); before, the
    aten GEMMs inside mixed bf16 and float32 operands and raised."""
    p = make_problem(seed, n=9, v_s=41, v_t=37, dtype=dtype)
    sh = p["student_hidden"].detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fastdistill.fused_linear_distill_loss(sh, p["student_weight"], p["teacher_hidden"], p["teacher_weight"],
                                                     divergence="jsd", chunk_size=4)
    loss.backward()
    bf = {k: (v.to(torch.bfloat16) if v is not None else None) for k, v in p.items()}
    sh_bf = bf["student_hidden"].detach().requires_grad_(True)
    expected = fastdistill.fused_linear_distill_loss(sh_bf, bf["student_weight"], bf["teacher_hidden"],
                                                     bf["teacher_weight"], divergence="jsd", chunk_size=4)
    expected.backward()
    assert torch.equal(loss, expected)
    assert sh.grad.dtype == dtype
    assert torch.equal(sh.grad, sh_bf.grad.to(dtype))
