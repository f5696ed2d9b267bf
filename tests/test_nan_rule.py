"""The NaN rule of the distillation losses, the same on every backend (reference, cpu, triton):
a row with NaN or +inf (softmax undefined) in an input its loss reads gets a NaN loss and an all-NaN
gradient row, for every divergence and top-k tail, with or without the hard-label term; -inf is a
masked token (probability 0); rows whose label is ignore_index are exact zeros whatever they hold.
Top-k reads the k log-probs, the student logits at the ids, and the whole student row only for the
bucket tail or the hard-label term. Before the rule, one NaN teacher entry gave 0 or a finite loss
that differed between backends (kl, jsd, skew_*), and mse poisoned one gradient entry only."""
from __future__ import annotations

import math

import pytest
import torch

import fastdistill
from fastdistill.reference import distill_loss_ref, fused_linear_distill_loss_ref
from fastdistill.reference.topk_distill_loss import topk_distill_loss_ref

from distill_cases import DIVERGENCES
from topk_cases import make_topk

BACKENDS = ("reference", "cpu", "triton")
NAN, INF = math.nan, math.inf
IGNORE = -100


def _rows_and_grad(fn, student):
    """Per-row losses (reduction="none") and d(sum of rows)/d(student)."""
    s = student.detach().requires_grad_(True)
    rows = fn(s)
    (grad,) = torch.autograd.grad(rows.sum(), s)
    return rows.detach(), grad


def _check_rule(rows, grad, poisoned, ignored, oracle_rows, oracle_grad, tag):
    """poisoned rows: NaN loss and all-NaN gradient; ignored rows: exact zeros; the others finite and
    close to the float64 oracle."""
    clean = ~(poisoned | ignored)
    assert torch.isnan(rows[poisoned]).all(), f"{tag}: poisoned rows {rows[poisoned]}"
    assert torch.isnan(grad[poisoned]).all(), f"{tag}: poisoned gradient rows not all NaN"
    assert torch.all(rows[ignored] == 0) and torch.all(grad[ignored] == 0), f"{tag}: ignored rows not zero"
    assert torch.isfinite(rows[clean]).all() and torch.isfinite(grad[clean]).all(), f"{tag}: clean rows"
    torch.testing.assert_close(rows[clean].double(), oracle_rows[clean], rtol=1e-4, atol=1e-5, msg=tag)
    torch.testing.assert_close(grad[clean].double(), oracle_grad[clean], rtol=1e-4, atol=1e-5, msg=tag)


def _distill_inputs(V, with_ignored, dtype=torch.float32, far=None, masked=True):
    """Rows: 0 clean; 1 NaN teacher; 2 NaN student; 3 +inf teacher; 4 +inf student; 5 clean with -inf
    (masked tokens of a padded vocabulary) in both when `masked` (not for mse, which compares raw
    logits); 6 (with labels) ignored, holding NaN and +inf. `far`: the position of the poison (default:
    one inside the first block)."""
    g = torch.Generator().manual_seed(11)
    n = 7 if with_ignored else 6
    s = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    j = 5 if far is None else far
    t[1, j], s[2, j], t[3, j], s[4, j] = NAN, NAN, INF, INF
    if masked:
        s[5, [1, 7]], t[5, [1, 7]] = -INF, -INF
    if with_ignored:
        s[6, 2], t[6, 3], s[6, 4] = NAN, INF, INF
    poisoned = torch.tensor([False, True, True, True, True, False] + [False] * (n - 6))
    ignored = torch.tensor([False] * 6 + [True] * (n - 6))
    labels = torch.randint(0, V, (n,), generator=g)
    labels[ignored] = IGNORE
    labels[5] = 0  # not a masked (-inf) token: the hard-label term stays finite
    return s.to(dtype), t.to(dtype), labels, poisoned, ignored


# (labels, hard_weight, temperature): no labels; labels without and with the hard-label term
# (T = 2: the kernels' own softmax of the raw student for the hard term).
LABEL_CASES = [(False, 0.0, 1.0), pytest.param(True, 0.0, 1.0, marks=pytest.mark.slow), (True, 0.5, 2.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("with_labels,hard_weight,temperature", LABEL_CASES)
def test_distill_loss_nan_rule(backend, divergence, with_labels, hard_weight, temperature):
    s, t, labels, poisoned, ignored = _distill_inputs(37, with_labels, masked=divergence != "mse")
    opts = dict(divergence=divergence, temperature=temperature, hard_weight=hard_weight, ignore_index=IGNORE)
    lab = labels if with_labels else None
    rows, grad = _rows_and_grad(
        lambda x: fastdistill.distill_loss(x, t, labels=lab, reduction="none", backend=backend, **opts), s)
    o_rows, o_grad = _rows_and_grad(lambda x: distill_loss_ref(x, t.double(), lab, reduction="none", **opts),
                                    s.double())
    _check_rule(rows, grad, poisoned, ignored, o_rows, o_grad, f"{backend} {opts} labels={with_labels}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "jsd", "mse"])
def test_distill_loss_nan_rule_later_block_and_bf16(backend, divergence):
    """The poison sits past the first BLOCK_V chunk (1024 interpreted): the flag survives chunk merges
    (the online-softmax sum stays NaN); bf16 logits and gradients (widened rows on cpu)."""
    s, t, labels, poisoned, ignored = _distill_inputs(1100, True, dtype=torch.bfloat16, far=1090,
                                                      masked=divergence != "mse")
    opts = dict(divergence=divergence, hard_weight=0.5, temperature=2.0, ignore_index=IGNORE)
    rows, grad = _rows_and_grad(
        lambda x: fastdistill.distill_loss(x, t, labels=labels, reduction="none", backend=backend, **opts), s)
    assert grad.dtype == torch.bfloat16
    assert torch.isnan(rows[poisoned]).all() and torch.isnan(grad[poisoned]).all(), f"{backend} {divergence}"
    assert torch.all(rows[ignored] == 0) and torch.all(grad[ignored] == 0)
    clean = ~(poisoned | ignored)
    assert torch.isfinite(rows[clean]).all() and torch.isfinite(grad[clean]).all()


def _topk_inputs(V=41, k=6):
    """Rows: 0 clean; 1 NaN log-prob; 2 +inf log-prob; 3 NaN student at an id; 4 +inf student at an id;
    5 NaN and +inf student outside the ids (poisoned only when the whole row is read); 6 clean with a
    -inf log-prob and student logit at one id and a -inf student logit outside the ids; 7 ignored,
    holding NaN everywhere."""
    n = 8
    g = torch.Generator().manual_seed(5)
    s = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    lp, ids = make_topk((n, V), k, seed=3, dtype=torch.float64)
    lp[1, 2], lp[2, 4], lp[6, 1] = NAN, INF, -INF
    s[3, ids[3, 0]], s[4, ids[4, 3]], s[6, ids[6, 1]] = NAN, INF, -INF  # row 6: p = q = 0 at that id
    outside = [v for v in range(V) if v not in ids[5].tolist() and v not in ids[6].tolist()]
    s[5, outside[0]], s[5, outside[1]], s[6, outside[2]] = NAN, INF, -INF
    s[7], lp[7] = NAN, NAN
    labels = torch.randint(0, V, (n,), generator=g)
    labels[7] = IGNORE
    labels[6] = ids[6, 0]  # a finite logit: the hard-label term stays finite
    return s.float(), lp.float(), ids, labels


# Every divergence without the hard-label term; with it, two by default (the flag does not depend on it).
TOPK_CASES = [(d, 0.0) for d in DIVERGENCES[:-1]] + [
    (d, 0.5) if d in ("kl", "jsd") else pytest.param(d, 0.5, marks=pytest.mark.slow) for d in DIVERGENCES[:-1]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,hard_weight", TOPK_CASES)
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_topk_nan_rule(backend, divergence, tail, hard_weight):
    s, lp, ids, labels = _topk_inputs()
    whole_row = tail == "bucket" or hard_weight != 0.0
    poisoned = torch.tensor([False, True, True, True, True, whole_row, False, False])
    ignored = labels == IGNORE
    opts = dict(tail=tail, divergence=divergence, temperature=2.0, hard_weight=hard_weight, ignore_index=IGNORE)
    rows, grad = _rows_and_grad(lambda x: fastdistill.topk_distill_loss(
        x, lp, ids, labels=labels, reduction="none", backend=backend, **opts), s)
    o_rows, o_grad = _rows_and_grad(lambda x: topk_distill_loss_ref(
        x, lp.double(), ids, labels, reduction="none", **opts), s.double())
    _check_rule(rows, grad, poisoned, ignored, o_rows, o_grad, f"{backend} {opts}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_nan_rule_without_labels(backend):
    """No labels: every row counts (the Triton kernel's HAS_LABELS=False path)."""
    s, lp, ids, _ = _topk_inputs()
    s, lp, ids = s[:7], lp[:7], ids[:7]
    poisoned = torch.tensor([False, True, True, True, True, True, False])
    for tail in ("renormalize", "bucket"):
        rows, grad = _rows_and_grad(lambda x: fastdistill.topk_distill_loss(
            x, lp, ids, tail=tail, divergence="jsd", reduction="none", backend=backend), s)
        poisoned[5] = tail == "bucket"
        o_rows, o_grad = _rows_and_grad(lambda x: topk_distill_loss_ref(
            x, lp.double(), ids, tail=tail, divergence="jsd", reduction="none"), s.double())
        _check_rule(rows, grad, poisoned, torch.zeros_like(poisoned), o_rows, o_grad, f"{backend} {tail}")


def _fused_problem(n=9, h=8, v=29, pad=3):
    g = torch.Generator().manual_seed(2)
    # The teacher's vocabulary, `pad` smaller, is padded with -inf logits (masked tokens, p = 0).
    p = dict(student_hidden=torch.randn(n, h, generator=g), student_weight=torch.randn(v, h, generator=g) * 0.5,
             teacher_hidden=torch.randn(n, h, generator=g), teacher_weight=torch.randn(v - pad, h, generator=g) * 0.5)
    p["student_hidden"][2, 1] = NAN
    p["teacher_hidden"][4, 0] = NAN
    p["student_hidden"][6, 3] = INF  # logits of both signs of infinity: NaN after the GEMM's sums or not
    p["student_hidden"][6, 4] = -INF
    return p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "skew_reverse_kl", "mse"])
def test_fused_linear_nan_hidden_gives_nan_rows(backend, divergence):
    """NaN in a student or teacher hidden state makes that token's logits NaN, hence its loss and its
    d(hidden) row NaN; the other rows are unaffected. The weight gradient mixes all rows: NaN."""
    p = _fused_problem(pad=0 if divergence == "mse" else 3)  # mse needs equal vocabularies
    labels = torch.arange(9) % 29
    poisoned = torch.zeros(9, dtype=torch.bool)
    poisoned[[2, 4, 6]] = True
    opts = dict(divergence=divergence, hard_weight=0.5, temperature=2.0, reduction="none")
    sh = p["student_hidden"].requires_grad_(True)
    sw = p["student_weight"].requires_grad_(True)
    rows = fastdistill.fused_linear_distill_loss(sh, sw, p["teacher_hidden"], p["teacher_weight"], labels=labels,
                                                 chunk_size=4, backend=backend, **opts)
    gh, gw = torch.autograd.grad(rows.sum(), [sh, sw])
    assert torch.isnan(rows[poisoned]).all() and torch.isfinite(rows[~poisoned]).all(), rows
    assert torch.isnan(gh[poisoned]).all() and torch.isfinite(gh[~poisoned]).all()
    assert torch.isnan(gw).all()
    x64 = {k: v.detach().double().requires_grad_(k == "student_hidden") for k, v in p.items()}
    oracle = fused_linear_distill_loss_ref(**x64, labels=labels, **opts)
    (gh64,) = torch.autograd.grad(oracle.sum(), [x64["student_hidden"]])
    torch.testing.assert_close(rows[~poisoned].double(), oracle[~poisoned], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gh[~poisoned].double(), gh64[~poisoned], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fused_linear_nan_in_ignored_row(backend, reduction, softcap):
    """An ignored token whose hidden state holds NaN or inf: its loss and its d(hidden) row are exact zeros,
    the other rows keep their values, and the weight gradient is what it is with those rows zeroed (the
    ignored rows must not reach it as 0 · NaN, nor through softcap's chain rule)."""
    p = _fused_problem()
    labels = torch.arange(9) % 29
    labels[[2, 4, 6]] = IGNORE
    opts = dict(labels=labels, chunk_size=4, backend=backend, reduction=reduction, divergence="jsd", softcap=softcap)
    sh = p["student_hidden"].requires_grad_(True)
    sw = p["student_weight"].requires_grad_(True)
    rows = fastdistill.fused_linear_distill_loss(sh, sw, p["teacher_hidden"], p["teacher_weight"], **opts)
    gh, gw = torch.autograd.grad(rows.sum(), [sh, sw])
    ignored = labels == IGNORE
    if reduction == "none":
        assert torch.all(rows[ignored] == 0)
    assert torch.all(gh[ignored] == 0)
    assert torch.isfinite(rows).all() and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    clean = {k: torch.where(ignored.unsqueeze(-1), 0.0, v.detach()) if k.endswith("hidden") else v.detach()
             for k, v in p.items()}
    sw2 = clean["student_weight"].requires_grad_(True)
    want = fastdistill.fused_linear_distill_loss(clean["student_hidden"], sw2, clean["teacher_hidden"],
                                                 clean["teacher_weight"], **opts)
    (gw_want,) = torch.autograd.grad(want.sum(), [sw2])
    torch.testing.assert_close(gw, gw_want, rtol=1e-6, atol=1e-7)
