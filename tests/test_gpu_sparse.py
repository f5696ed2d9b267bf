"""GPU-only checks of the sparse CUDA kernels (run by benchmarks/gpu_check.sh): block_sparse_linear and
semi_structured_linear on backend="cuda" vs the reference in float64 (outputs and every gradient), all
block sizes and dtypes, odd M, empty and one-block patterns, both M tiles, bitwise determinism, opcheck
and compile. Builders and the oracle check are shared with the CPU tests (sparse_cases.py)."""
import dataclasses
import importlib

import pytest
import torch

from sparse_cases import _run, check_against_oracle, make_24, make_bsr

# The op modules (not the same-named public functions that packages may re-export).
bsl_mod = importlib.import_module("fastdistill.ops.block_sparse_linear")
ssl_mod = importlib.import_module("fastdistill.ops.semi_structured_linear")
pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BLOCKS = [(16, 16), (32, 32), (64, 64), (32, 64), (64, 16), (16, 32)]
DEV = "cuda"


def inputs(M, N, K, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(M, K, generator=g, dtype=torch.float64).to(DEV, dtype)
    b = torch.randn(N, generator=g, dtype=torch.float64).to(DEV, dtype) if bias else None
    dy = torch.randn(M, N, generator=g, dtype=torch.float64).to(DEV, dtype)
    return x, b, dy


def bsr(x, w, b):
    return bsl_mod.block_sparse_linear(x, w, b, backend="cuda")


def semi(x, w, b):
    return ssl_mod.semi_structured_linear(x, w, b, backend="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, "one"])
def test_block_sparse_matches_oracle(dtype, block, sparsity, seed):
    bn, bk = block
    W = make_bsr(7 * bn, 5 * bk, block, sparsity, dtype, seed, device=DEV)
    x, b, _ = inputs(131, 7 * bn, 5 * bk, dtype, seed)
    check_against_oracle(bsl_mod.block_sparse_linear, x, W, b, seed, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("block", [(64, 64), (64, 32), (32, 64)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_block_sparse_tile_256(dtype, block, seed, monkeypatch):
    """The 256-row M tile of the 64-wide fwd/dx kernels (FASTDISTILL_BSR_TILE_M=256, a tuning knob)."""
    W = make_bsr(5 * block[0], 6 * block[1], block, 0.5, dtype, seed, device=DEV)
    x, b, dy = inputs(517, W.shape[0], W.shape[1], dtype, seed)
    monkeypatch.setenv("FASTDISTILL_BSR_TILE_M", "256")
    check_against_oracle(bsl_mod.block_sparse_linear, x, W, b, seed, backend="cuda")
    wide = _run(bsr, x, W, b, dy)
    monkeypatch.delenv("FASTDISTILL_BSR_TILE_M")
    for name, u, v in zip(("y", "dx"), wide, _run(bsr, x, W, b, dy)):
        assert torch.equal(u, v), name  # both tiles sum each output in the same order


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [0, 1, 129, 300])
def test_block_sparse_exact_zeros(dtype, M, seed):
    """Outside the one stored block y is exactly the bias and dx exactly 0; an empty pattern gives the
    bias, zero dx and an empty dvalues; M == 0 gives empty outputs and zero dvalues."""
    W = make_bsr(4 * 32, 3 * 64, (32, 64), "one", dtype, seed, device=DEV)
    x, b, dy = inputs(M, 128, 192, dtype, seed)
    y, dx, dv, _ = _run(bsr, x, W, b, dy)
    r, c = int(W.block_rows[0]), int(W.col_indices[0])
    rows = torch.ones(128, dtype=torch.bool, device=DEV)
    rows[r * 32:(r + 1) * 32] = False
    cols = torch.ones(192, dtype=torch.bool, device=DEV)
    cols[c * 64:(c + 1) * 64] = False
    assert torch.equal(y[:, rows], b[rows].expand(M, -1))
    assert torch.equal(dx[:, cols], torch.zeros_like(dx[:, cols]))
    if M == 0:
        assert torch.equal(dv, torch.zeros_like(dv))
    empty = make_bsr(3 * 16, 4 * 16, (16, 16), 1.0, dtype, seed, device=DEV)
    assert empty.nnzb == 0
    x, b, dy = inputs(M, 48, 64, dtype, seed)
    y, dx, dv, _ = _run(bsr, x, empty, b, dy)
    assert torch.equal(y, b.expand(M, -1)) and torch.equal(dx, torch.zeros_like(dx)) and dv.shape == (0, 16, 16)


def test_block_sparse_large_bf16(seed):
    """Many M tiles, long block rows and a deep dw reduction at the benchmark's block size."""
    W = make_bsr(24 * 64, 32 * 64, (64, 64), 0.9, torch.bfloat16, seed, device=DEV)
    x, b, _ = inputs(2049, W.shape[0], W.shape[1], torch.bfloat16, seed)
    check_against_oracle(bsl_mod.block_sparse_linear, x, W, b, seed, backend="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_sparse_deterministic(dtype, seed):
    W = make_bsr(8 * 64, 16 * 32, (64, 32), 0.5, dtype, seed, device=DEV)
    x, b, dy = inputs(1000, W.shape[0], W.shape[1], dtype, seed)
    for name, u, v in zip(("y", "dx", "dvalues", "dbias"), _run(bsr, x, W, b, dy), _run(bsr, x, W, b, dy)):
        assert torch.equal(u, v), name


def test_block_sparse_opcheck_and_compile(seed):
    W = make_bsr(96, 128, (32, 32), 0.5, torch.bfloat16, seed, device=DEV)
    x, b, dy = inputs(37, 96, 128, torch.bfloat16, seed)
    fwd, dx, dw = bsl_mod._kernels("cuda")
    torch.library.opcheck(fwd, (x, W.values, W.crow_indices, W.col_indices, b, W.shape[0]))
    torch.library.opcheck(dx, (dy, W.values, W.ccol_indices, W.row_indices, W.perm, W.shape[1]))
    torch.library.opcheck(dw, (dy, x, W.crow_indices, W.col_indices, 32, 32))
    compiled = torch.compile(lambda t: bsr(t, W, b), fullgraph=True)
    assert torch.equal(compiled(x), bsr(x, W, b))


# ---- 2:4 ----

def fewer_nonzeros(W, seed, fraction):
    """Zeroes a fraction of the kept values: groups with fewer than two nonzeros."""
    g = torch.Generator().manual_seed(seed + 2)
    keep = (torch.rand(W.values.shape, generator=g) >= fraction).to(W.device, W.dtype)
    return dataclasses.replace(W, values=W.values * keep)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 5, 16, 17, 40, 64, 65, 257])  # <= 64: streaming kernel; more: dense GEMM
@pytest.mark.parametrize("K", [512, 80, 68])  # K % 64 == 0, K % 16 == 0 (16-byte loads), neither
def test_semi_structured_matches_oracle(dtype, M, K, seed):
    W = fewer_nonzeros(make_24(77, K, dtype, seed, device=DEV), seed, 0.2)
    x, b, _ = inputs(M, 77, K, dtype, seed)
    check_against_oracle(ssl_mod.semi_structured_linear, x, W, b, seed, backend="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_semi_structured_edge_weights(dtype, seed):
    """All-zero weight (y is exactly the bias), K == 4 without bias, M == 0."""
    W = fewer_nonzeros(make_24(33, 64, dtype, seed, device=DEV), seed, 1.0)
    x, b, dy = inputs(9, 33, 64, dtype, seed)
    assert torch.equal(semi(x, W, b), b.expand(9, -1))
    W = make_24(40, 4, dtype, seed, device=DEV)
    x, _, _ = inputs(3, 40, 4, dtype, seed)
    check_against_oracle(ssl_mod.semi_structured_linear, x, W, None, seed, backend="cuda")
    x, b, _ = inputs(0, 40, 4, dtype, seed)
    assert semi(x, W, b).shape == (0, 40)


@pytest.mark.parametrize("M", [1, 16, 48])
def test_semi_structured_deterministic(M, seed):
    W = make_24(4096, 4096, torch.bfloat16, seed, device=DEV)
    x, b, dy = inputs(M, 4096, 4096, torch.bfloat16, seed)
    for name, u, v in zip(("y", "dx", "dvalues", "dbias"), _run(semi, x, W, b, dy), _run(semi, x, W, b, dy)):
        assert torch.equal(u, v), name
    check_against_oracle(ssl_mod.semi_structured_linear, x, W, b, seed, backend="cuda")


def test_semi_structured_opcheck_and_compile(seed):
    W = make_24(48, 64, torch.float16, seed, device=DEV)
    x, b, _ = inputs(7, 48, 64, torch.float16, seed)
    torch.library.opcheck(ssl_mod._op("cuda"), (x, W.values, W.meta, b))
    compiled = torch.compile(lambda t: semi(t, W, b), fullgraph=True)
    assert torch.equal(compiled(x), semi(x, W, b))


def test_index_checks_on_cuda_tensors():
    """The range checks run on the weight's device (once, may sync): a crafted CUDA index is refused too."""
    from fastdistill.sparse import SparseLinear

    W = make_bsr(64, 64, (32, 32), 0.5, torch.float16, 0, device=DEV)
    col = W.col_indices.clone()
    col[0] = 1 << 28
    with pytest.raises(ValueError, match="^col_indices: "):
        dataclasses.replace(W, col_indices=col)
    layer = SparseLinear(W).to(DEV)
    with pytest.raises(ValueError, match="^col_indices: "):
        layer.load_state_dict({**layer.state_dict(), "col_indices": col.cpu()})
    S = make_24(16, 32, torch.float16, 0, device=DEV)
    meta = S.meta.clone()
    meta[0, 0] = 5  # group 0: i0 == i1 == 1
    with pytest.raises(ValueError, match="^meta: "):
        dataclasses.replace(S, meta=meta)
