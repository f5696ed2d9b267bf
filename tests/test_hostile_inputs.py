"""Hostile and odd inputs through the loss ops on every CPU-testable backend: each case must either raise
a ValueError/TypeError whose message starts with the argument's name on every backend, or give the same
losses and gradients (same NaN pattern) on every backend. A mixed outcome is a defect."""
import math
import re

import pytest
import torch

import fastdistill
from fastdistill.dispatch import BackendError

BACKENDS = ["cpu", "triton", "reference"]
DIVERGENCES = ["kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "mse"]
NAMED = re.compile(r"^[a-z_][a-z0-9_]*: ")


def _logits(shape, seed, scale=3.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _case(name):
    """(student, teacher, labels, options) for a named case."""
    s, t = _logits((5, 13), 1), _logits((5, 13), 2)
    labels, opts = None, {}
    if name == "normal":
        labels, opts = torch.tensor([0, 3, -100, 12, 5]), {"hard_weight": 0.5}
    elif name == "v1":
        s, t = s[:, :1].contiguous(), t[:, :1].contiguous()
    elif name == "no_rows":
        s, t = s[:0], t[:0]
    elif name == "nan_teacher":
        t[1, 4] = math.nan
    elif name == "nan_student":
        s[0, 0] = math.nan
    elif name == "nan_ignored_row":
        t[2, 1] = math.nan
        labels = torch.tensor([0, 3, -100, 12, 5])
    elif name == "posinf_teacher":
        t[3, 2] = math.inf
    elif name == "neginf_columns":
        s[:, -3:] = -math.inf
        t[:, -3:] = -math.inf
    elif name == "neginf_teacher_only":
        t[:, 5:] = -math.inf
    elif name == "extreme":
        s[:, ::3] = 1e4
        t[:, 1::4] = -1e4
    elif name == "all_ignored":
        labels, opts = torch.full((5,), -100), {"hard_weight": 0.7}
    elif name == "strided_labels":
        labels = torch.tensor([[0, 1], [3, 1], [-100, 1], [12, 1], [5, 1]])[:, 0]
        opts = {"hard_weight": 0.5}
    elif name == "expanded_teacher":
        t = t[:1].expand(5, 13)
    elif name == "transposed_student":
        s = _logits((13, 5), 3).t()
    elif name == "three_d":
        s, t = s.view(1, 5, 13), t.view(1, 5, 13)
    elif name == "label_out_of_range":
        labels = torch.tensor([0, 13, -100, 1, 2])
    elif name == "label_negative":
        labels, opts = torch.tensor([0, -7, -100, 1, 2]), {"hard_weight": 0.2}
    elif name == "int32_labels":
        labels, opts = torch.tensor([0, 3, -100, 12, 5], dtype=torch.int32), {"hard_weight": 0.5}
    elif name == "temperature_high":
        opts = {"temperature": 100.0}
    elif name == "temperature_too_high":
        opts = {"temperature": 1e3}
    elif name == "temperature_tiny":
        opts = {"temperature": 1e-3}
    elif name == "num_items_tensor":
        opts = {"num_items": torch.tensor(7)}
    elif name == "bf16":
        s, t = s.bfloat16(), t.bfloat16()
    else:
        raise AssertionError(name)
    return s, t, labels, opts


CASES = ["normal", "v1", "no_rows", "nan_teacher", "nan_student", "nan_ignored_row", "posinf_teacher",
         "neginf_columns", "neginf_teacher_only", "extreme", "all_ignored", "strided_labels", "expanded_teacher",
         "transposed_student", "three_d", "label_out_of_range", "label_negative", "int32_labels",
         "temperature_high", "temperature_too_high", "temperature_tiny", "num_items_tensor", "bf16"]


def _outcome(fn):
    """("error", type name) for a named ValueError/TypeError, ("value", loss, grad) otherwise."""
    try:
        loss, grad = fn()
    except (ValueError, TypeError) as e:
        assert NAMED.match(str(e)), f"error does not name the argument: {type(e).__name__}: {e}"
        return ("error", type(e).__name__)
    return ("value", loss, grad)


def _run_distill(case, divergence, backend):
    s, t, labels, opts = _case(case)
    s = s.clone().requires_grad_()
    loss = fastdistill.distill_loss(s, t, labels=labels, divergence=divergence, reduction="none",
                                    backend=backend, **opts)
    loss.sum().backward()
    return loss.detach().float(), s.grad.float()


def _run_topk(case, divergence, backend):
    s, t, labels, opts = _case(case)
    if s.shape[-1] < 4 or case in ("neginf_teacher_only",):  # top-k of a masked teacher: covered below
        k = min(3, s.shape[-1])
    else:
        k = 4
    lp, ids = torch.log_softmax(t.float(), -1).topk(k)
    s = s.clone().requires_grad_()
    loss = fastdistill.topk_distill_loss(s, lp, ids, labels=labels, divergence=divergence, reduction="none",
                                         backend=backend, **opts)
    loss.sum().backward()
    return loss.detach().float(), s.grad.float()


def _same(a, b, dtype, case):
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-4, atol=2e-5)
    if case == "extreme":  # ±1e4 logits: one float32 ulp of a logit is ~1e-3, relative to the largest value
        tol["atol"] = 1e-3 * float(b[torch.isfinite(b)].abs().max()) if torch.isfinite(b).any() else 0.0
    assert torch.equal(torch.isnan(a), torch.isnan(b)), "NaN pattern differs"
    fin = torch.isfinite(a) & torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), torch.isfinite(b)) and torch.equal(a[~torch.isfinite(a) & ~torch.isnan(a)],
                                                                             b[~torch.isfinite(b) & ~torch.isnan(b)])
    torch.testing.assert_close(a[fin], b[fin], **tol)


def _check_consistent(run, case, divergence):
    outcomes = {}
    for backend in BACKENDS:
        try:
            outcomes[backend] = _outcome(lambda: run(case, divergence, backend))
        except BackendError:  # this backend does not take these dtypes: nothing to compare
            continue
    kinds = {o[0] for o in outcomes.values()}
    summary = {b: o[:2] if o[0] == "error" else "value" for b, o in outcomes.items()}
    assert len(kinds) == 1, f"mixed outcomes: {summary}"
    if kinds == {"error"}:
        assert len({o[1] for o in outcomes.values()}) == 1, outcomes
        return
    dtype = _case(case)[0].dtype
    ref = outcomes["reference"]
    for backend, o in outcomes.items():
        for what, a, b in (("loss", o[1], ref[1]), ("grad", o[2], ref[2])):
            try:
                _same(a, b, dtype, case)
            except AssertionError as e:
                raise AssertionError(f"{backend} vs reference, {what}: {e}") from None


def _divergences(default, pool):
    """The default run checks `default`; the rest of `pool` is marked slow (the interpreter is slow)."""
    return [d if d in default else pytest.param(d, marks=pytest.mark.slow) for d in pool]


@pytest.mark.parametrize("divergence", _divergences(("kl", "jsd", "mse"), DIVERGENCES))
@pytest.mark.parametrize("case", CASES)
def test_distill_loss_backends_agree(case, divergence):
    _check_consistent(_run_distill, case, divergence)


@pytest.mark.parametrize("divergence", _divergences(("reverse_kl", "tvd"), DIVERGENCES[:-1]))
@pytest.mark.parametrize("case", [c for c in CASES if c not in ("expanded_teacher",)])
def test_topk_distill_loss_backends_agree(case, divergence):
    _check_consistent(_run_topk, case, divergence)
