"""Int8Linear / quantize_ / calibrate / freeze_ at the boundary: frozen layers pass gradients on, SmoothQuant
factors are validated, validate=True, float64 models, and clear errors for wrong argument types."""
import pytest
import torch
from torch import nn

from conftest import KERNEL_BACKENDS, backend_device
from fastdistill.quant import Int8Linear, calibrate, freeze_, quantize_

LAYER_BACKENDS = KERNEL_BACKENDS + ["reference"]
BAD_FACTORS = {"zero": 0.0, "negative": -2.0, "nan": float("nan"), "inf": float("inf")}


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 6))


@pytest.mark.parametrize("backend", LAYER_BACKENDS)
@pytest.mark.parametrize("mode,smooth", [("w8a8", False), ("w8a8", True), ("w8a16", False)])
def test_frozen_layer_passes_gradient_to_earlier_layers(backend, mode, smooth, seed):
    """A Linear before a frozen Int8Linear gets dW = (dy @ W_deq)^T x (straight through the activation
    quantization in W8A8); it used to get no gradient at all in W8A8."""
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    first, second = nn.Linear(12, 20).to(dev), nn.Linear(20, 6).to(dev)
    factors = (torch.rand(20, generator=g) + 0.5).to(dev) if smooth else None
    layer = Int8Linear.from_linear(second, mode, smooth=factors, backend=backend)
    assert not layer.trainable
    x, dy = torch.randn(5, 12, generator=g), torch.randn(5, 6, generator=g)
    layer(first(x.to(dev))).backward(dy.to(dev))
    dh = dy.double() @ layer.dequantized_weight().cpu().double()  # W_deq with the smoothing undone
    assert first.weight.grad is not None and float(first.weight.grad.abs().sum()) > 0
    torch.testing.assert_close(first.weight.grad.cpu().double(), dh.t() @ x.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first.bias.grad.cpu().double(), dh.sum(0), rtol=1e-5, atol=1e-5)
    assert all(b.grad is None for b in layer.buffers())


def test_frozen_model_after_freeze_still_trains_its_float_layers():
    model = _mlp()
    quantize_(model, "w8a8", filter_fn=lambda m, name: name == "2", trainable=True, backend="cpu")
    freeze_(model)
    model(torch.randn(4, 12)).square().sum().backward()
    assert float(model[0].weight.grad.abs().sum()) > 0


# ---- SmoothQuant factors ----

@pytest.mark.parametrize("kind", sorted(BAD_FACTORS))
def test_bad_smooth_factors_raise(kind):
    factors = torch.ones(20)
    factors[7] = BAD_FACTORS[kind]
    with pytest.raises(ValueError, match=r"^smooth: factors must be finite and > 0, got .* at input channel 7"):
        Int8Linear.from_linear(nn.Linear(20, 6), "w8a8", smooth=factors)
    model = _mlp()
    with pytest.raises(ValueError, match=r"^smooth\['2'\]: factors must be finite and > 0"):
        quantize_(model, "w8a8", smooth={"2": factors})
    assert type(model[2]) is nn.Linear  # nothing replaced


def test_smooth_of_wrong_type_or_shape_raises():
    with pytest.raises(TypeError, match="^smooth: expected a dict"):
        quantize_(_mlp(), "w8a8", smooth=[torch.ones(12), torch.ones(20)])
    with pytest.raises(TypeError, match="^smooth: expected a torch.Tensor"):
        Int8Linear.from_linear(nn.Linear(4, 3), "w8a8", smooth=[1.0] * 4)
    with pytest.raises(TypeError, match=r"^smooth\['0'\]: expected a torch.Tensor"):
        quantize_(_mlp(), "w8a8", smooth={"0": [1.0] * 12})
    with pytest.raises(ValueError, match=r"^smooth: expected shape \(4,\)"):
        Int8Linear.from_linear(nn.Linear(4, 3), "w8a8", smooth=torch.ones(5))
    with pytest.raises(TypeError, match="^smooth: expected a floating-point"):
        Int8Linear.from_linear(nn.Linear(4, 3), "w8a8", smooth=torch.ones(4, dtype=torch.int64))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_calibrate_refuses_non_finite_batches(bad):
    model = _mlp()
    batches = [torch.randn(8, 12), torch.randn(8, 12)]
    batches[1][3, 5] = bad
    with pytest.raises(ValueError, match=r"^batches: batch 1 gives inf/NaN activations at the input of layer '0' "
                                         r"\(input channel 5\)"):
        calibrate(model, batches)
    factors = calibrate(model, batches[:1])  # the hooks were removed: calibrating again works
    assert all(bool(torch.isfinite(f).all() and (f > 0).all()) for f in factors.values())


def test_calibrate_refuses_non_finite_weights_and_bad_alpha():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[1, 3] = float("inf")
    with pytest.raises(ValueError, match="^model: layer '2' has inf/NaN weights"):
        calibrate(model, [torch.randn(4, 12)])
    for alpha, err in ((float("nan"), ValueError), (1.5, ValueError), ("0.5", TypeError)):
        with pytest.raises(err, match="^smooth_alpha"):
            calibrate(_mlp(), [torch.randn(4, 12)], smooth_alpha=alpha)


@pytest.mark.parametrize("kind", sorted(BAD_FACTORS))
def test_load_state_dict_refuses_bad_smooth_inv(kind):
    layer = Int8Linear.from_linear(nn.Linear(8, 4), "w8a8", smooth=torch.rand(8) + 0.5)
    sd = layer.state_dict()
    sd["smooth_inv"][2] = BAD_FACTORS[kind]
    with pytest.raises(RuntimeError, match="smooth_inv: factors must be finite and > 0"):
        Int8Linear(8, 4, smooth=True).load_state_dict(sd)


# ---- validate=True, float64, argument types ----

@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_validate_true_refuses_non_finite_activations(mode):
    layer = Int8Linear(8, 4, mode=mode, validate=True)  # the README's spelling
    assert layer.validate and "validate=True" in repr(layer)
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="^x: contains inf or NaN"):
        layer(x)
    lin = nn.Linear(8, 4)
    for strict in (Int8Linear.from_linear(lin, mode, validate=True, trainable=True),
                   quantize_(nn.Sequential(lin), mode, validate=True)[0]):
        with pytest.raises(ValueError, match="^x: contains inf or NaN"):
            strict(x)
    assert Int8Linear.from_linear(lin, mode, validate=True, trainable=True).frozen().validate
    out = Int8Linear.from_linear(lin, mode)(x)  # default: the NaN row stays NaN, the others finite
    assert out[1].isnan().all() and torch.isfinite(out[[0, 2]]).all()
    with pytest.raises(TypeError, match="^validate: expected a bool"):
        Int8Linear(8, 4, validate="yes")


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("trainable", [False, True])
def test_float64_model_quantizes_and_runs(mode, trainable):
    """float64 layers compute in float32 and return float64 (int8 precision is far below float32's); the
    forward used to fail on an out_dtype the user never passed."""
    model = _mlp().double()
    reference = _mlp()
    quantize_(model, mode, trainable=trainable, backend="cpu")
    quantize_(reference, mode, trainable=trainable, backend="cpu")
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    out = model(x)
    assert out.dtype == torch.float64
    assert torch.equal(out, reference(x.detach().float()).double())
    out.sum().backward()
    assert x.grad.dtype == torch.float64 and float(x.grad.abs().sum()) > 0
    quantize_(_mlp(), mode).double()(x.detach())  # .double() after quantize_: float64 scale buffers work too


def test_wrong_argument_types_name_the_argument():
    t = torch.randn(4, 4)
    with pytest.raises(TypeError, match=r"^model: expected an nn.Module, got Tensor \(quantize_"):
        quantize_(t)
    with pytest.raises(TypeError, match=r"^model: expected an nn.Module, got Tensor \(calibrate"):
        calibrate(t, [t])
    with pytest.raises(TypeError, match=r"^model: expected an nn.Module, got Tensor \(freeze_"):
        freeze_(t)
    with pytest.raises(TypeError, match="^model: a bare nn.Linear"):
        quantize_(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="^model: a bare Int8Linear"):
        freeze_(Int8Linear(4, 4))
    for args, name in (((-1, 4), "in_features"), ((4, -3), "out_features")):
        with pytest.raises(ValueError, match=f"^{name}: must be >= 0"):
            Int8Linear(*args)
    with pytest.raises(TypeError, match="^in_features: expected an int"):
        Int8Linear(4.0, 4)
    with pytest.raises(TypeError, match="^out_features: expected an int"):
        Int8Linear(4, True)
