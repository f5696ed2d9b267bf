"""sampled_distill_loss API: reductions, edge cases, the NaN rule, bad ids and bad input, TeacherTargets,
validate=True, determinism, opcheck, compile, the module."""
import math

import pytest
import torch

import test_sampled_distill_loss as cases
from conftest import KERNEL_BACKENDS, backend_device
from fastdistill import dispatch
from fastdistill.cache.targets import TeacherTargets
from fastdistill.nn.sampled_distill_loss import SampledDistillLoss
from fastdistill.ops.topk_distill_loss import topk_distill_loss
from fastdistill.ops.common import native
from fastdistill.ops.sampled_distill_loss import sampled_distill_loss, sampled_distill_loss_triton
from fastdistill.testing import make_labels, make_logits

ALL_BACKENDS = KERNEL_BACKENDS + ["reference"]


def _inputs(shape, k, device, seed, **kw):
    return (make_logits(shape, device=device, seed=seed), *cases.make_sampled(shape, k, seed=seed + 1, device=device,
                                                                               **kw))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_reductions_count_tokens_and_num_items(backend, seed):
    device = backend_device(backend)
    s, lp, ids = _inputs((3, 4, 50), 6, device, seed)
    labels = make_labels((3, 4), 50, seed=seed, device=device)
    labels[0, 0] = -100
    kw = dict(labels=labels, backend=backend)
    total = sampled_distill_loss(s, lp, ids, reduction="sum", **kw)
    rows = sampled_distill_loss(s, lp, ids, reduction="none", **kw)
    assert rows.shape == (3, 4) and rows[0, 0] == 0
    torch.testing.assert_close(sampled_distill_loss(s, lp, ids, **kw), total / (labels != -100).sum())
    torch.testing.assert_close(rows.sum(), total)
    for num_items in (7, torch.tensor(7.0, device=device)):
        torch.testing.assert_close(sampled_distill_loss(s, lp, ids, num_items=num_items, **kw), total / 7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_empty_and_all_ignored_give_exact_zero(backend, dtype):
    """Ignored rows may hold padding: -inf logits, ids that are not token ids, -inf / NaN log-probs."""
    device = backend_device(backend)
    s = torch.empty(0, 5, 17, dtype=dtype, device=device, requires_grad=True)
    loss = sampled_distill_loss(s, torch.empty(0, 5, 3, device=device),
                                torch.empty(0, 5, 3, dtype=torch.long, device=device), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and s.grad.shape == s.shape
    s = torch.full((4, 17), float("-inf"), dtype=dtype, device=device, requires_grad=True)
    ids = torch.full((4, 3), -1, device=device)
    ids[1] = 10**9
    lp = torch.full((4, 3), float("-inf"), device=device)
    lp[2] = float("nan")
    loss = sampled_distill_loss(s, lp, ids, labels=torch.full((4,), -100, device=device), hard_weight=0.5,
                                validate=True, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_inputs(backend, seed):
    device = backend_device(backend)
    s = make_logits((8, 2, 301), device=device, seed=seed).transpose(0, 1)[0]  # strided rows
    lp, ids = cases.make_sampled((8, 301), 11, seed=seed + 1, device=device)
    lp_t, ids_t = lp.t().contiguous().t(), ids.t().contiguous().t()  # k dim not contiguous
    expected = sampled_distill_loss(s.contiguous(), lp, ids, backend=backend)
    torch.testing.assert_close(sampled_distill_loss(s, lp_t, ids_t, backend=backend), expected)
    # the shifted causal-LM pattern: two leading strides
    big = make_logits((2, 5, 301), device=device, seed=seed)
    lp3, ids3 = cases.make_sampled((2, 4, 301), 7, seed=seed + 2, device=device)
    torch.testing.assert_close(sampled_distill_loss(big[:, :-1], lp3, ids3, reduction="none", backend=backend),
                               sampled_distill_loss(big[:, :-1].contiguous(), lp3, ids3, reduction="none",
                                                    backend="reference"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic_with_many_duplicates(backend, seed):
    """A peaked teacher and k = 4V: most draws repeat an id. Two runs are bitwise equal."""
    device = backend_device(backend)
    V = 61
    rows = 4 if backend == "triton" and device == "cpu" else 9  # the interpreter is slow
    s = make_logits((rows, V), dtype=torch.bfloat16, device=device, seed=seed)
    lp, ids = cases.make_sampled((rows, V), 4 * V, seed=seed + 1, device=device, dtype=torch.float16, scale=6.0)
    assert (ids.sort(-1).values[:, 1:] == ids.sort(-1).values[:, :-1]).float().mean() > 0.5
    labels = make_labels((rows,), V, seed=seed, device=device)
    runs = []
    for _ in range(2):
        x = s.clone().requires_grad_(True)
        loss = sampled_distill_loss(x, lp, ids, labels=labels, temperature=2.0, hard_weight=0.2, backend=backend)
        loss.backward()
        runs.append((loss, x.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    cases.check_against_oracle(backend, s, lp, ids, labels, seed=seed, temperature=2.0, hard_weight=0.2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradient_support_and_no_grad_mode(backend, seed):
    """q > 0 everywhere: every entry of the gradient moves; only the student gets a gradient; the loss-only
    path gives the same loss."""
    device = backend_device(backend)
    s, lp, ids = _inputs((4, 64), 5, device, seed)
    lp.requires_grad_(True)
    x = s.clone().requires_grad_(True)
    loss = sampled_distill_loss(x, lp, ids, backend=backend)
    loss.backward()
    assert lp.grad is None and torch.isfinite(x.grad).all() and torch.all(x.grad != 0)
    torch.testing.assert_close(x.grad.sum(-1), torch.zeros(4, device=device), rtol=0, atol=1e-6)
    with torch.no_grad():
        again = sampled_distill_loss(x, lp, ids, backend=backend)
    torch.testing.assert_close(again, loss.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("where,value", [("lp", math.nan), ("lp", math.inf), ("lp", -math.inf),
                                         ("student", math.nan), ("student", math.inf)])
def test_nan_rule(backend, where, value, seed):
    """NaN / +inf in a counted row's log-probs or student row, or a -inf log-prob at a draw: that row's loss
    and whole gradient row are NaN, the other rows are untouched; on an ignored row nothing is read."""
    device = backend_device(backend)
    s, lp, ids = _inputs((4, 40), 6, device, seed)
    target = lp if where == "lp" else s
    target[1, 3] = value
    target[2, 3] = value
    labels = torch.tensor([0, 1, -100, 3], device=device)
    x = s.clone().requires_grad_(True)
    rows = sampled_distill_loss(x, lp, ids, labels=labels, reduction="none", backend=backend)
    rows.sum().backward()
    assert torch.isnan(rows[1]) and torch.isnan(x.grad[1]).all()
    assert rows[2] == 0 and torch.all(x.grad[2] == 0)
    assert torch.isfinite(rows[[0, 3]]).all() and torch.isfinite(x.grad[[0, 3]]).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_out_of_range_ids(backend, seed):
    """cpu raises naming the argument; triton and reference give NaN on that row only; validate=True
    raises on every backend; a bad id on an ignored row is never read."""
    device = backend_device(backend)
    s, lp, ids = _inputs((3, 40), 4, device, seed)
    for bad_id in (40, -1):
        bad = ids.clone()
        bad[1, 2] = bad_id
        with pytest.raises(ValueError, match=r"teacher_sampled_indices: id .* row 1 is outside \[0, V = 40\)"):
            sampled_distill_loss(s, lp, bad, validate=True, backend=backend)
        if backend == "cpu":
            with pytest.raises(ValueError, match=r"teacher_sampled_indices: id .* row 1 is outside"):
                sampled_distill_loss(s, lp, bad, backend=backend)
            continue
        x = s.clone().requires_grad_(True)
        rows = sampled_distill_loss(x, lp, bad, reduction="none", backend=backend)
        rows.sum().backward()
        assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
        assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[[0, 2]]).all()
    labels = torch.tensor([0, -100, 0], device=device)
    bad = ids.clone()
    bad[1, 0] = 10**6
    assert torch.isfinite(sampled_distill_loss(s, lp, bad, labels=labels, validate=True, backend=backend))


def test_validate_duplicates_and_logprobs(seed):
    s, lp, ids = _inputs((3, 40), 5, "cpu", seed, duplicates=False)
    dup_ids, dup_lp = ids.clone(), lp.clone()
    dup_ids[2, 4], dup_lp[2, 4] = dup_ids[2, 1], dup_lp[2, 1]
    sampled_distill_loss(s, dup_lp, dup_ids, validate=True)  # duplicates with equal log-probs: fine
    dup_lp[2, 4] -= 0.5
    with pytest.raises(ValueError, match=rf"teacher_sampled_logprobs: id {int(dup_ids[2, 1])} appears twice in "
                                         r"row 2 with different log-probs"):
        sampled_distill_loss(s, dup_lp, dup_ids, validate=True)
    for value in (-math.inf, math.nan, math.inf):
        bad = lp.clone()
        bad[1, 3] = value
        with pytest.raises(ValueError, match="teacher_sampled_logprobs: .* draw 3 of row 1"):
            sampled_distill_loss(s, bad, ids, validate=True)


BAD = [
    (dict(lp=torch.zeros(3, 2)), ValueError, "teacher_sampled_logprobs"),
    (dict(lp=torch.zeros(2, 1, 2)), ValueError, "teacher_sampled_logprobs"),
    (dict(ids=torch.tensor([[0, 1, 2], [0, 1, 2]])), ValueError, "teacher_sampled_indices"),
    (dict(ids=torch.zeros(2, 2)), TypeError, "teacher_sampled_indices"),
    (dict(ids=torch.zeros(2, 2, dtype=torch.int16)), TypeError, "teacher_sampled_indices"),
    (dict(ids=[[0, 1], [0, 1]]), TypeError, "teacher_sampled_indices"),
    (dict(ids=None), TypeError, "teacher_sampled_indices: required"),
    (dict(lp=torch.zeros(2, 2, dtype=torch.long)), TypeError, "teacher_sampled_logprobs"),
    (dict(lp=torch.zeros(2, 0), ids=torch.zeros(2, 0, dtype=torch.long)), ValueError, "k = 0"),
    (dict(student=torch.zeros(2, 5, dtype=torch.long)), TypeError, "student_logits"),
    (dict(student=[[0.0] * 5] * 2), TypeError, "student_logits"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels"),
    (dict(labels=torch.tensor([0, 5])), ValueError, "labels"),
    (dict(hard_weight=0.5), ValueError, "hard_weight"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(reduction="mean"), ValueError, "reduction"),
    (dict(num_items=0), ValueError, "num_items"),
    (dict(backend="cudnn"), ValueError, "backend"),
]


@pytest.mark.parametrize("case,exc,name", BAD, ids=[f"{i}-{n.split()[0]}" for i, (_, _, n) in enumerate(BAD)])
def test_bad_input_names_the_argument(case, exc, name):
    args = dict(student=torch.zeros(2, 5), lp=torch.zeros(2, 2), ids=torch.tensor([[0, 1], [2, 3]]))
    args.update(case)
    s, lp, ids = args.pop("student"), args.pop("lp"), args.pop("ids")
    with pytest.raises(exc, match=name):
        sampled_distill_loss(s, lp, ids, **args)


def _targets(kind, lp, ids, temperature=2.0, vocab=50):
    return TeacherTargets(kind, lp, ids, temperature, vocab, "counts" if kind == "sampled" else None)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_teacher_targets_batch(backend, seed):
    """A sampled TeacherTargets stands in for (log-probs, ids); a mismatching one is refused."""
    device = backend_device(backend)
    s, lp, ids = _inputs((4, 50), 8, device, seed, temperature=2.0)
    expected = sampled_distill_loss(s, lp, ids, temperature=2.0, backend=backend)
    assert torch.equal(sampled_distill_loss(s, _targets("sampled", lp, ids), temperature=2.0, backend=backend),
                       expected)
    assert torch.equal(SampledDistillLoss(temperature=2.0, backend=backend)(s, _targets("sampled", lp, ids)),
                       expected)
    with pytest.raises(ValueError, match="teacher_sampled_logprobs: got topk teacher targets .*topk_distill_loss"):
        sampled_distill_loss(s, _targets("topk", lp, ids), temperature=2.0, backend=backend)
    with pytest.raises(ValueError, match="teacher_sampled_logprobs: the targets were built at temperature 2.0"):
        sampled_distill_loss(s, _targets("sampled", lp, ids), temperature=1.0, backend=backend)
    with pytest.raises(ValueError, match="teacher_sampled_logprobs: .*vocab_size 51, the student has V = 50"):
        sampled_distill_loss(s, _targets("sampled", lp, ids, vocab=51), temperature=2.0, backend=backend)
    with pytest.raises(TypeError, match="teacher_sampled_indices: must be None"):
        sampled_distill_loss(s, _targets("sampled", lp, ids), ids, temperature=2.0, backend=backend)


def test_sampled_targets_refused_by_topk_loss(seed):
    s, lp, ids = _inputs((4, 50), 8, "cpu", seed, temperature=2.0)
    with pytest.raises(ValueError, match="got sampled teacher targets .*sampled_distill_loss"):
        topk_distill_loss(s, _targets("sampled", lp, ids), None, temperature=2.0)


def test_dtensor_is_refused(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        s, lp, ids = _inputs((4, 50), 8, "cpu", 0)
        with pytest.raises(TypeError, match="student_logits: a DTensor"):
            sampled_distill_loss(DTensor.from_local(s, mesh, [Shard(1)]), lp, ids)
        with pytest.raises(TypeError, match="teacher_sampled_logprobs: a DTensor"):
            sampled_distill_loss(s, DTensor.from_local(lp, mesh, [Shard(0)]), ids)
    finally:
        dist.destroy_process_group()


def test_auto_uses_cpu_kernel():
    assert dispatch.select("sampled_distill_loss", "auto", torch.device("cpu"), (torch.float32,)) == "cpu"


def _op(backend):
    return sampled_distill_loss_triton if backend == "triton" else native(f"sampled_distill_loss_{backend}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("hard_weight,with_labels", [(0.0, False), (0.5, True)])
def test_opcheck(backend, hard_weight, with_labels, seed):
    device = backend_device(backend)
    s, lp, ids = _inputs((5, 37), 6, device, seed, dtype=torch.float16, index_dtype=torch.int32)
    s.requires_grad_(True)
    labels = make_labels((5,), 37, seed=seed, device=device) if with_labels else None
    scale = torch.full((1,), 0.25, device=device)
    for compute_grad in (True, False):
        x = s if compute_grad else s.detach()  # loss-only mode is for inputs that need no gradient
        torch.library.opcheck(_op(backend), (x, lp, ids, labels, scale, 2.0, 0.7, hard_weight, True, -100,
                                             compute_grad))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_compile_fullgraph_matches_eager(backend, seed):
    device = backend_device(backend)
    torch._dynamo.reset()
    s, lp, ids = _inputs((2, 3, 129), 8, device, seed)
    labels = make_labels((2, 3), 129, seed=seed, device=device)

    def step(student, lp, ids, labels):
        loss = sampled_distill_loss(student, lp, ids, labels=labels, temperature=2.0, hard_weight=0.5,
                                    reduction="none", backend=backend)
        return loss.sum() * 3.0

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")):
        x = s.clone().requires_grad_(True)
        out = fn(x, lp, ids, labels)
        out.backward()
        results.append((out.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def test_module_matches_function_and_checks_options(seed):
    s, lp, ids = _inputs((3, 4, 50), 6, "cpu", seed, temperature=2.0)
    labels = make_labels((3, 4), 50, seed=seed)
    module = SampledDistillLoss(temperature=2.0, hard_weight=0.3, reduction="sum")
    assert "temperature=2.0" in repr(module)
    torch.testing.assert_close(module(s, lp, ids, labels=labels),
                               sampled_distill_loss(s, lp, ids, labels=labels, temperature=2.0, hard_weight=0.3,
                                                    reduction="sum"))
    for bad, name in ((dict(temperature=-1.0), "temperature"), (dict(reduction="avg"), "reduction"),
                      (dict(ignore_index=1.5), "ignore_index")):
        with pytest.raises((ValueError, TypeError), match=name):
            SampledDistillLoss(**bad)
