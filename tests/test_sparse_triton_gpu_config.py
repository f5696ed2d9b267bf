"""The sparse Triton kernels in the exact configuration a GPU launches, run in the interpreter and checked
against the reference in float64 (outputs and every gradient). The other CPU tests run the interpreter's
configuration (16-bit tiles widened to fp32, smaller M tiles), which a GPU never runs.

What still cannot run here, and why: bfloat16 operands. The interpreter's tl.dot on bf16 tiles returns
garbage (numpy has no bfloat16; triton 3.9), so bf16 keeps the fp32-widened tiles on CPU. fp16 runs the
identical code path a GPU runs for both 16-bit types (tl.dot on 16-bit tiles, default input precision,
fp32 accumulation); the bf16 compile for sm_90 is checked in test_sparse_triton_compile.py.
"""
import os

import pytest
import torch

from sparse_cases import check_against_oracle, make_24, make_bsr

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="on a GPU every test runs the GPU configuration already")


@pytest.fixture
def gpu_config(monkeypatch):
    from fastdistill.kernels import block_sparse_linear as bsr_kernels

    monkeypatch.setattr(bsr_kernels, "GPU_CONFIG_IN_INTERPRETER", True)
    return bsr_kernels


@pytest.mark.parametrize("dtype", (torch.float16, torch.float32), ids=str)
def test_block_sparse_gpu_config(gpu_config, dtype, seed):
    from fastdistill.sparse import block_sparse_linear

    M = 130  # > 64: the GPU's 128-row M tile (the interpreter's cap is 64), with a partial second tile
    assert gpu_config._block_m(M, 16, 16) == 128
    x16 = torch.zeros(1, dtype=dtype)
    assert not gpu_config._upcast(x16)  # 16-bit tiles go to tl.dot as they are, as on a GPU
    W = make_bsr(48, 32, (16, 16), 0.5, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(M, 32, generator=g).to(dtype)
    bias = torch.randn(48, generator=g).to(dtype)
    check_against_oracle(block_sparse_linear, x, W, bias, seed, backend="triton")


@pytest.mark.parametrize("dtype", (torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("M", (3, 20))  # the GPU's two M tiles: 16 and 64 rows
def test_semi_structured_gpu_config(gpu_config, dtype, M, seed):
    from fastdistill.sparse import semi_structured_linear

    W = make_24(72, 136, dtype, seed)  # N, K not multiples of the 64-wide tiles: masked edges
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(M, 136, generator=g).to(dtype)
    check_against_oracle(semi_structured_linear, x, W, torch.randn(72, generator=g).to(dtype), seed,
                         backend="triton")


def test_bf16_dot_is_why_bf16_stays_widened():
    """Pins the reason given above: if the interpreter's bf16 tl.dot becomes exact, run bf16 too."""
    import triton
    import triton.language as tl

    @triton.jit
    def dot16(a_ptr, b_ptr, c_ptr, B: tl.constexpr):
        r = tl.arange(0, B)
        a = tl.load(a_ptr + r[:, None] * B + r[None, :])
        b = tl.load(b_ptr + r[:, None] * B + r[None, :])
        tl.store(c_ptr + r[:, None] * B + r[None, :], tl.dot(a, b, tl.zeros((B, B), dtype=tl.float32)))

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=g).bfloat16() for _ in range(2))
    c = torch.empty(16, 16)
    dot16[(1,)](a, b, c, B=16)
    assert (c - a.float() @ b.float()).abs().max() > 1.0
