"""The int8 Triton kernels in the exact configuration GPUs launch (gpu_config=True: the GPU's block sizes, warps,
dot precision and in-kernel output cast), run in the interpreter on small shapes. The default interpreted runs
use small tiles, IEEE dots and float32 bf16 outputs to stay fast and exact; these cases cover what they skip.

What the interpreter cannot reproduce, and is therefore checked differently:
- float32 -> bf16 casts truncate in the interpreter (GPUs round to nearest even): bf16 outputs are compared
  with the reference truncated the same way (everything else in the kernel is bit-exact);
- it has no bf16 matmul (np.matmul would multiply the raw uint16 bits), so the W8A16 tensor-core path
  (IEEE=False) runs with fp16 activations, the same code path with the other 16-bit dtype; the compile
  test (test_int8_triton_compile.py) checks that the bf16 variant builds with MMAs for sm_90.
"""
import os

import pytest
import torch

from fastdistill.kernels import int8_linear as k
from fastdistill.reference.int8_linear import (int8_linear_ref, int8_weight_only_linear_f64,
                                               int8_weight_only_linear_ref, quantize_per_token_ref,
                                               quantize_weight_ref)
from fastdistill.testing import assert_close_to_oracle

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="GPU machines run these configurations for real (test_gpu_int8.py)")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _bits(t):
    return t.contiguous().view(torch.int32)


def _truncate_to_bf16(t: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 by dropping the low 16 bits, as the interpreter casts."""
    return (_bits(t.float()) >> 16).to(torch.int16).view(torch.bfloat16)


def _expect(ref_f32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _truncate_to_bf16(ref_f32) if dtype == torch.bfloat16 else ref_f32.to(dtype)


@pytest.mark.parametrize("K", [40, 3000, 5000])  # BLOCK_K 64; 4096 (8 warps); 4096 with a second sweep
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_per_token_gpu_config(K, dtype, seed):
    assert k.quantize_per_token_config(K, gpu=True)[0] == min(4096, 1 << (K - 1).bit_length())
    g = _gen(seed)
    x = torch.randn(4, K, generator=g)
    x[1, K - 3] = float("nan")  # in the last sweep's tail
    x[2] = (torch.rand(K, generator=g) + 0.2) * 1e-37  # a tiny row: 127 / max|x| would overflow
    if dtype == torch.float32:  # (the interpreter converts bf16 denormals wrongly; GPUs do not)
        x[2, ::2] = 1e-44 * torch.arange(K)[::2]  # with float32 denormals
    x[3, 1] = 127.0 * x[3].abs().max()  # a large outlier
    x = x.to(dtype)
    q = torch.full(x.shape, -128, dtype=torch.int8)
    s = torch.full((4,), float("nan"))
    k.quantize_per_token_launch(x, q, s, interpret=True, gpu_config=True)
    qr, sr = quantize_per_token_ref(x)
    assert torch.equal(q, qr) and torch.equal(_bits(s), _bits(sr))


@pytest.mark.parametrize("M", [5, 40, 130])  # one M per GPU tile bucket (tables in kernels/int8_linear.py)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_linear_gpu_config(M, out_dtype, seed):
    """int8 tl.dot with int32 accumulators runs in the interpreter (numpy int8 matmul into int32)."""
    g = _gen(seed)
    K, N = 200, 130  # K spans several BLOCK_K steps with a tail, N a partial tile
    x = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    xs, ws = torch.rand(M, generator=g) * 0.01, torch.rand(N, generator=g) * 0.01
    bias = torch.randn(N, generator=g).to(torch.bfloat16)
    out = torch.full((M, N), float("nan"), dtype=out_dtype)
    k.int8_linear_launch(x, w, xs, ws, bias, out, interpret=True, gpu_config=True)
    ref = int8_linear_ref(x, xs, w, ws, bias, torch.float32)
    assert torch.equal(out.view(torch.int16 if out_dtype.itemsize == 2 else torch.int32),
                       _expect(ref, out_dtype).view(torch.int16 if out_dtype.itemsize == 2 else torch.int32))


@pytest.mark.parametrize("M", [5, 40, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # fp32: IEEE dots; fp16: 16-bit MMA path
@pytest.mark.parametrize("group_size", [0, 20])
def test_weight_only_gpu_config(M, dtype, group_size, seed):
    g = _gen(seed)
    K, N = 200, 130
    q, s = quantize_weight_ref(torch.randn(N, K, generator=g), group_size)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g)
    out = torch.full((M, N), float("nan"), dtype=dtype)
    k.int8_weight_only_linear_launch(x, q, s, bias, out, group_size, interpret=True, gpu_config=True)
    oracle = int8_weight_only_linear_f64(x, q, s, bias, group_size)
    ref = int8_weight_only_linear_ref(x, q, s, bias, group_size)
    assert not out.isnan().any()
    assert_close_to_oracle(out, oracle, ref, msg=f"M={M} {dtype} gs={group_size}")
