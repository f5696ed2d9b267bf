"""GPU checks of the int8 CUDA kernels (fastdistill::*_cuda, run by benchmarks/gpu_check.sh) against the reference.

quantize_per_token and the W8A8 epilogue must give the reference's bits (csrc/ops.cpp fixes their
arithmetic); W8A16 is judged against a float64 oracle with the tolerance table. Shapes cover every kernel
path: M across the decode (<= 8, <= 16) and tiled configs, K multiples of 64 / of 16 only (tensor-core
path with a K tail) / odd (fp32-tiled fallback), per-channel and group scales (64-multiples take the
tensor-core path, others the fallback), N tails, and fp32 x (always the fallback).
"""
import os
import subprocess
import sys

import pytest
import torch

import fastdistill  # noqa: F401  (loads the extension: torch.ops.fastdistill.*)
from fastdistill import _ext
from fastdistill.reference.int8_linear import (int8_epilogue_ref, int8_weight_only_linear_f64,
                                               int8_weight_only_linear_ref, quantize_per_token_ref)
from fastdistill.testing import assert_close_to_oracle

pytestmark = pytest.mark.gpu
assert _ext.load_error() is None or not torch.cuda.is_available(), _ext.load_error()  # registers the ops
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ops = torch.ops.fastdistill


def randn(shape, dtype, seed, scale=1.0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def rand_int8(shape, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K", [(1, 1), (3, 7), (17, 1001), (4097, 64), (5, 8200), (2, 4096), (6, 0)])
def test_quantize_per_token_bitwise(dtype, M, K, seed):
    x = randn((M, K), dtype, seed, scale=3.0)
    if M > 1:
        x[1] = 0  # all-zero row: scale 0, q 0
    q, scale = ops.quantize_per_token_cuda(x)
    q_ref, scale_ref = quantize_per_token_ref(x.cpu())
    assert q.dtype == torch.int8 and q.shape == (M, K) and scale.dtype == torch.float32 and scale.shape == (M,)
    assert torch.equal(scale.cpu(), scale_ref), (scale.cpu() - scale_ref).abs().max()
    assert torch.equal(q.cpu(), q_ref), (q.cpu().int() - q_ref.int()).abs().max()
    if M > 1:
        assert scale[1] == 0 and not q[1].any()
    if _ext.has_kernel("quantize_per_token_cpu", "CPU"):  # every backend gives the same bits
        q_cpu, scale_cpu = ops.quantize_per_token_cpu(x.cpu())
        assert torch.equal(q.cpu(), q_cpu) and torch.equal(scale.cpu(), scale_cpu)


def test_quantize_per_token_ties_and_views():
    # a = 127 makes inv = 1: x * inv lands exactly on .5 ties, which round to even.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -126.5, 3.0]], device="cuda")
    q, scale = ops.quantize_per_token_cuda(x)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -126, 3]] and scale.item() == 1.0
    wide = randn((9, 2 * 300), torch.bfloat16, 5)
    view = wide[:, ::2]  # non-contiguous: the binding copies it
    assert torch.equal(ops.quantize_per_token_cuda(view)[0].cpu(), quantize_per_token_ref(view.cpu())[0])


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N", [(1, 1), (3, 7), (17, 1001), (4097, 64), (2, 8196)])
def test_epilogue_bitwise(out_dtype, bias_dtype, M, N, seed):
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(-(2**30), 2**30, (M, N), generator=g, dtype=torch.int32)  # > 2^24: int -> float rounds
    x_scale = torch.rand(M, generator=g) * 1e-3
    x_scale[0] = 0  # a zero row of the activations: exact zeros (plus bias)
    w_scale = torch.rand(N, generator=g) * 1e-3
    bias = None if bias_dtype is None else randn((N,), bias_dtype, seed + 1, device="cpu")
    out = ops.int8_linear_epilogue_cuda(acc.cuda(), x_scale.cuda(), w_scale.cuda(),
                                        None if bias is None else bias.cuda(), out_dtype)
    expected = int8_epilogue_ref(acc, x_scale, w_scale, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    assert torch.equal(out.cpu(), expected), (out.cpu().double() - expected.double()).abs().max()


# (N, K, group_size): tensor-core path with K % 64 == 0, with a K tail (K % 64 == 16), groups of 64 / 128;
# fallback for odd K, groups not a multiple of 64; N tails everywhere.
W8A16_SHAPES = [(1, 16, 0), (7, 64, 0), (17, 1040, 0), (33, 1152, 64), (1000, 4096, 128), (130, 1001, 0),
                (130, 1001, 143), (257, 512, 32)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K,group_size", W8A16_SHAPES)
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16, 17, 64, 4097])
def test_weight_only_linear_matches_oracle(dtype, M, N, K, group_size, seed):
    if M == 4097 and N * K > 600_000:
        pytest.skip("large M only on the smaller shapes (time)")
    x = randn((M, K), dtype, seed)
    w = rand_int8((N, K), seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    shape = (N, K // group_size) if group_size else (N,)
    w_scale = (torch.rand(shape, generator=g) * 0.02).cuda()
    bias = randn((N,), dtype, seed + 3) if N % 2 else None  # odd N with a bias, even N without
    out = ops.int8_weight_only_linear_cuda(x, w, w_scale, bias, group_size)
    assert out.dtype == dtype and out.shape == (M, N)
    oracle = int8_weight_only_linear_f64(x, w, w_scale, bias, group_size)
    reference = int8_weight_only_linear_ref(x, w, w_scale, bias, group_size)
    assert_close_to_oracle(out, oracle, reference, msg=f"w8a16 {dtype} M={M} N={N} K={K} gs={group_size}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,group_size", [(1, 0), (16, 0), (16, 128), (300, 0)])
def test_weight_only_linear_deterministic(dtype, M, group_size, seed):
    N = K = 2048
    x, w = randn((M, K), dtype, seed), rand_int8((N, K), seed + 1)
    w_scale = torch.rand((N, K // group_size) if group_size else (N,), device="cuda") * 0.02
    a = ops.int8_weight_only_linear_cuda(x, w, w_scale, None, group_size)
    b = ops.int8_weight_only_linear_cuda(x, w, w_scale, None, group_size)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [256, 1001])
def test_weight_only_linear_zero_rows_and_channels(dtype, K):
    """A zero x row, a zero weight channel and a zero scale give exact zeros (bias where given), not NaN."""
    M, N = 5, 40
    x, w = randn((M, K), dtype, 1), rand_int8((N, K), 2)
    x[2] = 0
    w[3] = 0
    w_scale = torch.rand(N, device="cuda") * 0.02
    w_scale[7] = 0
    out = ops.int8_weight_only_linear_cuda(x, w, w_scale, None, 0)
    assert torch.isfinite(out).all()
    assert not out[2].any() and not out[:, 3].any() and not out[:, 7].any()
    bias = randn((N,), dtype, 3)
    out = ops.int8_weight_only_linear_cuda(x, w, w_scale, bias, 0)
    assert torch.equal(out[2], bias) and torch.equal(out[:, 7], bias[7].expand(M))


def test_empty_inputs():
    x = torch.zeros(0, 64, device="cuda", dtype=torch.bfloat16)
    q, s = ops.quantize_per_token_cuda(x)
    assert q.shape == (0, 64) and s.shape == (0,)
    out = ops.int8_weight_only_linear_cuda(x, rand_int8((8, 64), 0), torch.ones(8, device="cuda"), None, 0)
    assert out.shape == (0, 8)
    x = randn((3, 0), torch.bfloat16, 0)  # K == 0: the bias alone
    bias = randn((8,), torch.bfloat16, 1)
    out = ops.int8_weight_only_linear_cuda(x, torch.zeros(8, 0, dtype=torch.int8, device="cuda"),
                                           torch.ones(8, device="cuda"), bias, 0)
    assert torch.equal(out, bias.expand(3, 8))


def test_bad_input_is_named():
    """The binding's checks raise errors naming the argument. Run in a child process: on the H200 image a
    JIT build of the extension linked libstdc++ statically and segfaulted while formatting the message
    (a number into an ostream); that must fail this test only, with its diagnosis, not the whole run."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = "import test_gpu_int8 as t; t.check_bad_input()"
    res = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.path.dirname(here)])))
    ldd = subprocess.run(["ldd", _ext_path()], capture_output=True, text=True).stdout if res.returncode < 0 else ""
    assert res.returncode == 0, f"rc {res.returncode}\n{res.stderr[-3000:]}\nldd of the extension:\n{ldd}"


def _ext_path() -> str:
    from fastdistill import _C
    return _C.__file__


def check_bad_input():
    x = randn((4, 64), torch.bfloat16, 0)
    w = rand_int8((8, 64), 1)
    s = torch.ones(8, device="cuda")
    with pytest.raises(ValueError, match="w_int8"):
        ops.int8_weight_only_linear_cuda(x, rand_int8((8, 63), 1), s, None, 0)
    with pytest.raises(ValueError, match="group_size"):
        ops.int8_weight_only_linear_cuda(x, w, torch.ones(8, 2, device="cuda"), None, 48)
    with pytest.raises(ValueError, match="w_scale"):
        ops.int8_weight_only_linear_cuda(x, w, torch.ones(8, 3, device="cuda"), None, 32)
    with pytest.raises(TypeError, match="w_scale"):
        ops.int8_weight_only_linear_cuda(x, w, s.half(), None, 0)
    with pytest.raises(ValueError, match="bias"):
        ops.int8_weight_only_linear_cuda(x, w, s, torch.ones(7, device="cuda"), 0)
    with pytest.raises(TypeError, match="x"):
        ops.quantize_per_token_cuda(x.double())
    with pytest.raises(ValueError, match="w_int8: expected a tensor on cuda"):
        ops.int8_weight_only_linear_cuda(x, w.cpu(), s, None, 0)
    acc = torch.zeros(4, 8, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="x_scale"):
        ops.int8_linear_epilogue_cuda(acc, torch.ones(5, device="cuda"), s, None, torch.bfloat16)
    with pytest.raises(TypeError, match="acc"):
        ops.int8_linear_epilogue_cuda(acc.float(), torch.ones(4, device="cuda"), s, None, torch.bfloat16)
