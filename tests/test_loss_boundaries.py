"""Issue 11 boundaries of the loss ops: strided labels, the temperature bound, label values, ignore_index
type, empty fused input on the reference, float64 top-k log-probs, hidden_distill_loss eps."""
import importlib

import pytest
import torch

import fastdistill
from conftest import KERNEL_BACKENDS
from fastdistill.ops.loss_common import MAX_TEMPERATURE
from fastdistill.reference.distill_loss import distill_loss_ref
from fastdistill.testing import make_labels, make_logits

ALL = KERNEL_BACKENDS + ["reference"]


def _strided_labels(n, V, seed):
    """The same labels twice: a contiguous tensor and a strided column of a 2-column tensor."""
    labels = make_labels((n,), V, seed=seed)
    wide = torch.stack([labels, torch.randint(0, V, (n,))], dim=1)  # column 0 is labels, stride 2
    return labels, wide[:, 0]


@pytest.mark.parametrize("backend", ALL)
def test_strided_labels_distill_loss(backend, seed):
    s, t = make_logits((9, 37), seed=seed), make_logits((9, 37), seed=seed + 1)
    labels, column = _strided_labels(9, 37, seed)
    assert not column.is_contiguous()
    opts = dict(hard_weight=0.5, reduction="none", backend=backend)
    expect = fastdistill.distill_loss(s, t, labels=labels, **opts)
    torch.testing.assert_close(fastdistill.distill_loss(s, t, labels=column, **opts), expect, rtol=0, atol=0)
    expanded = torch.tensor(3).expand(9)  # stride 0
    torch.testing.assert_close(fastdistill.distill_loss(s, t, labels=expanded, **opts),
                               fastdistill.distill_loss(s, t, labels=torch.full((9,), 3), **opts), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL)
def test_strided_labels_fused_linear_and_topk(backend, seed):
    g = torch.Generator().manual_seed(seed)
    hs, ws = torch.randn(9, 8, generator=g), torch.randn(37, 8, generator=g)
    ht, wt = torch.randn(9, 8, generator=g), torch.randn(37, 8, generator=g)
    labels, column = _strided_labels(9, 37, seed)
    opts = dict(hard_weight=0.5, reduction="none", backend=backend)
    torch.testing.assert_close(fastdistill.fused_linear_distill_loss(hs, ws, ht, wt, labels=column, **opts),
                               fastdistill.fused_linear_distill_loss(hs, ws, ht, wt, labels=labels, **opts),
                               rtol=0, atol=0)
    s = make_logits((9, 37), seed=seed)
    lp, ids = torch.log_softmax(make_logits((9, 37), seed=seed + 1), -1).topk(5)
    torch.testing.assert_close(fastdistill.topk_distill_loss(s, lp, ids, labels=column, **opts),
                               fastdistill.topk_distill_loss(s, lp, ids, labels=labels, **opts), rtol=0, atol=0)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "skew_kl"])
def test_temperature_at_the_bound_is_accurate(divergence, seed):
    s, t = make_logits((4, 1000), seed=seed), make_logits((4, 1000), seed=seed + 1)
    exact = distill_loss_ref(s.double(), t.double(), divergence=divergence, temperature=MAX_TEMPERATURE)
    got = fastdistill.distill_loss(s, t, divergence=divergence, temperature=MAX_TEMPERATURE, backend="cpu")
    assert abs(got.item() - exact.item()) <= 1e-3 * abs(exact.item()) + 1e-6


@pytest.mark.parametrize("call", ["distill_loss", "topk_distill_loss", "fused_linear_distill_loss", "module"])
def test_temperature_above_the_bound_raises(call):
    s, t = torch.randn(2, 11), torch.randn(2, 11)
    lp, ids = torch.log_softmax(t, -1).topk(3)
    h, w = torch.randn(2, 4), torch.randn(11, 4)
    calls = {"distill_loss": lambda: fastdistill.distill_loss(s, t, temperature=1e3),
             "topk_distill_loss": lambda: fastdistill.topk_distill_loss(s, lp, ids, temperature=1e4),
             "fused_linear_distill_loss": lambda: fastdistill.fused_linear_distill_loss(h, w, h, w, temperature=101),
             "module": lambda: fastdistill.DistillLoss(temperature=1e3)}
    with pytest.raises(ValueError, match="temperature: .* above 100"):
        calls[call]()
    # mse has no temperature: any value is accepted
    fastdistill.distill_loss(s, t, divergence="mse", temperature=1e4)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("hard_weight", [0.0, 0.5])
@pytest.mark.parametrize("bad", [11, -1, 10**6])
def test_labels_outside_the_vocabulary_raise(backend, hard_weight, bad):
    s, t = torch.randn(3, 11), torch.randn(3, 11)
    labels = torch.tensor([0, bad, -100])
    with pytest.raises(ValueError, match=f"labels: value {bad} at row 1 is neither ignore_index"):
        fastdistill.distill_loss(s, t, labels=labels, hard_weight=hard_weight, backend=backend)
    lp, ids = torch.log_softmax(t, -1).topk(3)
    with pytest.raises(ValueError, match="labels: value"):
        fastdistill.topk_distill_loss(s, lp, ids, labels=labels, hard_weight=hard_weight, backend=backend)
    h, w = torch.randn(3, 4), torch.randn(11, 4)
    with pytest.raises(ValueError, match="labels: value"):
        fastdistill.fused_linear_distill_loss(h, w, h, w, labels=labels, hard_weight=hard_weight, backend=backend)


@pytest.mark.parametrize("ignore_index,exc", [(None, TypeError), (-100.0, TypeError), (True, TypeError),
                                              ("-100", TypeError)])
def test_ignore_index_must_be_an_int(ignore_index, exc):
    s, t = torch.randn(3, 11), torch.randn(3, 11)
    with pytest.raises(exc, match="ignore_index: expected an int"):
        fastdistill.distill_loss(s, t, labels=torch.tensor([0, 1, 2]), ignore_index=ignore_index)
    with pytest.raises(exc, match="ignore_index: expected an int"):
        fastdistill.DistillLoss(ignore_index=ignore_index)
    with pytest.raises(exc, match="ignore_index: expected an int"):
        fastdistill.FusedLinearDistillLoss(ignore_index=ignore_index)


@pytest.mark.parametrize("backend", ALL)
def test_fused_linear_no_tokens_keeps_the_graph(backend):
    hs = torch.randn(0, 8, requires_grad=True)
    ws = torch.randn(13, 8, requires_grad=True)
    loss = fastdistill.fused_linear_distill_loss(hs, ws, torch.randn(0, 8), torch.randn(13, 8), backend=backend)
    assert loss.grad_fn is not None and loss.item() == 0.0
    loss.backward()
    assert torch.equal(ws.grad, torch.zeros_like(ws)) and hs.grad.shape == (0, 8)


@pytest.mark.parametrize("backend", ALL)
def test_topk_accepts_float64_logprobs(backend, seed):
    s = make_logits((5, 29), seed=seed).requires_grad_()
    lp, ids = torch.log_softmax(make_logits((5, 29), seed=seed + 1).double(), -1).topk(4)
    got = fastdistill.topk_distill_loss(s, lp, ids, backend=backend)
    want = fastdistill.topk_distill_loss(s, lp.float(), ids, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, check_dtype=False)  # reference: float64
    got.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("eps", [-1.0, 0.0, float("nan")])
def test_hidden_distill_loss_eps_must_be_positive(eps):
    with pytest.raises(ValueError, match="eps: must"):
        fastdistill.hidden_distill_loss(torch.randn(2, 4), torch.randn(2, 4), kind="cosine", eps=eps)


def _shifted(seed, B=3, S=6, V=41):
    """Causal-LM shapes: logits[:, :-1] against labels[:, 1:] (two leading strides, not flattenable)."""
    s_full = make_logits((B, S, V), seed=seed).requires_grad_()
    t_full = make_logits((B, S, V), seed=seed + 1)
    labels = make_labels((B, S), V, seed=seed)
    return s_full, t_full, labels


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_shifted_causal_lm_logits_are_not_copied(backend, seed, monkeypatch):
    dl = importlib.import_module("fastdistill.ops.distill_loss")  # the package attribute is the function

    s_full, t_full, labels = _shifted(seed)
    seen = []
    real = dl.loss_op

    def spy(name):
        op = real(name)

        def call(student, teacher, *rest):
            seen.append((student.untyped_storage().data_ptr(), teacher.untyped_storage().data_ptr()))
            return op(student, teacher, *rest)
        return call

    monkeypatch.setattr(dl, "loss_op", spy)
    opts = dict(hard_weight=0.3, divergence="jsd", backend=backend)
    loss = fastdistill.distill_loss(s_full[:, :-1], t_full[:, :-1], labels=labels[:, 1:], **opts)
    assert seen and all(p == (s_full.untyped_storage().data_ptr(), t_full.untyped_storage().data_ptr())
                        for p in seen), "the kernels got copies of the logits"
    loss.backward()
    grad = s_full.grad.clone()
    s_full.grad = None
    monkeypatch.setattr(dl, "loss_op", real)
    want = fastdistill.distill_loss(s_full[:, :-1].contiguous(), t_full[:, :-1].contiguous(),
                                    labels=labels[:, 1:].contiguous(), **opts)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, s_full.grad, rtol=0, atol=0)
    assert torch.equal(grad[:, -1], torch.zeros_like(grad[:, -1]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_shifted_causal_lm_topk(backend, reduction, seed):
    s_full, t_full, labels = _shifted(seed)
    lp, ids = torch.log_softmax(t_full, -1).topk(5)
    opts = dict(hard_weight=0.3, reduction=reduction, backend=backend)
    got = fastdistill.topk_distill_loss(s_full[:, :-1], lp[:, :-1], ids[:, :-1], labels=labels[:, 1:], **opts)
    got.sum().backward()
    grad, s_full.grad = s_full.grad.clone(), None
    want = fastdistill.topk_distill_loss(s_full[:, :-1].contiguous(), lp[:, :-1].contiguous(),
                                         ids[:, :-1].contiguous(), labels=labels[:, 1:].contiguous(), **opts)
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, s_full.grad, rtol=0, atol=0)
