"""CPU W8A16 on a packed weight (issue 14): parity with the unpacked op, the reference and the float64 oracle
(odd shapes, groups, dtypes, bias, smooth_inv, batch dims, NaN/inf rows, empty shapes), the scalar and AVX2 tiles
bitwise equal, the same bits for any thread count, the packed layout, packed-weight errors, opcheck, compile."""
import os
import struct

import pytest
import torch

from fastdistill import _ext
from fastdistill.ops.int8_weight_only_packed import (int8_weight_only_linear_packed, pack_w8a16,
                                                     packed_w8a16_bytes)
from fastdistill.reference.int8_linear import int8_weight_only_linear_f64, int8_weight_only_linear_ref
from fastdistill.testing import assert_close_to_oracle

pytestmark = pytest.mark.skipif(not _ext.is_available(), reason="needs the compiled extension")

PATH_ENV = "FASTDISTILL_INT8_CPU_PATH"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ops = torch.ops.fastdistill


def _weights(N, K, gs, gen):
    q = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    G = K // gs if gs else 0
    shape = (N, G) if gs else (N,)
    s = torch.rand(shape, generator=gen) * 0.02 + 1e-3
    return q, s


def _run(path, fn):
    old = os.environ.get(PATH_ENV)
    os.environ[PATH_ENV] = path
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[PATH_ENV]
        else:
            os.environ[PATH_ENV] = old


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("M,N,K,gs", [(0, 7, 5, 0), (1, 1, 1, 0), (3, 7, 5, 0), (17, 33, 5, 0), (33, 7, 4097, 0),
                                      (1, 33, 4097, 17), (3, 33, 12, 3), (17, 7, 12, 4), (2, 9, 64, 16),
                                      (70, 9, 33, 0), (66, 17, 12, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_oracle_and_unpacked(M, N, K, gs, dtype):
    gen = torch.Generator().manual_seed(M * 1000 + N * 10 + K + gs)
    q, s = _weights(N, K, gs, gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype) if M % 2 else None
    got = int8_weight_only_linear_packed(x, pack_w8a16(q, gs), s, bias)
    assert got.dtype == dtype and got.shape == (M, N)
    oracle = int8_weight_only_linear_f64(x, q, s, bias, gs)
    assert_close_to_oracle(got, oracle, int8_weight_only_linear_ref(x, q, s, bias, gs), msg="packed vs oracle")
    unpacked = ops.int8_weight_only_linear_cpu(x, q, s, bias, gs)
    assert_close_to_oracle(unpacked, oracle, int8_weight_only_linear_ref(x, q, s, bias, gs), msg="unpacked")


@pytest.mark.parametrize("M", [1, 5, 20, 65])
@pytest.mark.parametrize("dtype", DTYPES)
def test_smooth_inv_is_x_times_smooth_rounded(M, dtype):
    """smooth_inv gives the bits of the op on (x * smooth_inv.to(x.dtype)) rounded to x's dtype."""
    gen = torch.Generator().manual_seed(M)
    q, s = _weights(9, 40, 8, gen)
    x = torch.randn(M, 40, generator=gen).to(dtype)
    smooth = torch.rand(40, generator=gen) * 3 + 0.1
    p = pack_w8a16(q, 8)
    bias = torch.randn(9, generator=gen, dtype=torch.bfloat16)  # any float dtype
    got = int8_weight_only_linear_packed(x, p, s, bias, smooth)
    exp = int8_weight_only_linear_packed(x * smooth.to(dtype), p, s, bias)
    assert torch.equal(_bits(got), _bits(exp))


@pytest.mark.parametrize("M", [1, 2, 3, 4, 6, 8, 11, 16])
@pytest.mark.parametrize("gs", [0, 5])
def test_scalar_and_avx2_tiles_same_bits(M, gs):
    gen = torch.Generator().manual_seed(M + gs)
    q, s = _weights(75, 45, gs, gen)  # 10 panels, the last partial: every tile width and the one-panel tail
    x = torch.randn(M, 45, generator=gen)
    bias = torch.randn(75, generator=gen)
    p = pack_w8a16(q, gs)
    scalar = _run("scalar", lambda: int8_weight_only_linear_packed(x, p, s, bias))
    auto = _run("auto", lambda: int8_weight_only_linear_packed(x, p, s, bias))
    assert torch.equal(_bits(scalar), _bits(auto))
    oracle = int8_weight_only_linear_f64(x, q, s, bias, gs)
    assert_close_to_oracle(scalar, oracle, int8_weight_only_linear_ref(x, q, s, bias, gs), msg="scalar")


@pytest.mark.parametrize("M", [3, 24, 65])
def test_same_bits_for_any_thread_count(M):
    gen = torch.Generator().manual_seed(M)
    q, s = _weights(200, 2048, 0, gen)  # M * N * K >= 2^20: the small-M path runs in parallel
    x = torch.randn(M, 2048, generator=gen)
    p = pack_w8a16(q)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = int8_weight_only_linear_packed(x, p, s)
        torch.set_num_threads(2)
        two = int8_weight_only_linear_packed(x, p, s)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(_bits(one), _bits(two))
    assert torch.equal(_bits(one), _bits(int8_weight_only_linear_packed(x, p, s)))


@pytest.mark.parametrize("M", [4, 20, 65])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_rows_propagate_to_their_row_only(M, dtype):
    gen = torch.Generator().manual_seed(M)
    q, s = _weights(11, 24, 0, gen)
    q[:, 0] = 1  # no zero weight at k = 0: inf * w is inf or -inf in every output
    x = torch.randn(M, 24, generator=gen).to(dtype)
    p = pack_w8a16(q)
    clean = int8_weight_only_linear_packed(x, p, s)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    got = int8_weight_only_linear_packed(x, p, s)
    assert torch.isnan(got[1]).all() and torch.isinf(got[2]).all()
    keep = [i for i in range(M) if i not in (1, 2)]
    assert torch.equal(_bits(got[keep]), _bits(clean[keep]))


def test_batch_dims_and_empty_inputs():
    gen = torch.Generator().manual_seed(5)
    q, s = _weights(7, 10, 0, gen)
    p = pack_w8a16(q)
    x = torch.randn(2, 3, 10, generator=gen)
    got = int8_weight_only_linear_packed(x, p, s)
    assert got.shape == (2, 3, 7)
    assert torch.equal(got.reshape(6, 7), int8_weight_only_linear_packed(x.reshape(6, 10), p, s))
    assert int8_weight_only_linear_packed(torch.randn(2, 0, 10), p, s).shape == (2, 0, 7)
    bias = torch.randn(7, generator=gen)
    q0 = torch.zeros(7, 0, dtype=torch.int8)
    out = int8_weight_only_linear_packed(torch.randn(3, 0), pack_w8a16(q0), torch.full((7,), float("inf")), bias)
    assert torch.equal(out, bias.expand(3, 7))  # empty sums: the bias (the scales multiply nothing)
    assert torch.equal(int8_weight_only_linear_packed(torch.randn(3, 0), pack_w8a16(q0), s), torch.zeros(3, 7))
    qn = torch.zeros(0, 10, dtype=torch.int8)
    assert int8_weight_only_linear_packed(x, pack_w8a16(qn), torch.ones(0)).shape == (2, 3, 0)


def test_packed_layout():
    """[ceil(N / 8)][K][8] int8 after a 64-byte header, panels round_up(8 K, 64) + 64 bytes apart; channels past
    N and the padding are zero."""
    gen = torch.Generator().manual_seed(0)
    q, _ = _weights(11, 10, 0, gen)
    p = pack_w8a16(q, 5)
    stride = 128 + 64  # 80 bytes of weights rounded to 128, plus one line
    assert p.dtype == torch.uint8 and p.numel() == packed_w8a16_bytes(11, 10) == 64 + 2 * stride
    padded = torch.cat([q, torch.zeros(5, 10, dtype=torch.int8)])
    panels = torch.zeros(2, stride, dtype=torch.int8)
    panels[:, :80] = padded.view(2, 8, 10).transpose(1, 2).reshape(2, 80)
    assert torch.equal(p[64:].view(torch.int8), panels.view(-1))
    magic, version, kind, layout, n, k, kp, gs, nbytes = struct.unpack_from("<4I5q", p.numpy().tobytes())
    assert (kind, n, k, kp, gs, nbytes) == (2, 11, 10, 10, 5, 2 * stride)


def _header_field(p, fmt, offset, value):
    b = bytearray(p.numpy().tobytes())
    struct.pack_into(fmt, b, offset, value)
    return torch.frombuffer(b, dtype=torch.uint8).clone()


def test_packed_weight_errors():
    gen = torch.Generator().manual_seed(1)
    q, s = _weights(9, 16, 4, gen)
    p = pack_w8a16(q, 4)
    x = torch.randn(2, 16, generator=gen)
    cases = [
        (torch.randn(2, 8), p, s, "K = 16"),                                    # another K
        (x, p, s[:5], "N = 9"),                                                # another N
        (x, p, torch.ones(9), "group_size 4"),                                 # per channel scales, grouped pack
        (x, p, torch.ones(9, 2), "group_size 4"),                              # another group_size
        (x, pack_w8a16(q), torch.ones(9, 4), "group_size 0"),
        (x, ops.int8_pack_w8a8_cpu(q), s, "w8a8"),                             # another kind
        (x, _header_field(p, "<I", 4, 99), s, "version 99"),                   # another version
        (x, _header_field(p, "<I", 12, 7), s, "layout 7"),                     # another layout / ISA
        (x, _header_field(p, "<I", 0, 0), s, "magic"),
        (x, p[:-1].clone(), s, "truncated"),
        (x, _header_field(p, "<q", 32, 17), s, "corrupted"),                   # k_padded inconsistent
    ]
    for xi, pi, si, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            int8_weight_only_linear_packed(xi, pi, si)
        assert str(info.value).startswith(("w_packed", "w_scale")), str(info.value)


def test_argument_errors():
    q = torch.zeros(4, 6, dtype=torch.int8)
    p, s, x = pack_w8a16(q), torch.ones(4), torch.ones(2, 6)
    with pytest.raises(ValueError, match="^group_size"):
        pack_w8a16(q, 4)
    with pytest.raises(TypeError, match="^group_size"):
        pack_w8a16(q, 2.0)
    with pytest.raises((TypeError, ValueError), match="^w_int8"):
        pack_w8a16(q.float())
    with pytest.raises(TypeError, match="^x"):
        int8_weight_only_linear_packed(x.double(), p, s)
    with pytest.raises(ValueError, match="^w_packed"):
        int8_weight_only_linear_packed(x, p.view(torch.int8), s)
    with pytest.raises(TypeError, match="^w_scale"):
        int8_weight_only_linear_packed(x, p, s.double())
    with pytest.raises(ValueError, match="^bias"):
        int8_weight_only_linear_packed(x, p, s, torch.ones(5))
    with pytest.raises(ValueError, match="^smooth_inv"):
        int8_weight_only_linear_packed(x, p, s, None, torch.ones(5))
    with pytest.raises(TypeError, match="^smooth_inv"):
        int8_weight_only_linear_packed(x, p, s, None, torch.ones(6, dtype=torch.float16))
    if torch.device("meta").type == "meta":
        with pytest.raises(ValueError, match="^x"):
            int8_weight_only_linear_packed(x.to("meta"), p, s)


def test_opcheck_and_compile():
    gen = torch.Generator().manual_seed(3)
    q, s = _weights(10, 12, 4, gen)
    p = pack_w8a16(q, 4)
    x = torch.randn(3, 12, generator=gen, dtype=torch.bfloat16)
    bias, smooth = torch.randn(10, generator=gen), torch.rand(12, generator=gen) + 0.5
    torch.library.opcheck(ops.int8_pack_w8a16_cpu, (q, 4))
    torch.library.opcheck(ops.int8_weight_only_linear_packed_cpu, (x, p, s, bias, smooth))
    fn = torch.compile(int8_weight_only_linear_packed, fullgraph=True, backend="eager")
    assert torch.equal(fn(x, p, s, bias, smooth), int8_weight_only_linear_packed(x, p, s, bias, smooth))
    packer = torch.compile(pack_w8a16, fullgraph=True, backend="eager")
    assert torch.equal(packer(q, 4), p)
