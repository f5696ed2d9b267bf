"""prune_ and GradualPruner: patterns, criteria, scopes, masks through training, schedule, bad input."""
import pytest
import torch
from torch import nn

from fastdistill.sparse import GradualPruner, prune_, report


def mlp(seed=0, dims=(64, 128, 96, 32)):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("sparsity", (0.0, 0.3, 0.9))
def test_unstructured_layer_scope_is_exact(sparsity):
    model = mlp()
    before = [lin.weight.detach().abs().clone() for lin in linears(model)]
    rep = prune_(model, sparsity)
    for name, (zeros, numel) in rep.layers.items():
        assert zeros == round(sparsity * numel), name
    # Magnitude: every kept weight was at least as large as every pruned one; pruned weights are 0.
    for lin, w in zip(linears(model), before):
        m = lin.weight_mask
        if sparsity > 0:
            assert w[m].min() >= w[~m].max()
            assert lin.weight[~m].abs().max() == 0
        else:
            assert bool(m.all())


def test_global_scope_ranks_all_layers_together():
    model = mlp()
    with torch.no_grad():
        w = linears(model)[0].weight
        w.copy_(w.sign() * (1.0 + w.abs()))  # |w| >= 1 > every other layer's weights: all kept
    rep = prune_(model, 0.5, scope="global")
    total = sum(n for _, n in rep.layers.values())
    assert abs(rep.global_sparsity - round(0.5 * total) / total) < 1e-12
    assert rep.sparsity("0") == 0.0


def test_block_and_2_4_patterns():
    model = mlp()
    rep = prune_(model, 0.5, pattern="block", block_size=(32, 32))
    for lin in linears(model):
        N, K = lin.weight.shape
        blocks = lin.weight_mask.reshape(N // 32, 32, K // 32, 32)
        assert torch.equal(blocks.all(3).all(1), blocks.any(3).any(1))  # whole blocks
        zeros, numel = rep.layers[next(n for n, m in model.named_modules() if m is lin)]
        assert zeros == round(0.5 * (numel // (32 * 32))) * 32 * 32  # exact, in whole blocks
    model = mlp()
    prune_(model, 0.5, pattern="2:4")
    for lin in linears(model):
        groups = lin.weight_mask.reshape(lin.out_features, -1, 4)
        assert torch.equal(groups.sum(-1), torch.full(groups.shape[:2], 2))
        w = lin.weight.detach().abs().reshape(groups.shape)
        assert torch.equal(w.topk(2, -1).values.sum(-1) > 0, groups.sum(-1) > 0)


def test_wanda_uses_input_norms():
    lin = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    model = nn.Sequential(lin)
    scale = torch.tensor([1.0, 9, 2, 8, 3, 7, 4, 6])
    calib = [torch.randn(16, 8).sign() * scale for _ in range(2)]  # |x_j| = scale_j exactly
    prune_(model, 0.5, criterion="wanda", calibration=calib)
    keep = torch.tensor([False, True, False, True, False, True, False, True])
    assert torch.equal(lin.weight_mask, keep.expand(4, 8))


def test_filter_fn_and_report():
    model = mlp()
    rep = prune_(model, 0.5, filter_fn=lambda mod, name: name != "4")
    assert set(rep.layers) == {"0", "2"}
    assert not hasattr(model[4], "weight_mask")
    assert "global" in str(rep) and set(report(model).layers) == {"0", "2", "4"}


@pytest.mark.parametrize("opt", ("sgd", "adamw"))
def test_masks_survive_100_steps(opt, seed):
    torch.manual_seed(seed)
    model = mlp(seed, dims=(16, 32, 8))
    optim = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2) if opt == "sgd"
             else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    for _ in range(3):  # momentum / Adam state before pruning, so it would push pruned weights back
        model(torch.randn(8, 16)).square().mean().backward()
        optim.step()
        optim.zero_grad()
    prune_(model, 0.7)
    masks = [lin.weight_mask.clone() for lin in linears(model)]
    before = [lin.weight.detach().clone() for lin in linears(model)]
    for _ in range(100):
        model(torch.randn(8, 16)).square().mean().backward()
        for lin, m in zip(linears(model), masks):
            assert torch.equal(lin.weight.grad[~m], torch.zeros_like(lin.weight.grad[~m]))
        optim.step()
        optim.zero_grad()
    for lin, m, w0 in zip(linears(model), masks, before):
        assert torch.equal(lin.weight_mask, m)
        assert torch.equal(lin.weight.detach()[~m], torch.zeros_like(lin.weight[~m]))
        assert not torch.equal(lin.weight.detach()[m], w0[m])  # the kept weights did train


def test_gradual_pruner_hits_schedule_exactly():
    model = mlp()
    pruner = GradualPruner(model, 0.8, start_step=2, end_step=12, every=3)
    seen = {}
    for step in range(16):
        rep = pruner.step()
        target = pruner.sparsity_at(step)
        if rep is not None:
            seen[step] = target
            for name, (zeros, numel) in rep.layers.items():
                assert zeros == round(target * numel), (step, name)
    assert sorted(seen) == [2, 5, 8, 11, 12]
    assert seen[12] == pytest.approx(0.8) and seen[2] == 0.0
    assert seen[5] == pytest.approx(0.8 + (0.0 - 0.8) * (1 - 3 / 10) ** 3)
    assert pruner.sparsity_at(100) == pytest.approx(0.8) and pruner.sparsity_at(1) == 0.0


def test_bad_input():
    model = mlp()
    for bad in (1.0, -0.1, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="sparsity"):
            prune_(model, bad)
    with pytest.raises(ValueError, match="pattern"):
        prune_(model, 0.5, pattern="4:8")
    with pytest.raises(ValueError, match="sparsity: the 2:4"):
        prune_(model, 0.6, pattern="2:4")
    with pytest.raises(ValueError, match="block_size"):
        prune_(mlp(dims=(64, 100)), 0.5, pattern="block", block_size=(32, 32))
    with pytest.raises(ValueError, match="calibration"):
        prune_(model, 0.5, criterion="wanda")
    with pytest.raises(ValueError, match="2:4 needs in_features"):
        prune_(mlp(dims=(62, 32)), 0.5, pattern="2:4")
    with pytest.raises(ValueError, match="no nn.Linear"):
        prune_(nn.Sequential(nn.ReLU()), 0.5)
    with pytest.raises(ValueError, match="final_sparsity"):
        GradualPruner(model, 1.0, start_step=0, end_step=10, every=1)
    with pytest.raises(ValueError, match="every"):
        GradualPruner(model, 0.5, start_step=0, end_step=10, every=0)
