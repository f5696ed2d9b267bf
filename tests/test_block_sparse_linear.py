"""block_sparse_linear kernels vs the masked-dense reference in float64: outputs and all gradients."""
import pytest
import torch

from conftest import KERNEL_BACKENDS, backend_device
from fastdistill.sparse import block_sparse_linear
from sparse_cases import check_against_oracle, make_bsr

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", (0.0, 0.5, 0.9, "one"))
def test_matches_reference(backend, dtype, sparsity, seed):
    device = backend_device(backend)
    W = make_bsr(96, 160, (32, 32), sparsity, dtype, seed, device)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(37, 160, generator=g).to(device, dtype)  # odd M
    bias = torch.randn(96, generator=g).to(device, dtype)
    check_against_oracle(block_sparse_linear, x, W, bias, seed, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("block_size", ((16, 16), (32, 32), (64, 64), (32, 64), (64, 16)), ids=str)
def test_block_sizes(backend, block_size, seed):
    device = backend_device(backend)
    W = make_bsr(128, 192, block_size, 0.5, torch.float32, seed, device)
    x = torch.randn(3, 5, 192, generator=torch.Generator().manual_seed(seed)).to(device)  # (..., K) input
    check_against_oracle(block_sparse_linear, x, W, None, seed, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_all_zero_weight_and_empty_batch(backend):
    device = backend_device(backend)
    W = make_bsr(64, 64, (32, 32), 0.0, torch.float32, 0, device)
    W = type(W).from_dense(torch.zeros(64, 64, device=device), None, (32, 32))
    assert W.nnzb == 0
    x = torch.randn(5, 64, device=device, requires_grad=True)
    bias = torch.randn(64, device=device)
    y = block_sparse_linear(x, W, bias, backend=backend)
    assert torch.equal(y, bias.expand(5, 64))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    empty = torch.empty(0, 64, device=device)
    assert block_sparse_linear(empty, make_bsr(64, 64, (32, 32), 0.5, torch.float32, 1, device),
                               backend=backend).shape == (0, 64)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic(backend, seed):
    device = backend_device(backend)
    W = make_bsr(128, 128, (32, 32), 0.5, torch.float32, seed, device).to(dtype=torch.bfloat16)
    x = torch.randn(45, 128, device=device, dtype=torch.bfloat16)
    dy = torch.randn(45, 128, device=device, dtype=torch.bfloat16)
    outs = []
    for _ in range(2):
        xi = x.clone().requires_grad_(True)
        vals = W.values.clone().requires_grad_(True)
        y = block_sparse_linear(xi, type(W)(vals, *[getattr(W, n) for n in
                                                    ("crow_indices", "col_indices", "ccol_indices", "row_indices",
                                                     "perm", "block_rows")], W.shape), backend=backend)
        y.backward(dy)
        outs.append((y, xi.grad, vals.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_reference_backend_and_dispatch():
    W = make_bsr(64, 64, (16, 16), 0.5, torch.float32, 3)
    x = torch.randn(7, 64)
    dense = x @ W.to_dense().T
    for backend in ("reference", "cpu", "auto"):
        torch.testing.assert_close(block_sparse_linear(x, W, backend=backend), dense, rtol=1e-5, atol=1e-5)
