"""Shared builders and oracle checks for the sparse op tests."""
from __future__ import annotations

import dataclasses
import functools
import os

import torch

from fastdistill.reference.block_sparse_linear import block_sparse_linear_ref
from fastdistill.reference.semi_structured_linear import semi_structured_linear_ref
from fastdistill.sparse.formats import BlockSparseWeight, SemiStructuredWeight
from fastdistill.testing import assert_close_to_oracle


def block_mask(N, K, block_size, sparsity, g: torch.Generator) -> torch.Tensor:
    """Element mask of whole blocks: exactly round(sparsity * blocks) blocks pruned; "one" keeps one block."""
    bn, bk = block_size
    R, C = N // bn, K // bk
    order = torch.randperm(R * C, generator=g)
    keep = 1 if sparsity == "one" else R * C - int(round(sparsity * R * C))
    bm = torch.zeros(R * C, dtype=torch.bool)
    bm[order[:keep]] = True
    return bm.reshape(R, C).repeat_interleave(bn, 0).repeat_interleave(bk, 1)


def two_four_mask(N, K, g: torch.Generator) -> torch.Tensor:
    return torch.rand(N, K // 4, 4, generator=g).argsort(-1).argsort(-1).lt(2).reshape(N, K)


def make_bsr(N, K, block_size, sparsity, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g, dtype=torch.float64)
    W = BlockSparseWeight.from_dense(w, block_mask(N, K, block_size, sparsity, g), block_size)
    return W.to(device=device, dtype=dtype)


def make_24(N, K, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g, dtype=torch.float64)
    return SemiStructuredWeight.from_dense(w, two_four_mask(N, K, g)).to(device=device, dtype=dtype)


def _run(fn, x, weight, bias, dy):
    """Output and grads (x, values, bias) of fn(x, weight with fresh values leaf, bias)."""
    x = x.detach().clone().requires_grad_(True)
    values = weight.values.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    y = fn(x, dataclasses.replace(weight, values=values), b)
    y.backward(dy)
    return [y.detach(), x.grad, values.grad] + ([] if b is None else [b.grad])


@functools.cache
def interpreter_truncates_bf16() -> bool:
    """Whether the Triton interpreter rounds fp32 -> bf16 toward zero (triton 3.9: cast_impl drops the
    rounding mode) where a GPU rounds to nearest even: an interpreted kernel's bf16 store is then off by
    up to 1 ulp, not 1/2 (seen: 32.249 stored as 32.0, not 32.25, failing seed 1386441115 at M = 1)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    import triton
    import triton.language as tl

    @triton.jit
    def cast(x_ptr, y_ptr):
        tl.store(y_ptr, tl.load(x_ptr).to(tl.bfloat16))

    x = torch.tensor([32.249], dtype=torch.float32)
    y = torch.empty(1, dtype=torch.bfloat16)
    cast[(1,)](x, y)
    return float(y) == 32.0


def check_against_oracle(op, x, weight, bias, seed, **kwargs):
    """op's output and gradients vs the reference in float64, judged by the reference in x.dtype. An
    interpreted Triton kernel's bf16 outputs get the allowance of two roundings (one truncation, up to a
    whole ulp: see interpreter_truncates_bf16); the kernels' math is right, and GPUs round to nearest."""
    truncated = (kwargs.get("backend") == "triton" and x.dtype == torch.bfloat16 and not x.is_cuda
                 and interpreter_truncates_bf16())
    ref = block_sparse_linear_ref if isinstance(weight, BlockSparseWeight) else semi_structured_linear_ref
    g = torch.Generator().manual_seed(seed + 7)
    dy = torch.randn(*x.shape[:-1], weight.shape[0], generator=g, dtype=torch.float64)
    ours = _run(lambda a, w, b: op(a, w, b, **kwargs), x, weight, bias, dy.to(x.device, x.dtype))
    lowp = _run(lambda a, w, b: ref(a, w, b, values=w.values), x, weight, bias, dy.to(x.device, x.dtype))
    w64 = weight.to(dtype=torch.float64)
    oracle = _run(lambda a, w, b: ref(a, w, b, values=w.values), x.double(), w64,
                  None if bias is None else bias.double(), dy.to(x.device))
    for name, a, r, o in zip(("y", "dx", "dvalues", "dbias"), ours, lowp, oracle):
        assert_close_to_oracle(a, o, r, msg=name, roundings=2 if truncated else 1)
