"""CPU W8A8 on a packed weight (issue 14): every kernel path (scalar, AVX2, VNNI) gives the bits of
quantize_per_token + int8_linear (reference oracle: exact int64 sums + the same epilogue), worst-case saturation
inputs, -128 from raw user int8, NaN/inf rows, empty shapes, packed-weight errors, opcheck and torch.compile."""
import struct

import pytest
import torch

from fastdistill import _ext
from fastdistill.ops.int8_linear_packed import int8_linear_dynamic, pack_w8a8, packed_w8a8_bytes
from fastdistill.reference.int8_linear import int8_linear_ref, quantize_per_token_ref

pytestmark = pytest.mark.skipif(not _ext.is_available(), reason="needs the compiled extension")

PATH_ENV = "FASTDISTILL_INT8_CPU_PATH"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ops = torch.ops.fastdistill


def _path_available(path: str) -> str | None:
    """None if `path` runs on this CPU, else the op's reason."""
    import os
    old = os.environ.get(PATH_ENV)
    os.environ[PATH_ENV] = path
    try:
        ops.int8_linear_dynamic_cpu(torch.ones(1, 4), ops.int8_pack_w8a8_cpu(torch.ones(1, 4, dtype=torch.int8)),
                                    torch.ones(1), None, None, torch.float32)
        return None
    except ValueError as exc:
        return str(exc)
    finally:
        if old is None:
            del os.environ[PATH_ENV]
        else:
            os.environ[PATH_ENV] = old


PATHS = [pytest.param(p, marks=pytest.mark.skipif(_path_available(p) is not None if _ext.is_available() else False,
                                                  reason=f"this CPU lacks the {p} path"))
         for p in ("scalar", "avx2", "vnni", "vnni_scalar")]


@pytest.fixture
def gen(seed):
    return torch.Generator().manual_seed(seed)


def _as_bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _expected(x, w, ws, bias, smooth, out_dtype):
    xs = x if smooth is None else x * smooth.to(x.dtype)
    q, s = quantize_per_token_ref(xs)
    return int8_linear_ref(q, s, w, ws, bias, out_dtype)


def _assert_same(got, exp):
    """Bitwise equal, NaN where the oracle has NaN (its NaN payload may differ)."""
    nan = torch.isnan(exp)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(_as_bits(got)[~nan], _as_bits(exp)[~nan])


def _weights(N, K, g):
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    return w, torch.rand(N, generator=g) * 0.02 + 1e-3


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 17, 33), (5, 4097, 3), (17, 130, 40), (2, 0, 5)])  # (M, K, N)
def test_dynamic_bits(path, shape, gen, monkeypatch):
    monkeypatch.setenv(PATH_ENV, path)
    M, K, N = shape
    w, ws = _weights(N, K, gen)
    packed = pack_w8a8(w)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_w8a8_bytes(N, K)
    for dtype in DTYPES:
        x = (torch.randn(M, K, generator=gen) * 3).to(dtype)
        bias = torch.randn(N, generator=gen).to(dtype)
        smooth = torch.rand(K, generator=gen) + 0.5
        for b, s in ((None, None), (bias, None), (None, smooth), (bias, smooth)):
            for od in DTYPES:
                _assert_same(int8_linear_dynamic(x, packed, ws, b, s, od), _expected(x, w, ws, b, s, od))


@pytest.mark.parametrize("path", PATHS)
def test_batch_dims_nan_inf_rows(path, gen, monkeypatch):
    monkeypatch.setenv(PATH_ENV, path)
    K, N = 37, 21
    w, ws = _weights(N, K, gen)
    x = torch.randn(2, 3, K, generator=gen)
    x[0, 1, 5] = float("nan")
    x[1, 0, 2] = float("inf")
    x[1, 2] = 0.0
    x[0, 2] = 1e-30  # a tiny row (scaled by 2^64 before quantizing)
    out = int8_linear_dynamic(x, pack_w8a8(w), ws, None, None, torch.float32)
    assert out.shape == (2, 3, N)
    assert torch.isnan(out[0, 1]).all() and torch.isnan(out[1, 0]).all() and (out[1, 2] == 0).all()
    _assert_same(out, _expected(x, w, ws, None, None, torch.float32))


@pytest.mark.parametrize("path", PATHS)
def test_saturation_worst_cases(path, gen, monkeypatch):
    """|sums| of 4096 products of +-127 / -128: u8 x s8 pairs must never saturate int16 (nor int32 sums wrap)."""
    monkeypatch.setenv(PATH_ENV, path)
    K, N = 4096, 17
    sign = torch.where(torch.rand(K, generator=gen) < 0.5, -1, 1)
    w = torch.stack([torch.full((K,), 127), torch.full((K,), -127), 127 * sign, -127 * sign,
                     torch.full((K,), -128)] + [127 * torch.where(torch.rand(K, generator=gen) < 0.5, -1, 1)
                                                for _ in range(N - 5)]).to(torch.int8)
    a = torch.stack([torch.full((K,), 127), torch.full((K,), -127), 127 * sign, -127 * sign,
                     torch.full((K,), -128), torch.randint(-128, 128, (K,), generator=gen)]).to(torch.int8)
    ws, xs = torch.ones(N), torch.ones(a.shape[0])
    exact = a.double() @ w.double().t()
    assert exact.abs().max() == 128 * 128 * K  # the extreme sums are in the test
    for w_, a_ in ((w[:, :], a), (w[:4], a), (w, a[:4]), (w[:4], a[:4])):  # -128 in both / neither / one side
        got = ops.int8_linear_cpu(a_, xs[:a_.shape[0]], w_, ws[:w_.shape[0]], None, torch.float32)
        assert torch.equal(got, int8_linear_ref(a_, xs[:a_.shape[0]], w_, ws[:w_.shape[0]], None, torch.float32))
    # through quantization: rows of +-c quantize to +-127 exactly
    x = a[:4].float() / 127 * 3.5
    for w_ in (w, w[:4]):  # the packed weight with and without -128
        packed = pack_w8a8(w_)
        got = int8_linear_dynamic(x, packed, ws[:w_.shape[0]], None, None, torch.float32)
        _assert_same(got, _expected(x, w_, ws[:w_.shape[0]], None, None, torch.float32))


def test_pack_header_flags_and_padding():
    w = torch.tensor([[1, -128, 3], [4, 5, 6]], dtype=torch.int8)
    for ww, flag in ((w, 1), (w.clamp(min=-127), 0)):
        p = pack_w8a8(ww)
        magic, version, kind, layout, n, k, kp, gs, payload, flags = struct.unpack_from("<4I5qI", bytes(p[:60]))
        assert (n, k, kp, gs, kind, flags, payload) == (2, 3, 4, 0, 1, flag, p.numel() - 64)
        body = p[64:64 + 16 * 4].view(16, 4)  # one panel, one k-quad: [column][k]
        assert body[:2, :3].view(torch.int8).tolist() == ww.tolist() and (body[2:] == 0).all() and (body[:, 3] == 0).all()
        assert p[64 + 64:].view(torch.int32)[:3].tolist() == [int(ww[0].sum()), int(ww[1].sum()), 0]


@pytest.mark.parametrize("M,K,N", [(0, 5, 3), (3, 5, 0), (3, 0, 4), (0, 0, 0)])
def test_empty(M, K, N, monkeypatch):
    w = torch.ones(N, K, dtype=torch.int8)
    bias = torch.arange(N, dtype=torch.float32)
    got = int8_linear_dynamic(torch.randn(M, K), pack_w8a8(w), torch.ones(N), bias, None, torch.float32)
    assert got.shape == (M, N) and torch.equal(got, _expected(torch.randn(M, K), w, torch.ones(N), bias, None,
                                                               torch.float32))


@pytest.mark.parametrize("path", PATHS)
def test_parallel_deterministic(path, gen, monkeypatch):
    """A problem above the serial threshold (threads share the panels; 15 panels: an odd one for the two-panel
    tiles; 67 rows: row tails of every tile height): same bits as the oracle, run to run."""
    monkeypatch.setenv(PATH_ENV, path)
    M, K, N = 67, 301, 230
    w, ws = _weights(N, K, gen)
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
    packed = pack_w8a8(w)
    a = int8_linear_dynamic(x, packed, ws, None, None, torch.float32)
    assert torch.equal(a, int8_linear_dynamic(x, packed, ws, None, None, torch.float32))
    _assert_same(a, _expected(x, w, ws, None, None, torch.float32))



@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threads", [1, 2])
def test_small_weight_rows_split(path, threads, gen, monkeypatch):
    """A small weight (packed W within L2) with >= 96 rows: threads split the ROWS in one region (the demo's
    layers; N = 21 is two panels, one of them partial), 48-row tasks with a 10-row tail:
    same bits as the oracle at 1 and 2 threads."""
    monkeypatch.setenv(PATH_ENV, path)
    M, K, N = 202, 70, 21
    w, ws = _weights(N, K, gen)
    x = torch.randn(M, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = int8_linear_dynamic(x, pack_w8a8(w), ws, bias, None, torch.float32)
    finally:
        torch.set_num_threads(before)
    _assert_same(out, _expected(x, w, ws, bias, None, torch.float32))

def _header_with(p, offset, fmt, value):
    q = p.clone()
    q[offset:offset + struct.calcsize(fmt)] = torch.tensor(list(struct.pack(fmt, value)), dtype=torch.uint8)
    return q


def test_packed_weight_errors():
    w = torch.ones(8, 12, dtype=torch.int8)
    p = pack_w8a8(w)
    x, ws = torch.randn(2, 12), torch.ones(8)
    cases = [
        (x[:, :8], p, ws, "packed for K = 12"),
        (x, p, torch.ones(9), "packed for N = 8"),
        (x, _header_with(p, 0, "<I", 0), ws, "bad magic"),
        (x, _header_with(p, 4, "<I", 99), ws, "format version 99"),
        (x, _header_with(p, 8, "<I", 2), ws, "packed for w8a16"),
        (x, _header_with(p, 12, "<I", 77), ws, "layout 77"),
        (x, p[:-4], ws, "truncated"),
    ]
    for xx, pp, ss, match in cases:
        with pytest.raises(ValueError, match=f"w_packed: .*{match}"):
            int8_linear_dynamic(xx, pp, ss)
    with pytest.raises(ValueError, match="w_packed: expected a 1-D uint8"):
        int8_linear_dynamic(x, p.view(torch.int8), ws)
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        int8_linear_dynamic(torch.ones(2, 12, dtype=torch.int8), p, ws)
    with pytest.raises(ValueError, match=r"smooth_inv: expected shape \(12,\)"):
        int8_linear_dynamic(x, p, ws, smooth_inv=torch.ones(11))
    with pytest.raises(TypeError, match="smooth_inv: expected float32"):
        int8_linear_dynamic(x, p, ws, smooth_inv=torch.ones(12, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"bias: expected shape \(8,\)"):
        int8_linear_dynamic(x, p, ws, bias=torch.ones(7))
    with pytest.raises(TypeError, match="out_dtype"):
        int8_linear_dynamic(x, p, ws, out_dtype=torch.float64)
    with pytest.raises(TypeError, match="w_int8: expected int8"):
        pack_w8a8(torch.ones(3, 4))


def test_bad_path_env(monkeypatch):
    monkeypatch.setenv(PATH_ENV, "sse9")
    with pytest.raises(ValueError, match=f"{PATH_ENV}: expected auto, scalar, avx2, vnni or vnni_scalar"):
        int8_linear_dynamic(torch.randn(1, 4), pack_w8a8(torch.ones(2, 4, dtype=torch.int8)), torch.ones(2))


def test_opcheck(gen):
    w, ws = _weights(20, 9, gen)
    torch.library.opcheck(ops.int8_pack_w8a8_cpu, (w,))
    p = ops.int8_pack_w8a8_cpu(w)
    x = torch.randn(3, 9, generator=gen)
    for args in ((x, p, ws, None, None, torch.float32), (x, p, ws, torch.randn(20), torch.rand(9) + 0.5,
                                                          torch.bfloat16)):
        torch.library.opcheck(ops.int8_linear_dynamic_cpu, args)


def test_compile_fullgraph(gen):
    w, ws = _weights(24, 40, gen)
    p = pack_w8a8(w)
    bias = torch.randn(24, generator=gen)

    def f(x):
        return int8_linear_dynamic(x, p, ws, bias) * 2

    x = torch.randn(2, 5, 40, generator=gen)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(got, f(x))
