"""block_sparse_linear: bad input, formats, opcheck and torch.compile of the custom ops."""
import dataclasses

import pytest
import torch

from conftest import KERNEL_BACKENDS, backend_device
from fastdistill.ops.block_sparse_linear import _OPS, _kernels
from fastdistill.sparse import BlockSparseWeight, block_sparse_linear
from sparse_cases import make_bsr


def test_format_round_trip_and_csc_view(seed):
    W = make_bsr(128, 96, (32, 16), 0.5, torch.float32, seed)
    dense = W.to_dense()
    again = BlockSparseWeight.from_dense(dense, dense != 0, (32, 16))
    assert torch.equal(again.to_dense(), dense)
    # CSC view: block q in column order is values[perm[q]] at (row_indices[q], column c).
    for c in range(96 // 16):
        for q in range(int(W.ccol_indices[c]), int(W.ccol_indices[c + 1])):
            p = int(W.perm[q])
            assert int(W.col_indices[p]) == c and int(W.block_rows[p]) == int(W.row_indices[q])
    assert W.nbytes == sum(t.numel() * t.element_size() for t in (W.values, W.crow_indices, W.col_indices,
                                                                  W.ccol_indices, W.row_indices, W.perm,
                                                                  W.block_rows))


def test_bad_input():
    W = make_bsr(64, 64, (32, 32), 0.5, torch.float32, 0)
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="x: expected shape"):
        block_sparse_linear(torch.randn(4, 63), W)
    with pytest.raises(TypeError, match="weight: dtype"):
        block_sparse_linear(x.double(), W)
    with pytest.raises(TypeError, match="weight: expected"):
        block_sparse_linear(x, W.to_dense())
    with pytest.raises(ValueError, match="bias: expected shape"):
        block_sparse_linear(x, W, torch.randn(63))
    with pytest.raises(ValueError, match="not divisible by block_size"):
        BlockSparseWeight.from_dense(torch.randn(48, 64), None, (32, 32))
    with pytest.raises(ValueError, match="block_size"):
        BlockSparseWeight.from_dense(torch.randn(48, 64), None, (24, 32))
    with pytest.raises(ValueError, match="mask: shape"):
        BlockSparseWeight.from_dense(torch.randn(64, 64), torch.ones(64, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend: unknown"):
        block_sparse_linear(x, W, backend="nope")


def test_native_ops_check_their_arguments():
    fwd, dx, dw = _kernels("cpu")
    W = make_bsr(64, 64, (32, 32), 0.5, torch.float32, 0)
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="crow_indices"):
        fwd(x, W.values, W.crow_indices[:-1], W.col_indices, None, 64)
    with pytest.raises(TypeError, match="int32"):
        fwd(x, W.values, W.crow_indices.long(), W.col_indices, None, 64)
    with pytest.raises(TypeError, match="values: dtype"):
        fwd(x, W.values.double(), W.crow_indices, W.col_indices, None, 64)
    with pytest.raises(ValueError, match="K: "):
        dx(torch.randn(4, 64), W.values, W.ccol_indices, W.row_indices, W.perm, 48)
    with pytest.raises(ValueError, match="block size"):
        dw(torch.randn(4, 64), x, W.crow_indices, W.col_indices, 32, 8)


def _args(W, x, bias):
    return (x, W.values, W.crow_indices, W.col_indices, W.ccol_indices, W.row_indices, W.perm, bias, W.shape[0])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    device = backend_device(backend)
    W = make_bsr(64, 96, (32, 32), 0.5, torch.float32, 0, device)
    x = torch.randn(19, 96, device=device, requires_grad=True)
    values = W.values.clone().requires_grad_(True)
    bias = torch.randn(64, device=device, requires_grad=True)
    W = dataclasses.replace(W, values=values)
    torch.library.opcheck(_OPS[backend], _args(W, x, bias))
    fwd, dx, dw = _kernels(backend)
    torch.library.opcheck(fwd, (x.detach(), W.values.detach(), W.crow_indices, W.col_indices, None, 64))
    dy = torch.randn(19, 64, device=device)
    torch.library.opcheck(dx, (dy, W.values.detach(), W.ccol_indices, W.row_indices, W.perm, 96))
    torch.library.opcheck(dw, (dy, x.detach(), W.crow_indices, W.col_indices, 32, 32))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compile_fullgraph(backend):
    device = backend_device(backend)
    W = make_bsr(64, 64, (16, 16), 0.5, torch.float32, 2, device)
    values = W.values.clone().requires_grad_(True)
    W = dataclasses.replace(W, values=values)
    x = torch.randn(9, 64, device=device, requires_grad=True)
    bias = torch.randn(64, device=device, requires_grad=True)

    def f(x, W, bias):
        return block_sparse_linear(x, W, bias, backend=backend).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss = compiled(x, W, bias)
    grads = torch.autograd.grad(loss, (x, values, bias))
    loss_e = f(x, W, bias)
    grads_e = torch.autograd.grad(loss_e, (x, values, bias))
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)
