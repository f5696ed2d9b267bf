"""Masks of pruned models survive copy.deepcopy, pickling of the module and state dict round trips (through
restore_masks): after N optimizer steps every pruned weight is still exactly 0. Bad arguments to prune_,
sparsify_ and GradualPruner raise errors that name them."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

from fastdistill.sparse import (GradualPruner, SparseLinear, prune_, re_arm, remove_masks, report, restore_masks,
                                sparsify_)
from test_sparse_prune import linears, mlp

STEPS = 3


def train(model, steps=STEPS, seed=0):
    """SGD with momentum and weight decay: both would move pruned weights off 0 without the guards."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(8, 64, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def assert_pruned_zero(model, masks):
    for lin, mask in zip(linears(model), masks):
        assert torch.equal(lin.weight_mask, mask)
        assert not lin.weight.detach()[~mask].any(), "a pruned weight moved off 0"
        assert lin.weight.detach()[mask].ne(0).any()  # the kept ones do train


def pruned(pattern="unstructured"):
    model = mlp()
    prune_(model, 0.5, pattern=pattern, block_size=(32, 32))
    return model, [lin.weight_mask.clone() for lin in linears(model)]


def test_deepcopy_keeps_masks_through_training():
    model, masks = pruned()
    clone = copy.deepcopy(model)
    train(clone)  # used to leave every pruned weight non-zero after the first step
    assert_pruned_zero(clone, masks)
    train(model)  # the original keeps its own guards
    assert_pruned_zero(model, masks)


def test_compiled_copy_armed_by_re_arm():
    """torch.compile traces without arming (no tensor hooks while tracing): re_arm before compiling."""
    model, masks = pruned()
    clone = copy.deepcopy(model)
    re_arm(clone)
    train(torch.compile(clone, fullgraph=True, backend="aot_eager"))
    assert_pruned_zero(clone, masks)


def test_pickled_module_keeps_masks_through_training():
    model, masks = pruned("block")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "backward hook will not be serialized" warning
        torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    train(loaded)
    assert_pruned_zero(loaded, masks)
    assert set(sparsify_(loaded)) == {"0", "2", "4"}  # the pattern survived too: block layers compress
    assert isinstance(loaded[0], SparseLinear)


def test_state_dict_into_fresh_model_through_restore_masks():
    model, masks = pruned("2:4")
    train(model)
    state = model.state_dict()
    with pytest.raises(RuntimeError, match="weight_mask"):  # a plain strict load refuses the masks
        mlp(seed=1).load_state_dict(state)
    fresh = mlp(seed=1)
    assert restore_masks(fresh, state, pattern="2:4") == ["0", "2", "4"]
    fresh.load_state_dict(state)
    for a, b in zip(linears(fresh), linears(model)):
        assert torch.equal(a.weight, b.weight)
    train(fresh)
    assert_pruned_zero(fresh, masks)
    with pytest.raises(ValueError, match="^state_dict: no '<layer>.weight_mask'"):
        restore_masks(mlp(), mlp().state_dict())
    with pytest.raises(ValueError, match=r"^0\.weight_mask: not a block mask"):
        restore_masks(mlp(), state, pattern="block")
    with pytest.raises(ValueError, match=r"^1\.weight_mask: '1' is a ReLU"):
        restore_masks(mlp(), {"1.weight_mask": masks[0]})


def test_loading_weights_into_a_pruned_model_reapplies_masks():
    model, masks = pruned()
    dense = {k: v for k, v in mlp(seed=3).state_dict().items()}
    model.load_state_dict(dense, strict=False)  # dense weights, no masks: the model keeps its own
    assert_pruned_zero(model, masks)
    train(model)
    assert_pruned_zero(model, masks)


def test_remove_masks_on_a_copy_drops_its_guards():
    model, masks = pruned()
    clone = copy.deepcopy(model)
    train(clone, steps=1)
    remove_masks(clone)
    assert not hasattr(clone[0], "weight_mask") and not clone[0]._forward_pre_hooks
    train(clone)
    assert clone[0].weight.detach()[~masks[0]].ne(0).any()  # no guard left: pruned weights train again
    train(model)
    assert_pruned_zero(model, masks)  # the original is unaffected


def test_frozen_pruned_copy_runs():
    model, masks = pruned()
    model.requires_grad_(False)
    clone = copy.deepcopy(model)
    clone(torch.randn(2, 64))  # arming skips the gradient hook of a weight without gradients
    clone.requires_grad_(True)
    train(clone)  # the next forward arms it
    assert_pruned_zero(clone, masks)


def test_wanda_refuses_empty_calibration():
    model = mlp()
    before = [lin.weight.detach().clone() for lin in linears(model)]
    for calibration in ([], iter(())):
        with pytest.raises(ValueError, match="^calibration: empty"):
            prune_(model, 0.5, criterion="wanda", calibration=calibration)
    for lin, w in zip(linears(model), before):  # used to prune by position, silently
        assert not hasattr(lin, "weight_mask") and torch.equal(lin.weight, w)


def test_a_tensor_where_a_model_goes():
    t = torch.randn(4, 4)
    for call in (lambda: prune_(t, 0.5), lambda: sparsify_(t), lambda: report(t), lambda: remove_masks(t),
                 lambda: GradualPruner(t, 0.5, start_step=0, end_step=2, every=1)):
        with pytest.raises(TypeError, match="^model: expected a torch.nn.Module, got Tensor"):
            call()


def test_gradual_pruner_load_state_dict_refuses_garbage():
    pr = GradualPruner(mlp(), 0.5, start_step=0, end_step=4, every=2)
    cases = [([3], TypeError, "^state: expected the dict"), (None, TypeError, "^state: expected the dict"),
             ({}, ValueError, "^state: missing key 'step_count'"),
             ({"step_count": 1, "steps": 2}, ValueError, r"^state: unexpected key\(s\) \['steps'\]"),
             ({"step_count": "3"}, TypeError, "^step_count: expected an int, got str"),
             ({"step_count": 2.5}, TypeError, "^step_count: expected an int"),
             ({"step_count": True}, TypeError, "^step_count: expected an int"),
             ({"step_count": -1}, ValueError, "^step_count: expected an integer >= 0")]
    for state, exc, match in cases:
        with pytest.raises(exc, match=match):
            pr.load_state_dict(state)
    pr.load_state_dict({"step_count": 3})
    assert pr.state_dict() == {"step_count": 3}
