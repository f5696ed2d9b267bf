"""The backend table: per-op backends (no entries that do not exist), the 2:4 choices, GPU generations."""
import pytest
import torch

from fastdistill import dispatch


def test_offline_target_ops_have_every_backend():
    for op in ("topk_distill_loss", "sampled_distill_loss", "fused_linear_topk_distill_loss",
               "fused_linear_sampled_distill_loss"):
        assert dispatch.OP_BACKENDS[op] == ("triton", "cuda", "cpu", "reference"), op
        with pytest.raises(dispatch.BackendError, match="cuda: runs on cuda tensors, got cpu"):
            dispatch.select(op, "cuda", torch.device("cpu"), (torch.float32,))
    assert dispatch.NATIVE_FAMILY["fused_linear_topk_distill_loss"] == "topk_distill_loss"


def test_semi_structured_choices_live_in_the_table():
    table = dispatch.info()["ops"]["semi_structured_linear"]
    assert {"cusparselt", "dense"} <= set(table)
    assert dispatch.select("semi_structured_linear", "dense", torch.device("cpu"), (torch.float32,)) == "dense"
    with pytest.raises(dispatch.BackendError, match="cusparselt: runs on cuda tensors"):
        dispatch.select("semi_structured_linear", "cusparselt", torch.device("cpu"), (torch.float16,))
    with pytest.raises(dispatch.BackendError, match="cusparselt: dtype torch.float32 not supported"):
        dispatch.select("semi_structured_linear", "cusparselt", torch.device("cuda"), (torch.float32,))
    with pytest.raises(ValueError, match="backend: unknown 'sparse'"):
        dispatch.select("semi_structured_linear", "sparse", torch.device("cpu"), (torch.float32,))


@pytest.fixture
def old_gpu(monkeypatch):
    """A CUDA device of compute capability 7.5 (T4), simulated."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(dispatch, "_warned", set())


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_kernels_need_sm80(old_gpu, backend):
    why = dispatch.reason("distill_loss", backend, "cuda", (torch.float32,), 0)
    assert why is not None and "compute capability >= 8.0" in why and "cuda:0 has 7.5" in why
    with pytest.raises(dispatch.BackendError, match="compute capability >= 8.0"):
        dispatch.select("distill_loss", backend, torch.device("cuda", 0), (torch.float32,))


def test_auto_falls_back_on_an_old_gpu(old_gpu):
    with pytest.warns(RuntimeWarning, match="compute capability"):
        name = dispatch.select("distill_loss", "auto", torch.device("cuda", 0), (torch.float32,))
    assert name == "reference"


def test_new_gpu_is_not_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    why = dispatch.reason("distill_loss", "triton", "cuda", (torch.float32,), 0)
    assert why is None or "compute capability" not in why
