"""GPU check (benchmarks/gpu_check.sh runs gpu tests): the BSR fwd/dx CUDA kernels on GPUs with less shared
memory than an H100/H200. 64 x 64 blocks need 108 KB with the 4-stage pipeline, more than the 99 KB per CTA of
sm_86/sm_89 (A10, RTX 3090/4090, L4), and the 256-row tile needs 180 KB, more than an A100's 163 KB: the
launcher then takes 3 stages / the 128-row tile. FASTDISTILL_BSR_MAX_SMEM caps the limit the launcher sees, so
a big GPU runs exactly the kernels a small one gets; results must match the oracle and the default path."""
import importlib

import pytest
import torch

from sparse_cases import _run, check_against_oracle, make_bsr

bsl_mod = importlib.import_module("fastdistill.ops.block_sparse_linear")
pytestmark = pytest.mark.gpu
SM86_SMEM = 99 * 1024  # cudaDevAttrMaxSharedMemoryPerBlockOptin of sm_86 / sm_89 / sm_120
SM80_SMEM = 163 * 1024


def bsr(x, w, b):
    return bsl_mod.block_sparse_linear(x, w, b, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("limit,tile_m", [(SM86_SMEM, "128"), (SM86_SMEM, "256"), (SM80_SMEM, "256")])
def test_bsr_64x64_fits_smaller_gpus(dtype, limit, tile_m, seed, monkeypatch):
    W = make_bsr(5 * 64, 6 * 64, (64, 64), 0.5, dtype, seed, device="cuda")
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(517, W.shape[1], generator=g, dtype=torch.float64).to("cuda", dtype)
    b = torch.randn(W.shape[0], generator=g, dtype=torch.float64).to("cuda", dtype)
    dy = torch.randn(517, W.shape[0], generator=g, dtype=torch.float64).to("cuda", dtype)
    default = _run(bsr, x, W, b, dy)
    monkeypatch.setenv("FASTDISTILL_BSR_MAX_SMEM", str(limit))
    monkeypatch.setenv("FASTDISTILL_BSR_TILE_M", tile_m)
    check_against_oracle(bsl_mod.block_sparse_linear, x, W, b, seed, backend="cuda")
    small = _run(bsr, x, W, b, dy)
    for name, u, v in zip(("y", "dx", "dvalues", "dbias"), small, default):
        assert torch.equal(u, v), name  # fewer stages or rows per CTA: the same sums in the same order
