"""fused_linear_chunks' memory and speed machinery must not change results: the reused logits workspaces, the
loss called on fewer rows than the GEMMs' chunk (its gradient gathered in the spent logits rows), and the
weight gradient written by the first chunk (beta = 0) rather than added to zeros."""
from __future__ import annotations

import pytest
import torch

from fastdistill.ops import fused_linear_chunks
from fastdistill.ops.distill_loss import loss_op
from fastdistill.ops.fused_linear_chunks import run_chunks, run_student_chunks
from fastdistill.testing import make_labels

from test_fused_linear_distill_loss import check, make_problem


def _run(p, labels, row_weights, *, chunk_size, loss_rows, softcap):
    scale = torch.tensor(0.25)
    op = loss_op("cpu")

    def loss_fn(s, t, lab, want_grad):  # jsd with hard labels: every term of the kernel's gradient
        rows, grad = op(s, t, lab, scale, 2, 1.5, 0.5, 1.0, 0.5, True, -100, want_grad)
        return rows, (grad if want_grad else None)
    return run_chunks(p["student_hidden"], p["student_weight"], p["student_bias"], p["teacher_hidden"],
                      p["teacher_weight"], p["teacher_bias"], labels, row_weights, loss_fn, logit_scale=0.7,
                      softcap=softcap, teacher_logit_scale=1.3, teacher_softcap=0.0, chunk_size=chunk_size,
                      need_grad_hidden=True, need_grad_weight=True, need_grad_bias=True, loss_rows=loss_rows)


@pytest.mark.parametrize("softcap", [0.0, 4.0])
@pytest.mark.parametrize("v_s,v_t", [(131, 127), (127, 131)])
def test_loss_rows_below_the_chunk_give_the_same_bits(seed, softcap, v_s, v_t):
    """Rows 0..9 of a 10-row chunk in loss calls of 3 rows: the same kernel rows and the same GEMM inputs, so
    bitwise the same outputs as one call per chunk; softcap's chain rule must read a call's logits before its
    gradient overwrites them, and the teacher's chunk logits must serve every call of the chunk."""
    p = make_problem(seed, n=23, v_s=v_s, v_t=v_t)
    p["student_hidden"][4] = float("nan")  # an ignored padding row: NaN must not leak through the buffer
    labels = make_labels((23,), min(v_s, v_t), seed=seed, ignore_fraction=0.2)
    labels[4] = -100
    row_weights = torch.rand(23, generator=torch.Generator().manual_seed(seed)) + 0.5
    whole = _run(p, labels, row_weights, chunk_size=10, loss_rows=10, softcap=softcap)
    split = _run(p, labels, row_weights, chunk_size=10, loss_rows=3, softcap=softcap)
    for name, a, b in zip(("rows", "d hidden", "d weight", "d bias"), whole, split):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b), name


def test_first_chunk_writes_the_weight_gradient():
    """The weight gradient starts as torch.empty (garbage, NaN under poisoning): the first chunk must write
    it, later chunks add; no rows at all must still give zeros."""
    p = make_problem(0, n=9, v_s=37, v_t=37)
    one = _run(p, None, None, chunk_size=9, loss_rows=9, softcap=0.0)[2]
    three = _run(p, None, None, chunk_size=3, loss_rows=3, softcap=0.0)[2]
    torch.testing.assert_close(three, one, rtol=1e-5, atol=1e-6)
    empty = {k: (v[:0] if k.endswith("hidden") else v) for k, v in p.items()}
    rows, gh, gw, gb = _run(empty, None, None, chunk_size=4, loss_rows=4, softcap=0.0)
    assert rows.shape == (0,) and gh.shape == (0, 12)
    assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))


def test_student_chunks_call_the_loss_on_loss_rows():
    """The loss sees rows [a, b) with b - a <= loss_rows and the logits of exactly those rows."""
    p = make_problem(1, n=11, v_s=29, v_t=29)
    seen = []

    def chunk_loss(start, end, s, labels, want_grad):
        expected = p["student_hidden"][start:end] @ p["student_weight"].t() + p["student_bias"]
        torch.testing.assert_close(s, expected, rtol=1e-5, atol=1e-5)
        seen.append((start, end))
        return s.sum(-1), torch.ones_like(s)
    rows, gh, gw, gb = run_student_chunks(
        p["student_hidden"], p["student_weight"], p["student_bias"], None, None, chunk_loss, logit_scale=1.0,
        softcap=0.0, chunk_size=5, need_grad_hidden=True, need_grad_weight=True, need_grad_bias=True, loss_rows=2)
    assert seen == [(0, 2), (2, 4), (4, 5), (5, 7), (7, 9), (9, 10), (10, 11)]
    torch.testing.assert_close(gb, torch.full((29,), 11.0))
    torch.testing.assert_close(gh, p["student_weight"].sum(0).expand(11, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_public_loss_with_small_loss_calls_matches_the_oracle(seed, reduction, monkeypatch):
    """The public op (cpu backend) with the CPU loss calls shrunk below its chunks, against the float64 oracle:
    labels, both vocabularies padded, softcap, and reduction "none" (row weights from autograd)."""
    monkeypatch.setattr(fused_linear_chunks, "LOSS_ROWS_CPU", 3)
    p = make_problem(seed, n=19, v_s=131, v_t=127)
    labels = make_labels((19,), 127, seed=seed, ignore_fraction=0.2)
    check("cpu", p, labels, seed=seed, chunk_size=8, softcap=5.0, hard_weight=0.3, divergence="jsd",
          reduction=reduction)
