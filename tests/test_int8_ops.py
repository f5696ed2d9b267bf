"""int8 ops vs the reference: quantization and W8A8 bit-exact, W8A16 within the tolerance table."""
import pytest
import torch

from conftest import KERNEL_BACKENDS, backend_device
from fastdistill.quant import int8_linear, int8_weight_only_linear, quantize_per_token
from fastdistill.reference.int8_linear import (int8_linear_ref, int8_weight_only_linear_f64,
                                               int8_weight_only_linear_ref, quantize_per_token_ref,
                                               quantize_weight_ref)
from fastdistill.testing import assert_close_to_oracle

ALL = KERNEL_BACKENDS + ["reference"]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(1, 7, 5), (3, 33, 17), (17, 70, 45)]  # (M, K, N): M = 1, 3, 17; K, N not multiples of 8


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _int8(shape, g):
    return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (3, 33), (2, 17, 70)])
def test_quantize_per_token_bits(backend, dtype, shape, seed):
    g = _gen(seed)
    x = (torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 10).to(dtype)
    zero_row = x.shape[-2] > 1
    if zero_row:
        x[..., 0, :] = 0  # an all-zero row: scale 0, zeros
    device = backend_device(backend)
    q, s = quantize_per_token(x.to(device), backend=backend)
    qr, sr = quantize_per_token_ref(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == x.shape and s.shape == x.shape[:-1]
    assert torch.equal(q.cpu(), qr) and torch.equal(s.cpu(), sr)
    if zero_row:
        assert torch.all(s[..., 0] == 0) and torch.all(q[..., 0, :] == 0)
    assert int(q.abs().max()) == 127  # the largest |x| of a nonzero row maps to ±127


@pytest.mark.parametrize("backend", ALL)
def test_quantize_rounds_half_to_even(backend):
    # row max 127 -> inv = 1 exactly, so q = rint(x): ties go to the even integer
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 3.49]])
    q, s = quantize_per_token(x.to(backend_device(backend)), backend=backend)
    assert q.cpu().tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, 3]] and s.item() == 1.0


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
def test_int8_linear_bits(backend, out_dtype, shape, bias_dtype, seed):
    M, K, N = shape
    g = _gen(seed)
    x, w = _int8((M, K), g), _int8((N, K), g)
    xs, ws = torch.rand(M, generator=g) * 0.1, torch.rand(N, generator=g) * 0.1
    xs[0] = 0.0  # scale 0 (an all-zero token) gives exact zeros
    bias = None if bias_dtype is None else torch.randn(N, generator=g).to(bias_dtype)
    dev = backend_device(backend)
    out = int8_linear(x.to(dev), xs.to(dev), w.to(dev), ws.to(dev), None if bias is None else bias.to(dev),
                      out_dtype, backend=backend)
    ref = int8_linear_ref(x, xs, w, ws, bias, out_dtype)
    assert out.dtype == out_dtype and torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("backend", ALL)
def test_int8_accumulation_is_exact(backend):
    # sums of 127 * 127 over K = 1041 exceed 2^24: exact in int32, not in a float32 accumulator
    M, K, N = 3, 1041, 9
    x = torch.full((M, K), 127, dtype=torch.int8)
    w = torch.full((N, K), 127, dtype=torch.int8)
    w[1::2] = -127
    x[1, 5] = 126
    dev = backend_device(backend)
    ones_m, ones_n = torch.ones(M, device=dev), torch.ones(N, device=dev)
    out = int8_linear(x.to(dev), ones_m, w.to(dev), ones_n, backend=backend).cpu()
    exact = (x.long() @ w.long().t()).to(torch.int32).float()  # int32 -> float32 rounding, as in the kernels
    assert torch.equal(out, exact)
    acc = x.long() @ w.long().t()
    assert int(acc.abs().max()) > 2**24 and not torch.equal(acc.float().long(), acc)  # the case is sharp


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group", [0, "odd"])
def test_weight_only_vs_oracle(backend, dtype, shape, group, seed):
    M, K, N = shape
    g = _gen(seed)
    gs = 0 if group == 0 else next(d for d in (11, 7, 5, 3, 1) if K % d == 0)
    w_f = torch.randn(N, K, generator=g)
    w_f[2] = 0.0  # an all-zero output channel: scale 0, zero outputs (not NaN)
    q, s = quantize_weight_ref(w_f, gs)
    x = torch.randn(2, M, K, generator=g).to(dtype)  # leading batch dims
    bias = torch.randn(N, generator=g)
    dev = backend_device(backend)
    out = int8_weight_only_linear(x.to(dev), q.to(dev), s.to(dev), bias.to(dev), backend=backend).cpu()
    oracle = int8_weight_only_linear_f64(x.reshape(-1, K), q, s, bias, gs).reshape(2, M, N)
    ref = int8_weight_only_linear_ref(x, q, s, bias, gs)
    assert out.dtype == dtype and out.shape == (2, M, N)
    assert_close_to_oracle(out, oracle, ref, msg=f"{backend} {dtype} {shape} gs={gs}")
    assert torch.equal(out[..., 2], bias[2].to(dtype).expand(2, M))


@pytest.mark.parametrize("backend", ALL)
def test_weight_only_gradients(backend, seed):
    g = _gen(seed)
    M, K, N = 5, 24, 13
    q, s = quantize_weight_ref(torch.randn(N, K, generator=g), 8)
    x = torch.randn(M, K, generator=g, dtype=torch.float32)
    bias = torch.randn(N, generator=g)
    dy = torch.randn(M, N, generator=g)
    dev = backend_device(backend)
    xd, bd = x.to(dev).requires_grad_(True), bias.to(dev).requires_grad_(True)
    int8_weight_only_linear(xd, q.to(dev), s.to(dev), bd, backend=backend).backward(dy.to(dev))
    w = (q.double().reshape(N, 3, 8) * s.double().unsqueeze(-1)).reshape(N, K)
    torch.testing.assert_close(xd.grad.cpu().double(), dy.double() @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bd.grad.cpu().double(), dy.double().sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic(backend, seed):
    g = _gen(seed)
    dev = backend_device(backend)
    x = torch.randn(19, 70, generator=g).to(dev)
    w = torch.randn(45, 70, generator=g)
    q, s = (t.to(dev) for t in quantize_weight_ref(w))
    runs = []
    for _ in range(2):
        xq, xs = quantize_per_token(x, backend=backend)
        runs.append((xq, xs, int8_linear(xq, xs, q, s, backend=backend),
                     int8_weight_only_linear(x, q, s, backend=backend)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_sqnr_vs_float_linear():
    from fastdistill.testing import sqnr

    g = _gen(0)
    x, w = torch.randn(64, 256, generator=g), torch.randn(128, 256, generator=g) / 16
    exact = x @ w.t()
    q, s = quantize_weight_ref(w)
    w8a16 = int8_weight_only_linear(x, q, s, backend="cpu")
    xq, xs = quantize_per_token(x, backend="cpu")
    w8a8 = int8_linear(xq, xs, q, s, backend="cpu")
    assert sqnr(w8a16, exact) >= 40.0
    assert sqnr(w8a8, exact) >= 20.0
