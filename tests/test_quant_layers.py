"""Int8Linear, quantize_ and calibrate: accuracy, state dicts, straight-through training, bad input."""
import copy

import pytest
import torch
from torch import nn

from conftest import KERNEL_BACKENDS, backend_device
from fastdistill.quant import Int8Linear, calibrate, freeze_, quantize_
from fastdistill.testing import sqnr

LAYER_BACKENDS = KERNEL_BACKENDS + ["reference"]


def _linear(k, n, seed, device="cpu"):
    torch.manual_seed(seed)
    return nn.Linear(k, n).to(device)


@pytest.mark.parametrize("backend", LAYER_BACKENDS)
@pytest.mark.parametrize("mode,group_size,floor_db", [("w8a16", None, 40.0), ("w8a16", 16, 40.0), ("w8a8", None, 20.0)])
def test_layer_sqnr(backend, mode, group_size, floor_db, seed):
    dev = backend_device(backend)
    lin = _linear(96, 40, seed, dev)
    layer = Int8Linear.from_linear(lin, mode, group_size=group_size, backend=backend)
    x = torch.randn(3, 17, 96, generator=torch.Generator().manual_seed(seed)).to(dev)
    with torch.no_grad():
        assert sqnr(layer(x), lin(x)) >= floor_db
        assert sqnr(layer.to_linear()(x), lin(x)) >= 40.0  # dequantized weights alone


def test_calibration_improves_w8a8_on_outliers():
    g = torch.Generator().manual_seed(0)
    lin = _linear(128, 64, 0)
    gain = torch.ones(128)
    gain[torch.randperm(128, generator=g)[:4]] = 60.0  # a few outlier channels, as in LLM activations
    batches = [torch.randn(32, 128, generator=g) * gain for _ in range(4)]
    x = torch.randn(64, 128, generator=g) * gain
    model, smoothed = nn.Sequential(copy.deepcopy(lin)), nn.Sequential(copy.deepcopy(lin))
    factors = calibrate(smoothed, batches, smooth_alpha=0.5)
    quantize_(model, "w8a8")
    quantize_(smoothed, "w8a8", smooth=factors)
    with torch.no_grad():
        plain, calibrated = sqnr(model(x), lin(x)), sqnr(smoothed(x), lin(x))
    assert calibrated > plain + 6.0, (plain, calibrated)


def test_state_dict_round_trip_and_mismatch():
    layer = Int8Linear.from_linear(_linear(48, 20, 1), "w8a16", group_size=12)
    sd = layer.state_dict()
    assert sd["weight_int8"].dtype == torch.int8 and sd["weight_scale"].shape == (20, 4)
    fresh = Int8Linear(48, 20, mode="w8a16", group_size=12)
    fresh.load_state_dict(sd)
    x = torch.randn(5, 48)
    assert torch.equal(fresh(x), layer(x))
    with pytest.raises(RuntimeError, match="weight_scale"):  # per-channel layer, per-group state
        Int8Linear(48, 20, mode="w8a16").load_state_dict(sd)
    with pytest.raises(RuntimeError, match="weight_int8"):
        Int8Linear(40, 20, mode="w8a16", group_size=8).load_state_dict(sd)
    bad = dict(sd, weight_int8=sd["weight_int8"].float())
    with pytest.raises(RuntimeError, match="weight_int8: expected torch.int8"):
        fresh.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="weight_int8"):  # a float nn.Linear's state has other keys
        fresh.load_state_dict(nn.Linear(48, 20).state_dict())


def test_int8_storage_is_4x_smaller():
    layer = Int8Linear.from_linear(_linear(256, 128, 0), "w8a8")
    size = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    fp32 = (256 * 128 + 128) * 4
    assert size <= fp32 / 3.9 + 128 * 4 * 2


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_straight_through_gradients(mode, seed):
    g = torch.Generator().manual_seed(seed)
    lin = _linear(40, 24, seed)
    layer = Int8Linear.from_linear(lin, mode, trainable=True, backend="cpu")
    x = torch.randn(2, 7, 40, generator=g).requires_grad_(True)
    dy = torch.randn(2, 7, 24, generator=g)
    layer(x).backward(dy)
    w = layer.dequantized_weight().double()
    x2, dy2 = x.detach().reshape(-1, 40).double(), dy.reshape(-1, 24).double()
    torch.testing.assert_close(x.grad.double().reshape(-1, 40), dy2 @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad.double(), dy2.t() @ x2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad.double(), dy2.sum(0), rtol=1e-5, atol=1e-5)


def test_requantizes_after_optimizer_step():
    layer = Int8Linear.from_linear(_linear(32, 16, 0), "w8a8", trainable=True, backend="cpu")
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(8, 32)
    layer(x).square().sum().backward()
    before = layer.weight_int8.clone()
    opt.step()
    layer(x)  # the first forward after the step re-quantizes the master weight
    fresh = Int8Linear.from_linear(_master_as_linear(layer), "w8a8")
    assert not torch.equal(layer.weight_int8, before)
    assert torch.equal(layer.weight_int8, fresh.weight_int8) and torch.equal(layer.weight_scale, fresh.weight_scale)


@pytest.mark.parametrize("mode,group_size", [("w8a8", None), ("w8a16", 8)])
def test_freeze_keeps_outputs_bitwise(mode, group_size):
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8))
    quantize_(model, mode, group_size=group_size, trainable=True, backend="cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 24)
    model(x).square().sum().backward()
    opt.step()  # the int8 copy is now stale until the next forward
    trained = model(x)
    frozen = freeze_(model)
    assert set(frozen) == {"0", "2"} and not any(m.trainable for m in frozen.values())
    assert all(not p.requires_grad for p in model.parameters()) and torch.equal(model(x), trained)
    size = sum(t.numel() for t in model.state_dict().values() if t.dtype == torch.float32)
    assert size < 24 * 16  # only scales and biases stay float


def _master_as_linear(layer):
    lin = nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        lin.weight.copy_(layer.weight)
        lin.bias.copy_(layer.bias)
    return lin


def test_distilling_quantized_mlp_recovers_accuracy():
    """A noisy int8 copy of a teacher, distilled for 200 steps through its int8 kernels, agrees with the
    teacher again."""
    from fastdistill import distill_loss

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(4.0)  # confident teacher logits: argmax agreement is a meaningful accuracy
        for p, tp in zip(student.parameters(), teacher.parameters()):
            p.copy_(tp + torch.randn_like(p) * 0.3)
    quantize_(student, "w8a8", trainable=True, backend="cpu")
    x_test = torch.randn(512, 32)

    def agreement():
        with torch.no_grad():
            return (student(x_test).argmax(-1) == teacher(x_test).argmax(-1)).float().mean().item()

    before = agreement()
    opt = torch.optim.Adam(student.parameters(), lr=2e-2)
    for _ in range(200):
        x = torch.randn(128, 32)
        with torch.no_grad():
            t = teacher(x)
        loss = distill_loss(student(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = agreement()
    assert after >= 0.75 and after > before + 0.3, (before, after)  # seen: 0.31 -> 0.84


def test_quantize_filter_and_twice():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 8)))
    quantize_(model, "w8a16", filter_fn=lambda m, name: name != "0")
    assert type(model[0]) is nn.Linear and isinstance(model[2][0], Int8Linear)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, "w8a8")


def test_bad_layer_input():
    with pytest.raises(ValueError, match="mode"):
        Int8Linear(8, 8, mode="w4a4")
    with pytest.raises(ValueError, match="group_size"):
        Int8Linear(10, 8, mode="w8a16", group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        Int8Linear(8, 8, mode="w8a8", group_size=4)
    with pytest.raises(ValueError, match="batches is empty"):
        calibrate(nn.Sequential(nn.Linear(4, 4)), [])
    with pytest.raises(ValueError, match="no nn.Linear"):
        calibrate(nn.Sequential(nn.ReLU()), [torch.randn(2, 4)])
    with pytest.raises(ValueError, match="smooth"):
        quantize_(nn.Sequential(nn.Linear(4, 4)), "w8a16", smooth={"0": torch.ones(4)})


def test_layer_compiles_fullgraph():
    torch._dynamo.reset()
    for trainable in (False, True):
        layer = Int8Linear.from_linear(_linear(24, 12, 0), "w8a8", trainable=trainable, backend="cpu")
        x = torch.randn(5, 24)
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
        assert torch.equal(compiled, eager)
