"""quantize_per_token on special rows: NaN, inf, zero, tiny and denormal rows give the same bits on every backend
(the rule in csrc/ops.cpp: NaN row -> scale NaN 0x7fc00000, inf row -> scale inf, both with q = 0; rows with
max|x| < 2^-64 are scaled by 2^64 before 127 / max|x| is taken, so they do not saturate to +-127)."""
import pytest
import torch

from conftest import KERNEL_BACKENDS, backend_device
from fastdistill.quant import int8_linear, quantize_per_token
from fastdistill.reference.int8_linear import quantize_per_token_ref, quantize_weight_ref

ALL = KERNEL_BACKENDS + ["reference"]
NAN_BITS = 0x7FC00000
INF_BITS = 0x7F800000


def _bits(t):
    return t.contiguous().view(torch.int32)


def special_rows(K: int, dtype: torch.dtype, seed: int, denormals: bool = True) -> tuple[torch.Tensor, dict]:
    """Rows: normal, one NaN (in the vector body and in the tail), +inf, -inf with NaN, zeros, NaN with an odd
    payload and sign, and for float32/bf16 tiny rows: ~1e-37 (127 / max overflows), just below and above
    2^-64, 1e-30, and (with denormals) a row of float32 denormals."""
    g = torch.Generator().manual_seed(seed)
    rows, kinds = [], {}

    def add(kind, row):
        kinds.setdefault(kind, []).append(len(rows))
        rows.append(row)

    base = lambda: torch.randn(K, generator=g)  # noqa: E731
    add("normal", base())
    for pos in (0, K - 1, K // 2):
        r = base()
        r[pos] = float("nan")
        add("nan", r)
    r = base()
    r[K // 3] = float("inf")
    add("inf", r)
    r = base()
    r[0], r[K - 1] = float("-inf"), float("nan")
    add("nan", r)
    add("zero", torch.zeros(K))
    r = base()
    r.view(torch.int32)[1] = -0x3FFFFF  # 0xffc00001: a negative NaN with a payload
    add("nan", r)
    if dtype != torch.float16:  # fp16 cannot hold values below 2^-24
        for scale in (1e-37, 2.0**-64 * 0.999, 2.0**-64 * 1.001, 1e-30):  # |values| >= 0.2 * scale: normal
            add("tiny", (torch.rand(K, generator=g) + 0.2) * scale * torch.randn(K, generator=g).sign())
        if denormals:
            add("tiny", torch.randint(-100, 100, (K,), generator=g) * 1e-40)  # denormal in float32 and bf16
    return torch.stack(rows).to(dtype), kinds


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [7, 37, 70])
def test_special_rows_same_bits_on_every_backend(backend, dtype, K, seed):
    # the Triton interpreter converts bf16 denormals to float32 wrongly (GPUs convert them exactly), so
    # interpreted Triton gets no bf16 denormal row (float32 denormals it reads as they are)
    interpreted = backend == "triton" and backend_device(backend) == "cpu"
    x, kinds = special_rows(K, dtype, seed, denormals=not (interpreted and dtype == torch.bfloat16))
    q, s = quantize_per_token(x.to(backend_device(backend)), backend=backend)
    q, s = q.cpu(), s.cpu()
    qr, sr = quantize_per_token_ref(x)
    assert torch.equal(q, qr) and torch.equal(_bits(s), _bits(sr)), (q - qr, _bits(s) - _bits(sr))
    for i in kinds["nan"]:
        assert int(_bits(s)[i]) == NAN_BITS and torch.all(q[i] == 0)
    for i in kinds["inf"]:
        assert int(_bits(s)[i]) == INF_BITS and torch.all(q[i] == 0)
    for i in kinds["zero"]:
        assert s[i] == 0 and torch.all(q[i] == 0)
    for i in kinds.get("tiny", []) + kinds["normal"]:
        xf = x[i].double()
        exact = xf * 127 / xf.abs().max()  # what q approximates; tiny rows used to give +-127 everywhere
        assert (q[i].double() - exact).abs().max() <= 0.5 + 1e-4, (i, q[i], exact)
        assert int(q[i].abs().max()) == 127


@pytest.mark.parametrize("backend", ALL)
def test_weight_scales_and_linear_propagate_non_finite_rows(backend):
    """A NaN or inf activation row gives a NaN output row on every backend (0 * NaN / 0 * inf in the
    epilogue); the other rows are untouched, and the bits match the reference."""
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 21, generator=g)
    x[1, 4], x[2, 0] = float("nan"), float("-inf")
    q, s = (t.to(dev) for t in quantize_weight_ref(torch.randn(9, 21, generator=g)))
    xq, xs = quantize_per_token(x.to(dev), backend=backend)
    out = int8_linear(xq, xs, q, s, backend=backend).cpu()
    assert out[1:3].isnan().all() and torch.isfinite(out[[0, 3]]).all()
    xq_ref, xs_ref = quantize_per_token_ref(x)
    assert torch.equal(_bits(xs.cpu()), _bits(xs_ref))
    ref = int8_linear(xq_ref, xs_ref, q.cpu(), s.cpu(), backend="reference")
    assert torch.equal(_bits(out), _bits(ref))


def test_tiny_rows_are_scale_invariant():
    """At the 2^-64 switch the scaled and unscaled formulas give the same bits (scaling by 2^64 is exact),
    so the switch point is invisible: a row and the same row times 2^-60 quantize identically."""
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        x = torch.randn(8, 40, generator=g) * 2.0**-40
        for backend in ALL:
            xd = x.to(backend_device(backend))
            q_small, _ = quantize_per_token(xd * 2.0**-30, backend=backend)  # < 2^-64: scaled path
            q_large, _ = quantize_per_token(xd * 2.0**30, backend=backend)  # plain path
            assert torch.equal(q_small.cpu(), q_large.cpu()), backend
