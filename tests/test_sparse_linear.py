"""SparseLinear and sparsify_: conversion, round trips, storage, state dicts, training, bad input."""
import warnings

import pytest
import torch
from torch import nn

from fastdistill.sparse import SparseLinear, prune_, sparsify_
from test_sparse_prune import mlp


@pytest.mark.parametrize("pattern", ("block", "2:4"))
def test_sparsify_round_trip_and_storage(pattern):
    model = mlp()
    prune_(model, 0.5, pattern=pattern, block_size=(32, 32))
    dense = {name: (m.weight.detach().clone(), m.bias.detach().clone())
             for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    x = torch.randn(9, 64)
    y_dense = model(x)
    converted = sparsify_(model)
    assert set(converted) == set(dense)
    for name, layer in converted.items():
        assert isinstance(model.get_submodule(name), SparseLinear)
        back = layer.to_dense()
        assert torch.equal(back.weight, dense[name][0]) and torch.equal(back.bias, dense[name][1])
        stored = [layer.values] + ([layer.meta] if pattern == "2:4" else
                                   [getattr(layer, n) for n in ("crow_indices", "col_indices", "ccol_indices",
                                                                "row_indices", "perm", "block_rows")])
        assert layer.storage_bytes == sum(t.numel() * t.element_size() for t in stored)
        assert layer.storage_bytes < layer.dense_bytes * (0.66 if pattern == "block" else 0.57)
    torch.testing.assert_close(model(x), y_dense, rtol=1e-5, atol=1e-5)


def test_sparse_model_trains_and_keeps_pattern():
    model = mlp()
    prune_(model, 0.5, pattern="block", block_size=(32, 32))
    sparsify_(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    layer = model[0]
    w0 = layer.to_dense().weight.detach()
    for _ in range(5):
        model(torch.randn(8, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    w1 = layer.to_dense().weight.detach()
    assert torch.equal(w1 == 0, w0 == 0) and not torch.equal(w1, w0)


@pytest.mark.parametrize("pattern", ("block", "2:4"))
def test_state_dict_round_trip(pattern):
    lin = nn.Linear(64, 32)
    a = SparseLinear.from_linear(lin, pattern=pattern, block_size=(16, 16), sparsity=0.75)
    b = SparseLinear.from_linear(nn.Linear(64, 32), pattern=pattern, block_size=(16, 16), sparsity=0.25)
    b.load_state_dict(a.state_dict())  # same layer shape, other pattern (other nnzb for block)
    assert torch.equal(b.to_dense().weight, a.to_dense().weight)
    x = torch.randn(3, 64)
    assert torch.equal(a(x), b(x))
    other = SparseLinear.from_linear(nn.Linear(64, 48), pattern=pattern, block_size=(16, 16))
    with pytest.raises(ValueError, match="another shape|of shape"):
        other.load_state_dict(a.state_dict())


def test_from_linear_mask_and_bad_input():
    lin = nn.Linear(64, 32)
    mask = torch.zeros(32, 64, dtype=torch.bool)
    mask[:16, 32:] = True
    layer = SparseLinear.from_linear(lin, mask, block_size=(16, 32))
    assert layer.values.shape == (1, 16, 32)
    assert torch.equal(layer.to_dense().weight, lin.weight.detach() * mask)
    with pytest.raises(ValueError, match="mask: expected shape"):
        SparseLinear.from_linear(lin, torch.ones(32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask or a pattern"):
        SparseLinear.from_linear(lin)
    with pytest.raises(ValueError, match="pattern"):
        SparseLinear.from_linear(lin, pattern="unstructured")
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear.from_linear(nn.ReLU(), pattern="2:4")


def test_sparsify_without_pruned_layers_warns_and_changes_nothing():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="no pruned layers"):
        assert sparsify_(model) == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    prune_(model, 0.5)  # unstructured: stays masked dense
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sparsify_(model) == {}
    assert any("masked dense" in str(w.message) for w in caught)
    assert isinstance(model[0], nn.Linear) and hasattr(model[0], "weight_mask")


def test_fully_zero_and_dense_patterns():
    lin = nn.Linear(32, 32)
    with torch.no_grad():
        lin.weight.zero_()
    zero = SparseLinear.from_linear(lin, lin.weight != 0, block_size=(16, 16))
    assert zero.values.shape[0] == 0
    x = torch.randn(4, 32)
    assert torch.equal(zero(x), lin.bias.expand(4, 32).detach())
    full = SparseLinear.from_linear(nn.Linear(32, 32), pattern="block", block_size=(16, 16), sparsity=0.0)
    assert full.values.shape[0] == 4


@pytest.mark.parametrize("pattern", ("block", "2:4"))
def test_sparse_linear_compiles_fullgraph(pattern):
    layer = SparseLinear.from_linear(nn.Linear(64, 32), pattern=pattern, block_size=(16, 16))
    x = torch.randn(5, 64, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    gc = torch.autograd.grad(compiled(x).square().sum(), (x, layer.values, layer.bias))
    ge = torch.autograd.grad(layer(x).square().sum(), (x, layer.values, layer.bias))
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)
