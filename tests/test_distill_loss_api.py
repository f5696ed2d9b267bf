"""distill_loss API semantics: PyTorch equivalence, reductions, edge cases, bad input, dispatch."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastdistill
from conftest import KERNEL_BACKENDS, backend_device
from fastdistill import dispatch
from fastdistill.testing import make_labels, make_logits

ALL_BACKENDS = KERNEL_BACKENDS + ["reference"]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_equals_hand_written_pytorch_kl(backend, seed):
    """batchmean on 2-D logits is F.kl_div(log_softmax(s/T), softmax(t/T), 'batchmean') * T²."""
    device = backend_device(backend)
    s = make_logits((13, 257), device=device, seed=seed).requires_grad_(True)
    t = make_logits((13, 257), device=device, seed=seed + 1)
    T = 3.0
    ours = fastdistill.distill_loss(s, t, temperature=T, backend=backend)
    theirs = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T**2
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    g1, = torch.autograd.grad(ours, s)
    g2, = torch.autograd.grad(theirs, s)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_3d_batchmean_counts_tokens_and_num_items(backend, seed):
    device = backend_device(backend)
    s = make_logits((3, 4, 50), device=device, seed=seed)
    t = make_logits((3, 4, 50), device=device, seed=seed + 1)
    labels = make_labels((3, 4), 50, seed=seed, device=device)
    labels[0, 0] = -100
    total = fastdistill.distill_loss(s, t, labels=labels, reduction="sum", backend=backend)
    rows = fastdistill.distill_loss(s, t, labels=labels, reduction="none", backend=backend)
    assert rows.shape == (3, 4) and rows[0, 0] == 0
    n_valid = (labels != -100).sum()
    mean = fastdistill.distill_loss(s, t, labels=labels, backend=backend)
    torch.testing.assert_close(mean, total / n_valid)
    torch.testing.assert_close(rows.sum(), total)
    for num_items in (7, torch.tensor(7.0, device=device)):
        torch.testing.assert_close(fastdistill.distill_loss(s, t, labels=labels, num_items=num_items,
                                                            backend=backend), total / 7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_jsd_endpoints_are_kl_and_reverse_kl(backend, seed):
    device = backend_device(backend)
    s = make_logits((6, 99), device=device, seed=seed)
    t = make_logits((6, 99), device=device, seed=seed + 1)
    for beta, div in ((0.0, "kl"), (1.0, "reverse_kl")):
        a = fastdistill.distill_loss(s, t, divergence="jsd", beta=beta, temperature=2.0, backend=backend)
        b = fastdistill.distill_loss(s, t, divergence=div, temperature=2.0, backend=backend)
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_empty_and_all_ignored_give_exact_zero(backend, dtype):
    device = backend_device(backend)
    for reduction in ("batchmean", "sum"):
        s = torch.empty(0, 5, 17, dtype=dtype, device=device, requires_grad=True)
        loss = fastdistill.distill_loss(s, torch.empty(0, 5, 17, dtype=dtype, device=device),
                                        reduction=reduction, backend=backend)
        loss.backward()
        assert loss.item() == 0.0 and s.grad.shape == s.shape
        s = torch.full((4, 17), float("-inf"), dtype=dtype, device=device, requires_grad=True)  # padding rows
        labels = torch.full((4,), -100, device=device)
        loss = fastdistill.distill_loss(s, s.detach(), labels=labels, hard_weight=0.5, reduction=reduction,
                                        backend=backend)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_inputs(backend, seed):
    device = backend_device(backend)
    base = make_logits((8, 2, 301), device=device, seed=seed)
    s = base.transpose(0, 1)[:, ::2]  # strided rows
    t = make_logits((301, 8), device=device, seed=seed + 1).t()  # vocab dim not contiguous
    labels = make_labels((8,), 301, seed=seed, device=device)
    expected = fastdistill.distill_loss(s[0].contiguous(), t.contiguous()[::2], labels=labels[::2], backend=backend)
    got = fastdistill.distill_loss(s[0], t[::2], labels=labels[::2], backend=backend)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("divergence", ("kl", "jsd", "tvd"))
def test_deterministic(backend, divergence, seed):
    device = backend_device(backend)
    s = make_logits((17, 3001), dtype=torch.bfloat16, device=device, seed=seed)
    t = make_logits((17, 3001), dtype=torch.bfloat16, device=device, seed=seed + 1)
    labels = make_labels((17,), 3001, seed=seed, device=device)
    runs = []
    for _ in range(2):
        x = s.clone().requires_grad_(True)
        loss = fastdistill.distill_loss(x, t, labels=labels, divergence=divergence, hard_weight=0.2, backend=backend)
        loss.backward()
        runs.append((loss, x.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_teacher_gets_no_grad_and_no_grad_mode(backend, seed):
    device = backend_device(backend)
    s = make_logits((4, 64), device=device, seed=seed).requires_grad_(True)
    t = make_logits((4, 64), device=device, seed=seed + 1).requires_grad_(True)
    loss = fastdistill.distill_loss(s, t, backend=backend)
    loss.backward()
    assert t.grad is None and s.grad is not None
    with torch.no_grad():
        again = fastdistill.distill_loss(s, t, backend=backend)
    torch.testing.assert_close(again, loss.detach(), rtol=1e-6, atol=0)  # loss-only path: same math


def test_module_matches_function(seed):
    s = make_logits((5, 40), seed=seed)
    t = make_logits((5, 40), seed=seed + 1)
    labels = make_labels((5,), 40, seed=seed)
    module = fastdistill.DistillLoss(divergence="jsd", temperature=2.0, beta=0.4, hard_weight=0.5)
    assert "jsd" in repr(module)
    expected = fastdistill.distill_loss(s, t, labels=labels, divergence="jsd", temperature=2.0, beta=0.4,
                                        hard_weight=0.5)
    assert torch.equal(module(s, t, labels), expected)


BAD = [
    (dict(student=torch.zeros(2, 5), teacher=torch.zeros(2, 6)), ValueError, "teacher_logits"),
    (dict(student=torch.zeros(2, 5), teacher=torch.zeros(3, 5)), ValueError, "teacher_logits"),
    (dict(student=torch.zeros(2, 5, dtype=torch.long), teacher=torch.zeros(2, 5)), TypeError, "student_logits"),
    (dict(teacher=torch.zeros(2, 5, dtype=torch.int32)), TypeError, "teacher_logits"),
    (dict(student=[[1.0]]), TypeError, "student_logits"),
    (dict(student=torch.zeros(2, 0), teacher=torch.zeros(2, 0)), ValueError, "student_logits"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels"),
    (dict(labels=torch.zeros(2)), TypeError, "labels"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature="2"), TypeError, "temperature"),
    (dict(beta=1.5), ValueError, "beta"),
    (dict(skew=-0.1), ValueError, "skew"),
    (dict(divergence="kld"), ValueError, "divergence"),
    (dict(reduction="mean"), ValueError, "reduction"),
    (dict(backend="cudnn"), ValueError, "backend"),
    (dict(num_items=0), ValueError, "num_items"),
    (dict(num_items=-3.0), ValueError, "num_items"),
    (dict(num_items=torch.ones(2)), ValueError, "num_items"),
    (dict(hard_weight=0.5), ValueError, "hard_weight"),
    (dict(soft_weight=float("nan")), ValueError, "soft_weight"),
]


@pytest.mark.parametrize("case,exc,name", BAD, ids=[f"{n}-{i}" for i, (_, _, n) in enumerate(BAD)])
def test_bad_input_names_the_argument(case, exc, name):
    args = dict(student=torch.zeros(2, 5), teacher=torch.zeros(2, 5))
    args.update(case)
    s, t = args.pop("student"), args.pop("teacher")
    with pytest.raises(exc, match=name):
        fastdistill.distill_loss(s, t, **args)


def test_bad_module_options_fail_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        fastdistill.DistillLoss(temperature=0)
    with pytest.raises(ValueError, match="divergence"):
        fastdistill.DistillLoss(divergence="nope")


def test_out_of_range_label_raises_on_cpu():
    with pytest.raises(ValueError, match="labels"):
        fastdistill.distill_loss(torch.zeros(2, 5), torch.zeros(2, 5), labels=torch.tensor([1, 5]),
                                 hard_weight=1.0, backend="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's messages")
def test_explicit_backend_that_cannot_run_says_why(monkeypatch):
    with pytest.raises(dispatch.BackendError, match="cuda: runs on cuda tensors, got cpu"):
        fastdistill.distill_loss(torch.zeros(2, 5), torch.zeros(2, 5), backend="cuda")
    with pytest.raises(dispatch.BackendError, match="dtype torch.float64 not supported"):
        fastdistill.distill_loss(torch.zeros(2, 5, dtype=torch.float64), torch.zeros(2, 5), backend="cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(dispatch.BackendError, match="TRITON_INTERPRET=1"):
        fastdistill.distill_loss(torch.zeros(2, 5), torch.zeros(2, 5), backend="triton")


def test_missing_extension_falls_back_once_with_reason(monkeypatch):
    monkeypatch.setattr(dispatch._ext, "load_error", lambda: "ImportError: simulated")
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.raises(dispatch.BackendError, match="cpu: extension not built: ImportError: simulated"):
        fastdistill.distill_loss(torch.zeros(2, 5), torch.zeros(2, 5), backend="cpu")
    with pytest.warns(RuntimeWarning, match="reference backend.*extension not built"):
        fastdistill.distill_loss(torch.zeros(2, 5), torch.zeros(2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastdistill.distill_loss(torch.zeros(2, 5), torch.zeros(2, 5))  # warned once only


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("FASTDISTILL_BACKEND", "reference")
    assert dispatch.select("distill_loss", "auto", torch.device("cpu"), (torch.float32,)) == "reference"
    monkeypatch.setenv("FASTDISTILL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        dispatch.select("distill_loss", "auto", torch.device("cpu"), (torch.float32,))


def test_auto_uses_cpu_kernel_and_info_reports_it():
    assert dispatch.select("distill_loss", "auto", torch.device("cpu"), (torch.float32,)) == "cpu"
    report = fastdistill.info()
    assert report["extension"]["loaded"] and report["ops"]["distill_loss"]["cpu"]["cpu"] == "ok"
    assert report["auto"]["cpu"] == "cpu" and report["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_second_backward_through_same_loss_is_refused(backend, seed):
    """The saved gradient is scaled in place by the first backward; a second one must not reuse it."""
    device = backend_device(backend)
    s = make_logits((3, 40), device=device, seed=seed).requires_grad_(True)
    loss = fastdistill.distill_loss(s, make_logits((3, 40), device=device, seed=seed + 1), backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # autograd's version check
        loss.backward()
