"""topk_distill_loss accuracy: every kernel backend vs the float64 reference, k = V vs distill_loss,
hand-computed cases, extreme logits and a tiny rest bucket."""
import itertools
import math

import pytest
import torch

import fastdistill
from conftest import KERNEL_BACKENDS, backend_device
from topk_cases import DIVERGENCES, TAILS, check_topk_against_oracle, make_topk
from fastdistill.testing import make_labels, make_logits

ALL_BACKENDS = KERNEL_BACKENDS + ["reference"]
# (labels, hard_weight): no labels; labels with ignored rows; labels + hard-label term.
LABEL_MODES = (("none", 0.0), ("ignore", 0.0), ("ignore", 0.7))
REDUCTIONS = ("batchmean", "sum", "none")
KS = (1, 7, 64)


def _combos(i):
    """Three (k, label mode, reduction) combinations per case, rotated with the case index so that
    the matrix covers every pairing without running the full product through the interpreter."""
    return [(KS[j], LABEL_MODES[(j + i) % 3], REDUCTIONS[(j + 2 * i) % 3]) for j in range(3)]


CASES = [(d, t, dt, *c) for i, (d, t, dt) in enumerate(itertools.product(
    DIVERGENCES, TAILS, (torch.float32, torch.bfloat16))) for c in _combos(i)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("divergence,tail,dtype,k,label_mode,reduction", CASES,
                         ids=[f"{d}-{t}-{str(dt)[6:]}-k{k}-{lm[0]}{lm[1]}-{r}" for d, t, dt, k, lm, r in CASES])
def test_matches_reference(backend, divergence, tail, dtype, k, label_mode, reduction, seed):
    device = backend_device(backend)
    vocab = 1271
    shape = (1 if backend == "triton" and device == "cpu" else 2, 3, vocab)  # 3-D: rows are all leading dims
    student = make_logits(shape, dtype=dtype, device=device, seed=seed)
    lp, ids = make_topk(shape, k, temperature=2.0, seed=seed + 1, device=device, dtype=torch.float16)
    labels = make_labels(shape[:-1], vocab, seed=seed, device=device) if label_mode[0] == "ignore" else None
    check_topk_against_oracle(backend, student, lp, ids, labels, seed=seed, tail=tail, divergence=divergence,
                              temperature=2.0, beta=0.3, skew=0.25, hard_weight=label_mode[1], reduction=reduction)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", (1.0, 0.5))
def test_temperatures_and_weights(backend, tail, temperature, seed):
    """T = 1 shares the bucket's softmax with the hard-label term; T != 1 gives it its own."""
    device = backend_device(backend)
    student = make_logits((9, 517), device=device, seed=seed)
    lp, ids = make_topk((9, 517), 20, temperature=temperature, seed=seed + 1, device=device)
    labels = make_labels((9,), 517, seed=seed, device=device)
    for divergence in ("kl", "jsd", "skew_reverse_kl"):
        check_topk_against_oracle(backend, student, lp, ids, labels, seed=seed, tail=tail, divergence=divergence,
                                  temperature=temperature, soft_weight=0.6, hard_weight=0.4, beta=0.8, skew=0.6,
                                  scale_t2=temperature != 1.0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("sdt,lpdt,idt", [(torch.float16, torch.float16, torch.int32),
                                          (torch.float32, torch.float16, torch.int32),
                                          (torch.bfloat16, torch.float32, torch.int64)])
def test_dtypes(backend, sdt, lpdt, idt, seed):
    device = backend_device(backend)
    student = make_logits((5, 999), dtype=sdt, device=device, seed=seed)
    lp, ids = make_topk((5, 999), 33, temperature=2.0, seed=seed + 1, device=device, dtype=lpdt, index_dtype=idt)
    labels = make_labels((5,), 999, seed=seed, device=device)
    for tail in TAILS:
        _, grad = check_topk_against_oracle(backend, student, lp, ids, labels, seed=seed, tail=tail,
                                            temperature=2.0, hard_weight=0.5, reduction="sum")
        assert grad.dtype == sdt


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_ids_equals_distill_loss(backend, tail, divergence, seed):
    """k = V (all ids, shuffled): both tails are distill_loss on the full teacher logits."""
    device = backend_device(backend)
    V, T = 97, 2.0
    student = make_logits((2, 3, V), device=device, seed=seed)
    teacher = make_logits((2, 3, V), device=device, seed=seed + 1)
    order = torch.rand((2, 3, V), generator=torch.Generator().manual_seed(seed)).argsort(-1).to(device)
    lp = torch.log_softmax(teacher / T, -1).gather(-1, order)
    labels = make_labels((2, 3), V, seed=seed, device=device)
    options = dict(divergence=divergence, temperature=T, beta=0.3, skew=0.25, labels=labels, hard_weight=0.3,
                   backend=backend)
    x, y = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    ours = fastdistill.topk_distill_loss(x, lp, order, tail=tail, **options)
    theirs = fastdistill.distill_loss(y, teacher, **options)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=2e-6 * y.grad.abs().max().item())


# V = 4, k = 2, T = 1: student z = [1, 2, 0, -1]; teacher top-2: p = 0.6 at id 1, 0.3 at id 0 (p_rest = 0.1).
HAND_Z = [1.0, 2.0, 0.0, -1.0]
HAND_LP, HAND_IDS = [math.log(0.6), math.log(0.3)], [1, 0]
# renormalize: p~ = (2/3, 1/3), q~ = softmax(2, 1) = (0.7310586, 0.2689414) at ids (1, 0);
# KL = 2/3 ln(0.6666667 / 0.7310586) + 1/3 ln(0.3333333 / 0.2689414); dKL/dz_id = q~ - p~.
HAND_RENORM = (0.6666667 * math.log(0.6666667 / 0.7310586) + 0.3333333 * math.log(0.3333333 / 0.2689414),
               [0.2689414 - 0.3333333, 0.7310586 - 0.6666667, 0.0, 0.0])
# bucket: q = softmax(z) = (0.2368828, 0.6439142, 0.0871443, 0.0320586); q_rest = 0.1192029;
# KL = 0.6 ln(0.6 / 0.6439142) + 0.3 ln(0.3 / 0.2368828) + 0.1 ln(0.1 / 0.1192029);
# gradient: q_i - p_i at the ids, q_j (1 - p_rest / q_rest) on the rest.
HAND_BUCKET = (0.6 * math.log(0.6 / 0.6439142) + 0.3 * math.log(0.3 / 0.2368828) + 0.1 * math.log(0.1 / 0.1192029),
               [0.2368828 - 0.3, 0.6439142 - 0.6, 0.0871443 * (1 - 0.1 / 0.1192029),
                0.0320586 * (1 - 0.1 / 0.1192029)])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("tail,expected", [("renormalize", HAND_RENORM), ("bucket", HAND_BUCKET)])
def test_hand_computed(backend, tail, expected):
    device = backend_device(backend)
    z = torch.tensor([HAND_Z], device=device, requires_grad=True)
    loss = fastdistill.topk_distill_loss(z, torch.tensor([HAND_LP], device=device),
                                         torch.tensor([HAND_IDS], device=device), tail=tail, backend=backend)
    loss.backward()
    assert abs(loss.item() - expected[0]) < 2e-6
    torch.testing.assert_close(z.grad, torch.tensor([expected[1]], device=device), rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_and_masked_logits(backend, tail, divergence, seed):
    """±1e4 student logits; -inf student entries, with p = 0 wherever a top-k id has q = 0. The
    teacher is extreme too for renormalize; not for bucket, whose p_rest would then be pure rounding
    noise (1 - sum p_i of log-probs rounded to fp32), which reverse divergences blow up to inf."""
    device = backend_device(backend)
    rows = 4 if backend == "triton" and device == "cpu" else 7  # the interpreter is slow
    for kind in ("extreme", "neginf"):
        student = make_logits((rows, 333), device=device, seed=seed, kind=kind)
        teacher_kind = "extreme" if kind == "extreme" and tail == "renormalize" else "normal"
        lp, ids = make_topk((rows, 333), 16, seed=seed + 1, device=device, kind=teacher_kind)
        lp = torch.where(torch.isneginf(student.gather(-1, ids)), float("-inf"), lp)
        labels = make_labels((rows,), 333, seed=seed, device=device)
        labels = torch.where(torch.isneginf(student.gather(1, labels.clamp(min=0)[:, None]))[:, 0], -100, labels)
        out, grad = check_topk_against_oracle(backend, student, lp, ids, labels, seed=seed, tail=tail,
                                              divergence=divergence, hard_weight=0.3, reduction="none")
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("spike", (20.0, 1e4))
def test_bucket_tiny_rest(backend, spike, seed):
    """The student puts almost all its mass on the k ids: q_rest ~ 1e-8 (spike 20), or underflows
    fp32 around the row max (spike 1e4). The rest bucket's loss term and its gradient, of order
    p_rest on the rest entries, must still match float64: no 1 - sum(q_i) cancellation."""
    device = backend_device(backend)
    shape = (3, 411) if backend == "triton" and device == "cpu" else (6, 1271)  # the interpreter is slow
    student = make_logits(shape, device=device, seed=seed, scale=1.0)
    lp, ids = make_topk(shape, 64, seed=seed + 1, device=device, scale=1.0)
    student = student.scatter_add(-1, ids, torch.full(ids.shape, spike, device=device))
    for divergence in ("kl", "reverse_kl", "jsd"):
        check_topk_against_oracle(backend, student, lp, ids, seed=seed, tail="bucket", divergence=divergence,
                                  reduction="none")
        grads = []
        for x, lpx, name in ((student, lp, backend), (student.double(), lp.double(), "reference")):
            x = x.clone().requires_grad_(True)
            loss = fastdistill.topk_distill_loss(x, lpx, ids, tail="bucket", divergence=divergence, reduction="sum",
                                                 backend=name)
            grads.append(torch.autograd.grad(loss, x)[0])
        grad, g64 = grads
        rest = torch.ones_like(student, dtype=torch.bool).scatter(-1, ids, False)
        rel = ((grad.double() - g64).abs() / g64.abs().clamp(min=1e-300))[rest]
        assert rel.max() < 1e-4, f"{divergence}: rest gradient relative error {rel.max():.2e}"
