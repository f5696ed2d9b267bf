"""hidden_distill_loss / HiddenDistillLoss vs float64 formulas, gradients, and bad input."""
import pytest
import torch
import torch.nn.functional as F

import fastdistill
from fastdistill import HiddenDistillLoss, hidden_distill_loss


@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 5), (0, 5)])
def test_mse_and_cosine_match_float64(shape, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g, dtype=torch.float64)
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    mse = hidden_distill_loss(s.float(), t.float())
    cos = hidden_distill_loss(s.float(), t.float(), kind="cosine")
    if s.numel() == 0:
        assert mse.item() == 0.0 and cos.item() == 0.0
        return
    want_cos = (1 - F.cosine_similarity(s.reshape(-1, 5), t.reshape(-1, 5), dim=-1)).mean()
    torch.testing.assert_close(mse.double(), ((s - t) ** 2).mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cos.double(), want_cos, rtol=1e-6, atol=1e-6)


def test_projection_gradients_and_detached_teacher(seed):
    torch.manual_seed(seed)
    loss_fn = HiddenDistillLoss(6, 9, "mse")
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 9, requires_grad=True)
    loss = loss_fn(s, t)
    loss.backward()
    w = loss_fn.projection.weight.detach().double()
    diff = s.detach().double() @ w.T - t.detach().double()
    torch.testing.assert_close(s.grad.double(), 2 * diff @ w / diff.numel(), rtol=1e-5, atol=1e-7)
    assert t.grad is None  # the teacher is frozen: no gradient flows into it
    assert loss_fn.projection.weight.grad is not None


def test_zero_rows_cosine_is_finite():
    s = torch.zeros(3, 4, requires_grad=True)
    loss = hidden_distill_loss(s, torch.zeros(3, 4), kind="cosine")
    loss.backward()
    assert loss.item() == 1.0 and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(student_h=torch.randn(2, 3), teacher_h=torch.randn(2, 4)), "projection"),
    (dict(student_h=torch.randn(2, 3), teacher_h=torch.randn(3, 3)), "teacher_h"),
    (dict(student_h=torch.ones(2, 3, dtype=torch.long), teacher_h=torch.randn(2, 3)), "student_h"),
    (dict(student_h=torch.randn(2, 3), teacher_h=torch.randn(2, 3), kind="l1"), "kind"),
])
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        hidden_distill_loss(**kwargs)


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="student_dim"):
        HiddenDistillLoss(0, 4)
    with pytest.raises(ValueError, match="project"):
        HiddenDistillLoss(3, 4, project=False)
    assert HiddenDistillLoss(4, 4).projection is None and fastdistill.HiddenDistillLoss is HiddenDistillLoss
