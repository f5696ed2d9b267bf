"""Custom-op contracts: torch.library.opcheck for every op, torch.compile(fullgraph=True) end to end."""
import pytest
import torch

import fastdistill
from conftest import KERNEL_BACKENDS, backend_device
from fastdistill.ops.distill_loss import loss_op
from fastdistill.ops.loss_common import DIVERGENCE_CODES
from fastdistill.testing import make_labels, make_logits


def _op(backend):
    return loss_op(backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("divergence,hard_weight,with_labels", [("kl", 0.0, False), ("jsd", 0.5, True),
                                                                 ("mse", 0.3, True)])
def test_opcheck(backend, divergence, hard_weight, with_labels, seed):
    device = backend_device(backend)
    s = make_logits((5, 37), device=device, seed=seed).requires_grad_(True)
    t = make_logits((5, 37), device=device, seed=seed + 1)
    labels = make_labels((5,), 37, seed=seed, device=device) if with_labels else None
    scale = torch.full((1,), 0.25, device=device)
    for compute_grad in (True, False):
        x = s if compute_grad else s.detach()  # loss-only mode is for inputs that need no gradient
        args = (x, t, labels, scale, DIVERGENCE_CODES[divergence], 2.0, 0.3, 1.0, hard_weight, True, -100,
                compute_grad)
        torch.library.opcheck(_op(backend), args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
def test_compile_fullgraph_matches_eager(backend, reduction, seed):
    device = backend_device(backend)
    torch._dynamo.reset()
    s = make_logits((2, 3, 129), device=device, seed=seed)
    t = make_logits((2, 3, 129), device=device, seed=seed + 1)
    labels = make_labels((2, 3), 129, seed=seed, device=device)

    def step(student, teacher, labels):
        loss = fastdistill.distill_loss(student, teacher, labels=labels, divergence="reverse_kl", temperature=2.0,
                                        hard_weight=0.5, reduction=reduction, backend=backend)
        return loss.sum() * 3.0

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")):
        x = s.clone().requires_grad_(True)
        out = fn(x, t, labels)
        out.backward()
        results.append((out.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
