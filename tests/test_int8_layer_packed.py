"""Int8Linear on packed CPU weights (issue 14): the packed forward gives the unpacked path's results (w8a8 bit for
bit, w8a16 within tolerance), the packed copy is never stale (quantize, freeze, load, optimizer step, in-place edit,
buffer replaced, deepcopy, pickling, dtype conversion), checkpoints stay portable and versioned, gradients unchanged."""
import copy
import io

import pytest
import torch
from torch import nn

from fastdistill.nn import int8_linear as layer_mod
from fastdistill.quant import Int8Linear, freeze_, quantize_

W8A8 = layer_mod._packed_ops("w8a8")
W8A16 = layer_mod._packed_ops("w8a16")
needs_w8a8 = pytest.mark.skipif(W8A8 is None, reason="extension built without the packed w8a8 CPU ops")
needs_w8a16 = pytest.mark.skipif(W8A16 is None, reason="extension built without the packed w8a16 CPU ops")


def _layer(k=40, n=24, mode="w8a8", *, bias=True, smooth=False, trainable=False, group_size=None, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    s = torch.rand(k) * 3 + 0.25 if smooth else None
    return Int8Linear.from_linear(lin, mode, group_size=group_size, trainable=trainable, smooth=s)


def _unpacked(layer: Int8Linear) -> Int8Linear:
    """A copy that never takes the packed kernels: the behaviour before issue 14 (the oracle)."""
    out = copy.deepcopy(layer)
    out._packed_weight = lambda x: None
    return out


def _x(*shape, seed=1, dtype=torch.float32):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


def _count_packed_calls(monkeypatch, mode="w8a8"):
    calls = []
    pack, op = layer_mod._packed_ops(mode)

    def spy(*args):
        calls.append(1)
        return op(*args)
    monkeypatch.setitem(layer_mod._PACKED_OPS, mode, (pack, spy))
    return calls


@needs_w8a8
@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_w8a8_packed_forward_bitwise(monkeypatch, trainable, smooth, bias):
    calls = _count_packed_calls(monkeypatch)  # the layer takes its op when it packs
    layer = _layer(bias=bias, smooth=smooth, trainable=trainable)
    assert layer._packed is not None  # packed when quantized
    oracle = _unpacked(layer)
    for x in (_x(7, 40), _x(2, 3, 40, seed=2), _x(40, 9, seed=3).t(), _x(0, 40), _x(5, 40, dtype=torch.bfloat16)):
        with torch.no_grad():
            got, want = layer(x), oracle(x)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
    assert len(calls) == 5  # every forward above ran the packed op


@needs_w8a16
@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_w8a16_packed_forward_close(monkeypatch, group_size, trainable, bias):
    calls = _count_packed_calls(monkeypatch, "w8a16")
    layer = _layer(mode="w8a16", bias=bias, trainable=trainable, group_size=group_size)
    assert layer._packed is not None
    oracle = _unpacked(layer)
    for x in (_x(7, 40), _x(2, 3, 40, seed=2)):
        with torch.no_grad():
            torch.testing.assert_close(layer(x), oracle(x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2


@needs_w8a8
def test_lifecycle_frozen_and_loaded_layers_are_packed():
    trained = _layer(smooth=True, trainable=True)
    frozen = trained.frozen()
    assert frozen._packed is not None and frozen._pack_key[0] is frozen.weight_int8
    fresh = Int8Linear(40, 24, smooth=True)
    fresh.load_state_dict(frozen.state_dict())
    assert fresh._packed is not None and fresh._pack_key[1] == fresh.weight_int8._version
    x = _x(6, 40)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x)) and torch.equal(frozen(x), trained(x))
    model = nn.Sequential(_layer(trainable=True))
    freeze_(model)
    assert model[0]._packed is not None


@needs_w8a8
def test_optimizer_step_repacks_trainable_layer():
    layer = _layer(smooth=True, trainable=True)
    x = _x(6, 40)
    before = layer(x).detach()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        after, want = layer(x), _unpacked(layer)(x)  # the oracle re-quantizes the stepped master weight itself
    assert not torch.equal(after, before)
    assert torch.equal(after, want)


@needs_w8a8
def test_in_place_edit_or_replaced_weight_is_never_stale():
    layer, x = _layer(), _x(6, 40)
    other = _layer(seed=5)
    with torch.no_grad():
        before = layer(x)
        layer.weight_int8.copy_(other.weight_int8)  # in place: the version counter moves
        after = layer(x)
        assert not torch.equal(after, before) and torch.equal(after, _unpacked(layer)(x))
        layer.weight_int8[0, :5] = 0  # indexing assignment, same tensor
        assert torch.equal(layer(x), _unpacked(layer)(x))
    with torch.inference_mode():
        layer.weight_int8.neg_()  # edits inside inference_mode count too
        assert torch.equal(layer(x), _unpacked(layer)(x))
    layer.weight_int8 = other.weight_int8.clone()  # a replaced buffer
    with torch.no_grad():
        assert torch.equal(layer(x), _unpacked(layer)(x))


@needs_w8a8
def test_deepcopy_and_torch_save_drop_the_packed_copy():
    model = nn.Sequential(_layer(smooth=True), nn.ReLU(), _layer(24, 8, seed=3))
    x = _x(5, 40)
    with torch.no_grad():
        want = model(x)
        clone = copy.deepcopy(model)
        assert clone[0]._packed is None
        assert torch.equal(clone(x), want) and clone[0]._packed is not None
        clone[0].weight_int8.zero_()  # the copy's weight is its own
        assert torch.equal(model(x), want)
        buf = io.BytesIO()
        torch.save(model, buf)
        assert buf.getbuffer().nbytes < 8 * 1024  # 1.3 KB of int8 weights; no packed tensors in the pickle
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert loaded[0]._packed is None and torch.equal(loaded(x), want)
    keys = model.state_dict()
    assert all(t.dtype != torch.uint8 for t in keys.values())
    assert sorted(keys) == sorted(_unpacked(model).state_dict())


@needs_w8a8
def test_float64_model_keeps_its_results():
    model = nn.Sequential(_layer(smooth=True), nn.ReLU(), _layer(24, 8, seed=3)).to(torch.float64)
    oracle = nn.Sequential(*[_unpacked(m) if isinstance(m, Int8Linear) else m for m in model])
    x = _x(5, 40, dtype=torch.float64)
    with torch.no_grad():
        got = model(x)
        assert got.dtype == torch.float64 and torch.equal(got, oracle(x))
    assert model[0]._packed is not None


def test_state_dict_version_recorded_and_newer_refused():
    src = nn.Sequential(_layer())
    sd = src.state_dict()
    assert sd._metadata["0"]["version"] == layer_mod.STATE_DICT_VERSION
    nn.Sequential(Int8Linear(40, 24)).load_state_dict(sd)
    legacy = dict(sd)  # no _metadata at all (e.g. read back from safetensors): the same portable format
    nn.Sequential(Int8Linear(40, 24)).load_state_dict(legacy)
    for bad in (layer_mod.STATE_DICT_VERSION + 1, "2", 0):
        newer = copy.copy(sd)
        newer._metadata = copy.deepcopy(sd._metadata)
        newer._metadata["0"]["version"] = bad
        with pytest.raises(RuntimeError, match=r"state_dict._metadata\['0'\]\['version'\]: Int8Linear state_dict"):
            nn.Sequential(Int8Linear(40, 24)).load_state_dict(newer)


def test_state_dict_with_a_packed_tensor_refused():
    sd = _layer().state_dict()
    sd["weight_packed"] = torch.zeros(128, dtype=torch.uint8)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="weight_packed: a uint8 tensor .* packed CPU weight"):
            Int8Linear(40, 24).load_state_dict(sd, strict=strict)


@needs_w8a8
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("trainable", [False, True])
def test_gradients_unchanged(mode, trainable):
    layer = _layer(mode=mode, smooth=mode == "w8a8", trainable=trainable)
    oracle = _unpacked(layer)
    x1 = _x(2, 5, 40).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    dy = _x(2, 5, 24, seed=9)
    y1, y2 = layer(x1), oracle(x2)
    assert torch.equal(y1, y2) if mode == "w8a8" else torch.allclose(y1, y2, rtol=1e-5, atol=1e-5)
    y1.backward(dy)
    y2.backward(dy)
    assert torch.equal(x1.grad, x2.grad)
    for p1, p2 in zip(layer.parameters(), oracle.parameters()):
        assert torch.equal(p1.grad, p2.grad)


@needs_w8a8
def test_lean_forward_bad_width_names_x():
    with pytest.raises(ValueError, match=r"x: expected \[\.\.\., 40\]"):
        with torch.no_grad():
            _layer()(_x(3, 41))


@needs_w8a8
def test_layer_built_in_inference_mode_falls_back():
    with torch.inference_mode():
        layer = _layer()
        assert layer._packed is None  # inference tensors have no version counter to guard a packed copy
        x = _x(4, 40)
        assert torch.equal(layer(x), _unpacked(layer)(x))


@needs_w8a8
def test_explicit_other_backend_keeps_its_path(monkeypatch):
    calls = _count_packed_calls(monkeypatch)
    model = quantize_(nn.Sequential(nn.Linear(40, 24)), backend="reference")
    with torch.no_grad():
        model(_x(3, 40))
    monkeypatch.setenv("FASTDISTILL_BACKEND", "reference")
    auto = _layer()
    with torch.no_grad():
        auto(_x(3, 40))
    assert not calls


@needs_w8a8
def test_ddp_single_process(tmp_path):
    """DDP broadcasts buffers in place (copy_): the packed copy follows; the training step matches plain autograd."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(_layer(smooth=True, trainable=True), nn.ReLU(), _layer(24, 8, seed=3))
        plain = copy.deepcopy(model)
        ddp = DDP(model)
        x = _x(6, 40)
        ddp(x).sum().backward()
        plain(x).sum().backward()
        for p1, p2 in zip(model.parameters(), plain.parameters()):
            assert torch.equal(p1.grad, p2.grad)
        with torch.no_grad():
            model[2].weight_int8.copy_(_layer(24, 8, seed=4).weight_int8)  # as a buffer broadcast writes it
            assert torch.equal(ddp(x), nn.Sequential(*[_unpacked(m) if isinstance(m, Int8Linear) else m
                                                       for m in model])(x))
    finally:
        dist.destroy_process_group()


@needs_w8a16
def test_w8a16_in_place_edit_and_load_repack():
    layer, x = _layer(mode="w8a16", group_size=8), _x(3, 40)
    with torch.no_grad():
        before = layer(x)
        layer.weight_int8.neg_()
        after = layer(x)
        torch.testing.assert_close(after, _unpacked(layer)(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(after, before)
        fresh = Int8Linear(40, 24, mode="w8a16", group_size=8)
        fresh.load_state_dict(layer.state_dict())
        assert fresh._packed is not None
        assert torch.equal(fresh(x), after)


def test_module_pickled_before_the_packed_cache_loads():
    layer, x = _layer(smooth=True), _x(3, 40)
    state = layer.__getstate__()
    del state["_packed"], state["_pack_key"]  # what torch.save(module) wrote before issue 14
    old = Int8Linear.__new__(Int8Linear)
    old.__setstate__(state)
    with torch.no_grad():
        assert torch.equal(old(x), layer(x))


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("trainable", [False, True])
def test_output_does_not_depend_on_requires_grad(mode, trainable):
    layer, x = _layer(mode=mode, trainable=trainable), _x(4, 40)
    with torch.no_grad():
        plain = layer(x)
    assert torch.equal(layer(x.clone().requires_grad_()), plain)


def test_w8a16_layer_with_the_dense_backend():
    """Regression: Int8Linear(mode="w8a16", backend="dense") raised in its constructor (the weight was quantized
    with backend "dense", which quantize_per_token lacks); the weight quantizer now takes auto (same bits)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 7)
    layer = Int8Linear.from_linear(lin, "w8a16", backend="dense")
    ref = Int8Linear.from_linear(lin, "w8a16")
    assert torch.equal(layer.weight_int8, ref.weight_int8) and torch.equal(layer.weight_scale, ref.weight_scale)
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
