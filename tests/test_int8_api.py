"""int8 ops: custom-op contracts (opcheck, compile fullgraph), validation errors, special values."""
import importlib

import pytest
import torch

from conftest import KERNEL_BACKENDS, backend_device
from fastdistill.ops.common import native
from fastdistill.quant import int8_linear, int8_weight_only_linear, quantize_per_token
from fastdistill.reference.int8_linear import quantize_weight_ref

# the modules (fastdistill.ops re-exports functions of the same names)
l8, wo, qpt = (importlib.import_module(f"fastdistill.ops.{m}")
               for m in ("int8_linear", "int8_weight_only_linear", "quantize_per_token"))


def _ops(backend):
    """(quantize_per_token op, int8_linear op, int8_weight_only_linear op) of a backend."""
    if backend == "triton":
        return qpt.quantize_per_token_triton, l8.int8_linear_triton, wo.int8_weight_only_linear_triton
    lin = l8.int8_linear_cuda if backend == "cuda" else native("int8_linear_cpu")
    return native(f"quantize_per_token_{backend}"), lin, native(f"int8_weight_only_linear_{backend}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend, seed):
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(seed)
    quant, lin, weight_only = _ops(backend)
    x = torch.randn(5, 19, generator=g).to(dev)
    torch.library.opcheck(quant, (x,))
    q, s = (t.to(dev) for t in quantize_weight_ref(torch.randn(11, 19, generator=g)))
    xq, xs = quant(x)
    bias = torch.randn(11, generator=g).to(dev)
    torch.library.opcheck(lin, (xq, xs, q, s, bias, torch.bfloat16))
    torch.library.opcheck(lin, (xq, xs, q, s, None, torch.float32))
    torch.library.opcheck(weight_only, (x.requires_grad_(True), q, s, bias, 0))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_compile_fullgraph_matches_eager(backend, seed):
    dev = backend_device(backend)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(seed)
    q, s = (t.to(dev) for t in quantize_weight_ref(torch.randn(13, 21, generator=g)))
    q7, s7 = (t.to(dev) for t in quantize_weight_ref(torch.randn(13, 21, generator=g), 7))
    x = torch.randn(2, 3, 21, generator=g).to(dev)

    def step(x):
        xq, xs = quantize_per_token(x, backend=backend)
        a = int8_linear(xq, xs, q, s, out_dtype=x.dtype, backend=backend)
        b = int8_weight_only_linear(x, q7, s7, backend=backend)
        return (a + b).sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager" if dev == "cpu" else "inductor")):
        xx = x.clone().requires_grad_(True)
        out = fn(xx)
        out.backward()
        results.append((out.detach(), xx.grad))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_bad_inputs():
    x = torch.randn(4, 16)
    q, s = quantize_weight_ref(torch.randn(8, 16))
    xq, xs = quantize_per_token(x, backend="reference")
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        quantize_per_token(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        int8_weight_only_linear(xq, q, s)
    with pytest.raises(TypeError, match="x_int8: expected int8"):
        int8_linear(x, xs, q, s)
    with pytest.raises(ValueError, match=r"x_scale: expected shape \(4,\)"):
        int8_linear(xq, xs[:3], q, s)
    with pytest.raises(TypeError, match="w_scale: expected float32"):
        int8_linear(xq, xs, q, s.double())
    with pytest.raises(ValueError, match=r"w_scale: expected shape \(8,\)"):
        int8_linear(xq, xs, q, s[:5])
    with pytest.raises(ValueError, match=r"w_int8: expected shape \(N, 16\)"):
        int8_linear(xq, xs, q[:, :12], s)
    with pytest.raises(ValueError, match=r"bias: expected shape \(8,\)"):
        int8_linear(xq, xs, q, s, torch.zeros(7))
    with pytest.raises(TypeError, match="out_dtype"):
        int8_linear(xq, xs, q, s, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="group_size must divide K"):
        int8_weight_only_linear(x, q, torch.ones(8, 3))
    with pytest.raises(ValueError, match="w_scale: expected shape"):
        int8_weight_only_linear(x, q, torch.ones(7))
    with pytest.raises(ValueError, match="backend"):
        quantize_per_token(x, backend="tpu")
    bad = x.clone()
    bad[1, 3] = float("inf")
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_per_token(bad, validate=True)
    with pytest.raises(ValueError, match="inf or NaN"):
        int8_weight_only_linear(bad.masked_fill(bad.isinf(), float("nan")), q, s, validate=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_zero_rows_and_channels_give_zeros(backend):
    dev = backend_device(backend)
    x = torch.zeros(3, 10, device=dev)
    x[1] = torch.arange(10.0)
    w = torch.randn(6, 10)
    w[4] = 0.0
    q, s = (t.to(dev) for t in quantize_weight_ref(w))
    assert s[4] == 0 and torch.all(q[4] == 0)
    xq, xs = quantize_per_token(x, backend=backend)
    for out in (int8_linear(xq, xs, q, s, backend=backend), int8_weight_only_linear(x, q, s, backend=backend)):
        assert torch.isfinite(out).all() and torch.all(out[0] == 0) and torch.all(out[:, 4] == 0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("M,K,N", [(0, 8, 5), (3, 0, 5), (3, 8, 0)])
def test_empty_shapes(backend, M, K, N):
    dev = backend_device(backend)
    x = torch.randn(M, K, device=dev)
    w, ws, bias = torch.ones(N, K, dtype=torch.int8, device=dev), torch.rand(N, device=dev), torch.ones(N, device=dev)
    q, s = quantize_per_token(x, backend=backend)
    assert q.shape == (M, K) and torch.equal(s, torch.zeros(M, device=dev) if K == 0 else s)
    outs = (int8_linear(q, s, w, ws, bias, backend=backend), int8_weight_only_linear(x, w, ws, bias, backend=backend))
    for out in outs:
        assert out.shape == (M, N) and torch.equal(out, torch.ones(M, N, device=dev) if K == 0 else out)
        assert not out.isnan().any()
