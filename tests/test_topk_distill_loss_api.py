"""topk_distill_loss API: reductions, edge cases, bad ids and bad input, determinism, opcheck, compile."""
import math

import pytest
import torch

import fastdistill
from conftest import KERNEL_BACKENDS, backend_device
from fastdistill import dispatch
from fastdistill.ops.loss_common import DIVERGENCE_CODES
from fastdistill.ops.common import native
from fastdistill.ops.topk_distill_loss import TAIL_CODES, topk_distill_loss, topk_distill_loss_triton
from fastdistill.testing import make_labels, make_logits
from topk_cases import TAILS, make_topk

ALL_BACKENDS = KERNEL_BACKENDS + ["reference"]


def _inputs(shape, k, device, seed, **kw):
    return (make_logits(shape, device=device, seed=seed), *make_topk(shape, k, seed=seed + 1, device=device, **kw))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
def test_reductions_count_tokens_and_num_items(backend, tail, seed):
    device = backend_device(backend)
    s, lp, ids = _inputs((3, 4, 50), 6, device, seed)
    labels = make_labels((3, 4), 50, seed=seed, device=device)
    labels[0, 0] = -100
    kw = dict(tail=tail, labels=labels, backend=backend)
    total = topk_distill_loss(s, lp, ids, reduction="sum", **kw)
    rows = topk_distill_loss(s, lp, ids, reduction="none", **kw)
    assert rows.shape == (3, 4) and rows[0, 0] == 0
    torch.testing.assert_close(topk_distill_loss(s, lp, ids, **kw), total / (labels != -100).sum())
    torch.testing.assert_close(rows.sum(), total)
    for num_items in (7, torch.tensor(7.0, device=device)):
        torch.testing.assert_close(topk_distill_loss(s, lp, ids, num_items=num_items, **kw), total / 7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_jsd_endpoints_are_kl_and_reverse_kl(backend, seed):
    device = backend_device(backend)
    s, lp, ids = _inputs((6, 99), 9, device, seed)
    for tail in TAILS:
        for beta, div in ((0.0, "kl"), (1.0, "reverse_kl")):
            a = topk_distill_loss(s, lp, ids, tail=tail, divergence="jsd", beta=beta, temperature=2.0, backend=backend)
            b = topk_distill_loss(s, lp, ids, tail=tail, divergence=div, temperature=2.0, backend=backend)
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_empty_and_all_ignored_give_exact_zero(backend, dtype):
    """Ignored rows may hold padding: -inf logits and ids that are not token ids; they are never read."""
    device = backend_device(backend)
    for tail in TAILS:
        s = torch.empty(0, 5, 17, dtype=dtype, device=device, requires_grad=True)
        loss = topk_distill_loss(s, torch.empty(0, 5, 3, device=device), torch.empty(0, 5, 3, dtype=torch.long,
                                 device=device), tail=tail, backend=backend)
        loss.backward()
        assert loss.item() == 0.0 and s.grad.shape == s.shape
        s = torch.full((4, 17), float("-inf"), dtype=dtype, device=device, requires_grad=True)
        ids = torch.full((4, 3), -1, device=device)
        ids[1] = 10**9
        loss = topk_distill_loss(s, torch.zeros(4, 3, device=device), ids, tail=tail,
                                 labels=torch.full((4,), -100, device=device), hard_weight=0.5, backend=backend)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_inputs(backend, seed):
    device = backend_device(backend)
    s = make_logits((8, 2, 301), device=device, seed=seed).transpose(0, 1)[0]  # strided rows
    lp, ids = make_topk((8, 11), 11, seed=seed + 1, device=device)
    lp_t, ids_t = lp.t().contiguous().t(), ids.t().contiguous().t()  # k dim not contiguous
    ids_t = ids_t * 27  # distinct ids < 301
    for tail in TAILS:
        expected = topk_distill_loss(s.contiguous(), lp, ids * 27, tail=tail, backend=backend)
        torch.testing.assert_close(topk_distill_loss(s, lp_t, ids_t, tail=tail, backend=backend), expected)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
def test_deterministic(backend, tail, seed):
    device = backend_device(backend)
    shape = (7, 1031) if backend == "triton" and device == "cpu" else (17, 3001)  # the interpreter is slow
    s = make_logits(shape, dtype=torch.bfloat16, device=device, seed=seed)
    lp, ids = make_topk(shape, 50, seed=seed + 1, device=device, dtype=torch.float16)
    labels = make_labels(shape[:1], shape[1], seed=seed, device=device)
    runs = []
    for _ in range(2):
        x = s.clone().requires_grad_(True)
        loss = topk_distill_loss(x, lp, ids, tail=tail, labels=labels, divergence="jsd", temperature=2.0,
                                 hard_weight=0.2, backend=backend)
        loss.backward()
        runs.append((loss, x.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradient_support_and_no_grad_mode(backend, seed):
    """renormalize: exact zeros off the ids (poisoned outputs: every entry is written); bucket: all
    entries move. Only the student gets a gradient; the loss-only path gives the same loss."""
    device = backend_device(backend)
    s, lp, ids = _inputs((4, 64), 5, device, seed)
    lp.requires_grad_(True)
    off = torch.ones_like(s, dtype=torch.bool).scatter(-1, ids, False)
    for tail in TAILS:
        x = s.clone().requires_grad_(True)
        loss = topk_distill_loss(x, lp, ids, tail=tail, backend=backend)
        loss.backward()
        assert lp.grad is None and torch.isfinite(x.grad).all()
        assert torch.all(x.grad[off] == 0) if tail == "renormalize" else torch.all(x.grad[off] != 0)
        with torch.no_grad():
            again = topk_distill_loss(x, lp, ids, tail=tail, backend=backend)
        torch.testing.assert_close(again, loss.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_logprobs_above_one_clamp_the_rest(backend):
    """fp16-rounded log-probs may sum above 1: p_rest clamps to 0 and the loss stays finite."""
    device = backend_device(backend)
    s = torch.tensor([[0.5, 1.5, -0.5, 0.0]], device=device, requires_grad=True)
    lp = torch.tensor([[math.log(0.7), math.log(0.31)]], device=device)
    ids = torch.tensor([[1, 3]], device=device)
    loss = topk_distill_loss(s, lp, ids, tail="bucket", backend=backend)
    loss.backward()
    s64 = s.detach().double().requires_grad_(True)
    oracle = topk_distill_loss(s64, lp.double(), ids, tail="bucket", backend="reference")
    oracle.backward()
    q, (p1, p3) = torch.softmax(s64.detach(), -1)[0], lp.double().exp()[0].tolist()  # p1 + p3 = 1.01
    expected = p1 * math.log(p1 / q[1]) + p3 * math.log(p3 / q[3])  # no rest term (p_rest = 0)
    assert abs(oracle.item() - expected) < 1e-12 and abs(loss.item() - expected) < 1e-5
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_out_of_range_and_duplicate_ids(backend, seed):
    """cpu raises naming the argument; triton and reference give NaN on that row only; validate=True
    raises on every backend (also for duplicates, which triton / reference leave undefined)."""
    device = backend_device(backend)
    s, lp, ids = _inputs((3, 40), 4, device, seed)
    for bad_id in (40, -1):
        bad = ids.clone()
        bad[1, 2] = bad_id
        with pytest.raises(ValueError, match=r"teacher_topk_indices: id .* row 1 is outside \[0, V = 40\)"):
            topk_distill_loss(s, lp, bad, validate=True, backend=backend)
        if backend == "cpu":
            with pytest.raises(ValueError, match="teacher_topk_indices"):
                topk_distill_loss(s, lp, bad, backend=backend)
            continue
        x = s.clone().requires_grad_(True)
        rows = topk_distill_loss(x, lp, bad, tail="bucket", reduction="none", backend=backend)
        rows.sum().backward()
        assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
        assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[[0, 2]]).all()
    dup = ids.clone()
    dup[2, 3] = dup[2, 0]
    with pytest.raises(ValueError, match="teacher_topk_indices: id .* appears twice in row 2"):
        topk_distill_loss(s, lp, dup, validate=True, backend=backend)
    if backend == "cpu":
        with pytest.raises(ValueError, match="teacher_topk_indices: id .* appears twice in row 2"):
            topk_distill_loss(s, lp, dup, tail="bucket", backend=backend)
    labels = torch.tensor([0, -100, 0], device=device)  # a bad id on an ignored row is never read
    bad = ids.clone()
    bad[1, 0] = 10**6
    assert torch.isfinite(topk_distill_loss(s, lp, bad, labels=labels, validate=True, backend=backend))


BAD = [
    (dict(lp=torch.zeros(2, 6), ids=torch.zeros(2, 6, dtype=torch.long)), ValueError, r"k = 6 .*V = 5"),
    (dict(lp=torch.zeros(3, 2)), ValueError, "teacher_topk_logprobs"),
    (dict(lp=torch.zeros(2, 1, 2)), ValueError, "teacher_topk_logprobs"),
    (dict(ids=torch.tensor([[0, 1, 2], [0, 1, 2]])), ValueError, "teacher_topk_indices"),
    (dict(ids=torch.zeros(2, 2)), TypeError, "teacher_topk_indices"),
    (dict(ids=torch.zeros(2, 2, dtype=torch.int16)), TypeError, "teacher_topk_indices"),
    (dict(ids=[[0, 1], [0, 1]]), TypeError, "teacher_topk_indices"),
    (dict(lp=torch.zeros(2, 2, dtype=torch.long)), TypeError, "teacher_topk_logprobs"),
    (dict(lp=torch.zeros(2, 0), ids=torch.zeros(2, 0, dtype=torch.long)), ValueError, "k = 0"),
    (dict(student=torch.zeros(2, 5, dtype=torch.long)), TypeError, "student_logits"),
    (dict(divergence="mse"), ValueError, "divergence"),
    (dict(divergence="kld"), ValueError, "divergence"),
    (dict(tail="drop"), ValueError, "tail"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels"),
    (dict(hard_weight=0.5), ValueError, "hard_weight"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(reduction="mean"), ValueError, "reduction"),
    (dict(backend="cudnn"), ValueError, "backend"),
]


@pytest.mark.parametrize("case,exc,name", BAD, ids=[f"{i}-{n.split()[0]}" for i, (_, _, n) in enumerate(BAD)])
def test_bad_input_names_the_argument(case, exc, name):
    args = dict(student=torch.zeros(2, 5), lp=torch.zeros(2, 2), ids=torch.tensor([[0, 1], [2, 3]]))
    args.update(case)
    s, lp, ids = args.pop("student"), args.pop("lp"), args.pop("ids")
    with pytest.raises(exc, match=name):
        topk_distill_loss(s, lp, ids, **args)


def test_auto_uses_cpu_kernel_and_info_reports_it():
    assert dispatch.select("topk_distill_loss", "auto", torch.device("cpu"), (torch.float32,)) == "cpu"
    assert fastdistill.info()["ops"]["topk_distill_loss"]["cpu"]["cpu"] == "ok"


def _op(backend):
    return topk_distill_loss_triton if backend == "triton" else native(f"topk_distill_loss_{backend}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("tail,divergence,hard_weight,with_labels", [("renormalize", "kl", 0.0, False),
                                                                      ("bucket", "jsd", 0.5, True)])
def test_opcheck(backend, tail, divergence, hard_weight, with_labels, seed):
    device = backend_device(backend)
    s, lp, ids = _inputs((5, 37), 4, device, seed, dtype=torch.float16, index_dtype=torch.int32)
    s.requires_grad_(True)
    labels = make_labels((5,), 37, seed=seed, device=device) if with_labels else None
    scale = torch.full((1,), 0.25, device=device)
    for compute_grad in (True, False):
        x = s if compute_grad else s.detach()  # loss-only mode is for inputs that need no gradient
        args = (x, lp, ids, labels, scale, TAIL_CODES[tail], DIVERGENCE_CODES[divergence], 2.0, 0.3, 1.0,
                hard_weight, True, -100, compute_grad)
        torch.library.opcheck(_op(backend), args)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_compile_fullgraph_matches_eager(backend, seed):
    device = backend_device(backend)
    torch._dynamo.reset()
    s, lp, ids = _inputs((2, 3, 129), 8, device, seed)
    labels = make_labels((2, 3), 129, seed=seed, device=device)

    def step(student, lp, ids, labels):
        loss = topk_distill_loss(student, lp, ids, tail="bucket", labels=labels, divergence="reverse_kl",
                                 temperature=2.0, hard_weight=0.5, reduction="none", backend=backend)
        return loss.sum() * 3.0

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")):
        x = s.clone().requires_grad_(True)
        out = fn(x, lp, ids, labels)
        out.backward()
        results.append((out.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
