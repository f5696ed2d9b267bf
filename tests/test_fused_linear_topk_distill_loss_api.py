"""fused_linear_topk_distill_loss contracts: opcheck, torch.compile, empty / ignored inputs, TeacherTargets,
validate=True, bad input, autocast, the module, the auto chunk size."""
import pytest
import torch

from conftest import KERNEL_BACKENDS, backend_device
from fastdistill.cache.targets import TeacherTargets
from fastdistill.dispatch import BackendError
from fastdistill.nn.fused_linear_topk_distill_loss import FusedLinearTopKDistillLoss
from fastdistill.ops.fused_linear_targets import OPS, TARGETS_BUDGET_BYTES, targets_chunk_size
from fastdistill.ops.fused_linear_topk_distill_loss import fused_linear_topk_distill_loss as loss_fn
from fastdistill.ops.loss_common import DIVERGENCE_CODES
from fastdistill.ops.topk_distill_loss import TAIL_CODES
from fastdistill.testing import make_labels
from fused_targets_cases import make_problem
from test_fused_linear_topk_distill_loss import slow_triton


@pytest.mark.parametrize("backend", slow_triton(KERNEL_BACKENDS))
@pytest.mark.parametrize("reduce", [True, False])
def test_opcheck(backend, reduce, seed):
    device = backend_device(backend)
    p, lp, ids = make_problem(seed, n=11, v=41, k=6, device=device)
    labels = make_labels((11,), 41, seed=seed, device=device)
    scale = torch.full((1,), 0.25, device=device)
    row_weights = None if reduce else torch.rand(11, device=device)
    sh, sw, sb = (p[k].requires_grad_(True) for k in ("student_hidden", "student_weight", "student_bias"))
    args = (sh, sw, sb, lp, ids, labels, scale, row_weights, TAIL_CODES["bucket"], DIVERGENCE_CODES["jsd"], 2.0,
            0.4, 1.0, 0.5, True, -100, 1.3, 6.0, 4, reduce, True, True, True)
    torch.library.opcheck(OPS["topk"].ops[backend], args)


@pytest.mark.parametrize("backend", slow_triton(KERNEL_BACKENDS) + [pytest.param("reference", marks=pytest.mark.slow)])
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
def test_compile_fullgraph_matches_eager(backend, reduction, seed):
    device = backend_device(backend)
    torch._dynamo.reset()
    p, lp, ids = make_problem(seed, n=10, device=device)
    labels = make_labels((2, 5), 131, seed=seed, device=device)

    def step(sh, sw, sb, lp, ids, labels):
        loss = loss_fn(sh.view(2, 5, -1), sw, lp.view(2, 5, -1), ids.view(2, 5, -1), student_bias=sb, labels=labels,
                       tail="bucket", divergence="kl", temperature=2.0, hard_weight=0.5, softcap=5.0,
                       reduction=reduction, chunk_size=3, backend=backend)
        return loss.sum() * 3.0

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")):
        sh, sw, sb = (p[k].clone().requires_grad_(True) for k in ("student_hidden", "student_weight", "student_bias"))
        out = fn(sh, sw, sb, lp, ids, labels)
        out.backward()
        results.append((out.detach(), sh.grad, sw.grad, sb.grad))
    for compiled, eager in zip(results[1], results[0]):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_leading_dims_empty_and_all_ignored(backend):
    p, lp, ids = make_problem(0, n=12)
    sh, sw, sb = p["student_hidden"], p["student_weight"], p["student_bias"]
    labels = make_labels((3, 4), 131, seed=0)
    flat = loss_fn(sh, sw, lp, ids, student_bias=sb, labels=labels.view(-1), reduction="none", backend=backend)
    rows = loss_fn(sh.view(3, 4, -1), sw, lp.view(3, 4, -1), ids.view(3, 4, -1), student_bias=sb, labels=labels,
                   reduction="none", backend=backend)
    assert rows.shape == (3, 4) and torch.equal(rows.view(-1), flat)
    h = sh[:0].clone().requires_grad_(True)
    w = sw.clone().requires_grad_(True)
    out = loss_fn(h, w, lp[:0], ids[:0], backend=backend)
    out.backward()
    assert out.item() == 0.0 and torch.equal(w.grad, torch.zeros_like(w))
    hidden = torch.full_like(sh, float("nan")).requires_grad_(True)  # padding rows may hold anything
    out = loss_fn(hidden, w, lp, torch.full_like(ids, -1), labels=torch.full((12,), -100), hard_weight=1.0,
                  tail="bucket", backend=backend)
    out.backward()
    assert out.item() == 0.0 and torch.all(hidden.grad == 0)


def test_teacher_targets_batch_and_mismatches(seed):
    p, lp, ids = make_problem(seed, temperature=2.0)
    sh, sw = p["student_hidden"], p["student_weight"]
    targets = TeacherTargets("topk", lp, ids, temperature=2.0, vocab_size=131)
    expected = loss_fn(sh, sw, lp, ids, temperature=2.0, backend="cpu")
    assert torch.equal(loss_fn(sh, sw, targets, temperature=2.0, backend="cpu"), expected)
    module = FusedLinearTopKDistillLoss(temperature=2.0, backend="cpu")
    assert torch.equal(module(sh, sw, targets), expected)
    with pytest.raises(ValueError, match="teacher_topk_logprobs: got sampled teacher targets"):
        loss_fn(sh, sw, TeacherTargets("sampled", lp, ids, temperature=2.0, vocab_size=131), temperature=2.0)
    with pytest.raises(ValueError, match="teacher_topk_logprobs: the targets were built at temperature 2.0"):
        loss_fn(sh, sw, targets, temperature=1.0)
    with pytest.raises(ValueError, match="teacher_topk_logprobs: the targets come from a teacher with vocab_size"):
        loss_fn(sh, sw[:130], targets, temperature=2.0)
    with pytest.raises(TypeError, match="teacher_topk_indices: must be None"):
        loss_fn(sh, sw, targets, ids, temperature=2.0)
    with pytest.raises(TypeError, match="teacher_topk_indices: required"):
        loss_fn(sh, sw, lp)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_validate_refuses_bad_and_duplicate_ids(backend):
    p, lp, ids = make_problem(0, n=6, v=40, k=4)
    sh, sw = p["student_hidden"], p["student_weight"]
    labels = torch.zeros(6, dtype=torch.long)
    bad = ids.clone()
    bad[3, 1] = 40
    with pytest.raises(ValueError, match=r"teacher_topk_indices: id 40 in row 3 is outside \[0, V = 40\)"):
        loss_fn(sh, sw, lp, bad, labels=labels, validate=True, backend=backend)
    dup = ids.clone()
    dup[2, 0] = dup[2, 1]
    with pytest.raises(ValueError, match="teacher_topk_indices: id .* appears twice in row 2"):
        loss_fn(sh, sw, lp, dup, validate=True, backend=backend)
    labels[3] = -100  # an ignored row's ids are never read
    loss_fn(sh, sw, lp, bad, labels=labels, validate=True, backend=backend)


def test_out_of_range_id_without_validate_gives_nan_on_reference():
    """Not validated: the reference (and triton) give the row NaN, never a wrong number; cpu raises."""
    p, lp, ids = make_problem(0, n=6, v=40, k=4)
    bad = ids.clone()
    bad[3, 1] = -7
    rows = loss_fn(p["student_hidden"], p["student_weight"], lp, bad, reduction="none", backend="reference")
    assert torch.isnan(rows[3]) and torch.isfinite(rows[torch.arange(6) != 3]).all()
    with pytest.raises(Exception, match="teacher_topk_indices|out of range|outside"):
        loss_fn(p["student_hidden"], p["student_weight"], lp, bad, backend="cpu")


def _bad(**changes):
    p, lp, ids = make_problem(0, n=7, v=23, k=4)
    args = dict(student_hidden=p["student_hidden"], student_weight=p["student_weight"], teacher_topk_logprobs=lp,
                teacher_topk_indices=ids)
    options = {k: changes.pop(k) for k in list(changes) if k not in args}
    args.update(changes)
    return args, options


@pytest.mark.parametrize("case,error,match", [
    (_bad(student_weight=torch.randn(23, 5)), ValueError, r"student_weight: shape \(23, 5\) does not match"),
    (_bad(student_bias=torch.randn(22)), ValueError, r"student_bias: expected shape \(23,\)"),
    (_bad(student_hidden=torch.randn(7, 12, dtype=torch.bfloat16)), TypeError, "student_weight: dtype"),
    (_bad(teacher_topk_logprobs=torch.randn(6, 4)), ValueError, r"teacher_topk_logprobs: expected shape \(7,\)"),
    (_bad(teacher_topk_indices=torch.zeros(7, 3, dtype=torch.long)), ValueError, "teacher_topk_indices: shape"),
    (_bad(teacher_topk_indices=torch.zeros(7, 4)), TypeError, "teacher_topk_indices: expected int32 or int64"),
    (_bad(teacher_topk_logprobs=torch.zeros(7, 24), teacher_topk_indices=torch.zeros(7, 24, dtype=torch.long)),
     ValueError, "k = 24 top-k entries per row, but the vocabulary has V = 23"),
    (_bad(labels=torch.zeros(6, dtype=torch.long)), ValueError, r"labels: expected shape \(7,\)"),
    (_bad(labels=torch.full((7,), 23)), ValueError, "labels: value 23"),
    (_bad(chunk_size=0), ValueError, "chunk_size"),
    (_bad(softcap=-1.0), ValueError, "softcap"),
    (_bad(logit_scale=0.0), ValueError, "logit_scale"),
    (_bad(tail="top"), ValueError, "tail: unknown"),
    (_bad(divergence="mse"), ValueError, "divergence: 'mse'"),
    (_bad(temperature=0.0), ValueError, "temperature"),
    (_bad(hard_weight=1.0), ValueError, "hard_weight"),
    (_bad(backend="cuda"), BackendError, "cuda"),
])
def test_bad_input_names_the_argument(case, error, match):
    args, options = case
    with pytest.raises(error, match=match):
        loss_fn(**args, **options)


def test_module_matches_function_and_checks_options(seed):
    p, lp, ids = make_problem(seed)
    labels = make_labels((19,), 131, seed=seed)
    module = FusedLinearTopKDistillLoss(tail="bucket", divergence="jsd", hard_weight=0.2, chunk_size=5,
                                        backend="cpu")
    expected = loss_fn(p["student_hidden"], p["student_weight"], lp, ids, student_bias=p["student_bias"],
                       labels=labels, tail="bucket", divergence="jsd", hard_weight=0.2, chunk_size=5, backend="cpu",
                       num_items=4)
    actual = module(p["student_hidden"], p["student_weight"], lp, ids, student_bias=p["student_bias"], labels=labels,
                    num_items=4)
    assert torch.equal(actual, expected)
    assert "chunk_size=5" in repr(module) and "tail='bucket'" in repr(module)
    for bad, match in ((dict(softcap=-1.0), "softcap"), (dict(tail="x"), "tail"), (dict(divergence="mse"), "mse"),
                       (dict(temperature=0.0), "temperature")):
        with pytest.raises(ValueError, match=match):
            FusedLinearTopKDistillLoss(**bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_casts_the_head_like_f_linear(dtype, seed):
    p, lp, ids = make_problem(seed, n=9, v=41, k=5, dtype=dtype)
    sh = p["student_hidden"].detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(sh, p["student_weight"], lp, ids, divergence="jsd", chunk_size=4)
    loss.backward()
    sh_bf = p["student_hidden"].to(torch.bfloat16).requires_grad_(True)
    expected = loss_fn(sh_bf, p["student_weight"].to(torch.bfloat16), lp, ids, divergence="jsd", chunk_size=4)
    expected.backward()
    assert torch.equal(loss, expected) and sh.grad.dtype == dtype
    assert torch.equal(sh.grad, sh_bf.grad.to(dtype))


def test_auto_chunk_size_follows_the_budget():
    rows = targets_chunk_size(8192, 128256, torch.device("cuda"))
    assert rows % 16 == 0 and rows * 128256 * 4 * 3 <= TARGETS_BUDGET_BYTES["cuda"]
    assert targets_chunk_size(5, 32000, torch.device("cpu")) == 5
    assert targets_chunk_size(10**6, 10**9, torch.device("cpu")) == 1
