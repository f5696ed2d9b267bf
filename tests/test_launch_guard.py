"""Item 10: every Triton launch runs under its tensors' device guard (Triton launches on the current
device, so tensors on cuda:1 with device 0 current would be read by a kernel on the wrong GPU)."""
import contextlib
import importlib
import types

import pytest
import torch

import fastdistill
from fastdistill.ops.common import launch_guard
from fastdistill.sparse import BlockSparseWeight, SemiStructuredWeight

MODULES = ["distill_loss", "topk_distill_loss", "block_sparse_linear", "semi_structured_linear",
           "quantize_per_token", "int8_linear", "int8_weight_only_linear"]


def test_guard_targets_the_tensors_device():
    guard = launch_guard(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(launch_guard(torch.zeros(1)), contextlib.nullcontext)


def _calls():
    torch.manual_seed(0)
    s, t = torch.randn(3, 17, requires_grad=True), torch.randn(3, 17)
    lp, ids = torch.log_softmax(t, -1).topk(4)
    x = torch.randn(4, 32, requires_grad=True)
    w = torch.randn(16, 32)
    w.view(16, 8, 4)[..., 2:] = 0
    bsr, ss = BlockSparseWeight.from_dense(w, block_size=(16, 16)), SemiStructuredWeight.from_dense(w)
    q, qs = fastdistill.quantize_per_token(x.detach(), backend="reference")
    wq, ws = torch.randint(-127, 128, (16, 32), dtype=torch.int8), torch.rand(16) + 0.1
    return {
        "distill_loss": lambda: fastdistill.distill_loss(s, t, backend="triton"),
        "topk_distill_loss": lambda: fastdistill.topk_distill_loss(s, lp, ids, backend="triton"),
        "block_sparse_linear": lambda: fastdistill.block_sparse_linear(x, bsr, backend="triton"),
        "semi_structured_linear": lambda: fastdistill.semi_structured_linear(x, ss, backend="triton"),
        "quantize_per_token": lambda: fastdistill.quantize_per_token(x.detach(), backend="triton")[1],
        "int8_linear": lambda: fastdistill.int8_linear(q, qs, wq, ws, backend="triton"),
        "int8_weight_only_linear": lambda: fastdistill.int8_weight_only_linear(x, wq, ws, backend="triton"),
    }


@pytest.mark.parametrize("module", MODULES)
def test_every_triton_launch_is_guarded(module, monkeypatch):
    mod = importlib.import_module(f"fastdistill.ops.{module}")
    entered = []

    @contextlib.contextmanager
    def recording_guard(t):
        entered.append(t.device)
        yield

    monkeypatch.setattr(mod, "launch_guard", recording_guard)
    out = _calls()[module]()
    if out.requires_grad:
        out.sum().backward()  # block-sparse backward launches two more kernels
    assert entered, f"fastdistill.ops.{module}: a Triton launch ran without launch_guard"
    if module == "block_sparse_linear":
        assert len(entered) == 2  # fwd, and dx in backward (the weight's values do not require grad here)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device_while_first_is_current():
    s, t = torch.randn(4, 1000, device="cuda:1"), torch.randn(4, 1000, device="cuda:1")
    with torch.cuda.device(0):
        got = fastdistill.distill_loss(s, t, backend="triton")
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got, fastdistill.distill_loss(s, t, backend="reference"), rtol=1e-5, atol=1e-6)
