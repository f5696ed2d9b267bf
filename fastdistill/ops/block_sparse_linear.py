"""fastdistill.block_sparse_linear: y = x · Wᵀ (+ bias) with W in block-sparse (BSR) form.

Custom ops per backend b in {cpu, cuda, triton}:
    fastdistill::block_sparse_linear_{fwd,dx,dw}_b   kernels (native ones defined in csrc/ops.cpp; triton here)
    fastdistill::block_sparse_linear_b               differentiable op: fwd, and in backward dx (CSC view,
                                                     nonzero blocks only) and dvalues (stored blocks only)
Gradients reach x, the stored block values and bias; the sparsity pattern never changes.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastdistill import dispatch
from fastdistill.ops.common import launch_guard, native, new_output, register_native
from fastdistill.reference.block_sparse_linear import block_sparse_linear_ref
from fastdistill.sparse.checks import as_rows, bias_grad, check_activation, check_bias
from fastdistill.sparse.formats import BlockSparseWeight

KERNEL_BACKENDS = ("cpu", "cuda", "triton")


def _fwd_fake(x, values, crow, col, bias, N):
    return x.new_empty((x.shape[0], N))


def _dx_fake(dy, values, ccol, row, perm, K):
    return dy.new_empty((dy.shape[0], K))


def _dw_fake(dy, x, crow, col, bn, bk):
    return x.new_empty((col.shape[0], bn, bk))


@torch.library.custom_op("fastdistill::block_sparse_linear_fwd_triton", mutates_args=())
def _fwd_triton(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                bias: Optional[torch.Tensor], N: int) -> torch.Tensor:
    from fastdistill.kernels.block_sparse_linear import bsr_fwd_triton

    y = new_output((x.shape[0], N), like=x)
    with launch_guard(x):
        bsr_fwd_triton(x, values, crow, col, bias, y)
    return y


@torch.library.custom_op("fastdistill::block_sparse_linear_dx_triton", mutates_args=())
def _dx_triton(dy: torch.Tensor, values: torch.Tensor, ccol: torch.Tensor, row: torch.Tensor, perm: torch.Tensor,
               K: int) -> torch.Tensor:
    from fastdistill.kernels.block_sparse_linear import bsr_dx_triton

    dx = new_output((dy.shape[0], K), like=dy)
    with launch_guard(dy):
        bsr_dx_triton(dy, values, ccol, row, perm, dx)
    return dx


@torch.library.custom_op("fastdistill::block_sparse_linear_dw_triton", mutates_args=())
def _dw_triton(dy: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, bn: int,
               bk: int) -> torch.Tensor:
    from fastdistill.kernels.block_sparse_linear import bsr_dw_triton

    dv = new_output((col.shape[0], bn, bk), like=x)
    with launch_guard(x):
        bsr_dw_triton(dy, x, crow, col, dv)
    return dv


torch.library.register_fake("fastdistill::block_sparse_linear_fwd_triton")(_fwd_fake)
torch.library.register_fake("fastdistill::block_sparse_linear_dx_triton")(_dx_fake)
torch.library.register_fake("fastdistill::block_sparse_linear_dw_triton")(_dw_fake)

for _b in ("cpu", "cuda"):
    register_native((f"block_sparse_linear_fwd_{_b}",), _fwd_fake)
    register_native((f"block_sparse_linear_dx_{_b}",), _dx_fake)
    register_native((f"block_sparse_linear_dw_{_b}",), _dw_fake)


def _kernels(backend: str):
    """(fwd, dx, dw) ops of a backend."""
    return tuple(native(f"block_sparse_linear_{k}_{backend}") for k in ("fwd", "dx", "dw"))


def _make_op(backend: str):
    name = f"fastdistill::block_sparse_linear_{backend}"

    @torch.library.custom_op(name, mutates_args=())
    def op(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, ccol: torch.Tensor,
           row: torch.Tensor, perm: torch.Tensor, bias: Optional[torch.Tensor], N: int) -> torch.Tensor:
        return _kernels(backend)[0](x, values, crow, col, bias, N)

    def fake(x, values, crow, col, ccol, row, perm, bias, N):
        return x.new_empty((x.shape[0], N))

    def setup_context(ctx, inputs, output):
        x, values, crow, col, ccol, row, perm, bias, N = inputs
        ctx.save_for_backward(x, values, crow, col, ccol, row, perm)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype

    def backward(ctx, dy):
        x, values, crow, col, ccol, row, perm = ctx.saved_tensors
        _, dx_op, dw_op = _kernels(backend)
        dy = dy.contiguous()
        dx = dx_op(dy, values, ccol, row, perm, x.shape[1]) if ctx.needs_input_grad[0] else None
        dv = dw_op(dy, x, crow, col, values.shape[1], values.shape[2]) if ctx.needs_input_grad[1] else None
        db = bias_grad(dy, ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[7] else None
        return dx, dv, None, None, None, None, None, db, None

    torch.library.register_fake(name)(fake)
    torch.library.register_autograd(name, backward, setup_context=setup_context)
    return op


_OPS = {b: _make_op(b) for b in KERNEL_BACKENDS}
def check_block_sparse(x, weight, bias) -> None:
    if not isinstance(weight, BlockSparseWeight):
        raise TypeError(f"weight: expected a fastdistill.sparse.BlockSparseWeight, got {type(weight).__name__}")
    check_activation(x, weight.shape[1], weight)
    check_bias(bias, weight.shape[0], x)


def block_sparse_linear(x: torch.Tensor, weight: BlockSparseWeight, bias: Optional[torch.Tensor] = None, *,
                        backend: str = "auto") -> torch.Tensor:
    """y = x · Wᵀ (+ bias) for x (..., K) and a block-sparse W [N, K]; only stored blocks are computed,
    forward and backward. Output in x.dtype, fp32 accumulation. Differentiable w.r.t. x, weight.values
    and bias."""
    check_block_sparse(x, weight, bias)
    name = dispatch.select("block_sparse_linear", backend, x.device, (x.dtype,))
    if name == "reference":
        return block_sparse_linear_ref(x, weight, bias)
    N, K = weight.shape
    rows = as_rows(x)
    y = _OPS[name](rows, weight.values.contiguous(), weight.crow_indices, weight.col_indices, weight.ccol_indices,
                   weight.row_indices, weight.perm, bias, N)
    return y.view(*x.shape[:-1], N)
