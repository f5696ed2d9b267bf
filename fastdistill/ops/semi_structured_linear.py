"""fastdistill.semi_structured_linear: y = x · Wᵀ (+ bias) with W in 2:4 form (values + 2-bit metadata).

Custom ops, all with the schema (x, values, meta, bias) and the same backward:
    fastdistill::semi_structured_linear_{cpu,cuda}  native (csrc/ops.cpp): read only the compressed weight
    fastdistill::semi_structured_linear_triton      decompresses in-kernel (half the weight bytes)
    fastdistill::semi_structured_linear_cusparselt  PyTorch's cuSPARSELt 2:4 GEMM (sparse tensor cores); the
                                                    weight is re-packed into its layout each call (training
                                                    changes it)
    fastdistill::semi_structured_linear_dense       C++ decompression (CPU) then the dense GEMM
backend="auto": on CUDA, cuSPARSELt for M > 16 when torch has it and the shape fits, the cuda GEMV kernel
for M <= 16 when the extension has it, else triton (the dispatch table's order). On CPU, the C++ kernel up
to M = 16 rows and the dense op above: the kernel's win is reading half the weight bytes, which stops
paying once the product is compute-bound (dev CPU, N = K = 4096 fp32: 0.60x dense time at M = 1, 0.65x
at M = 16, 1.34x at M = 64; provisional, shared machine).
Backward follows PyTorch's straight-through rule for 2:4: dx = dy · W with the decompressed W, and
dW = dyᵀ · x taken at the kept positions only (the pattern never changes); dense matmuls, fp32 accumulation.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from fastdistill import _ext, dispatch
from fastdistill.ops.common import launch_guard, native, new_output, register_native
from fastdistill.reference.semi_structured_linear import semi_structured_linear_ref
from fastdistill.sparse.checks import as_rows, bias_grad, check_activation, check_bias
from fastdistill.sparse.formats import SemiStructuredWeight, semi_structured_gather, semi_structured_to_dense


@torch.library.custom_op("fastdistill::semi_structured_linear_triton", mutates_args=())
def semi_structured_linear_triton(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    from fastdistill.kernels.semi_structured_linear import semi_structured_linear_triton_launch

    y = new_output((x.shape[0], values.shape[0]), like=x)
    with launch_guard(x):
        semi_structured_linear_triton_launch(x, values, meta, bias, y)
    return y


@torch.library.custom_op("fastdistill::semi_structured_linear_cusparselt", mutates_args=())
def semi_structured_linear_cusparselt(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    w = torch._cslt_compress(semi_structured_to_dense(values, meta, x.shape[1]))
    return torch._cslt_sparse_mm(w, x.t(), bias, transpose_result=True)


@torch.library.custom_op("fastdistill::semi_structured_linear_dense", mutates_args=())
def semi_structured_linear_dense(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                                 bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Decompress once, then the dense GEMM: the CPU choice for large M (see the module docstring)."""
    return torch.nn.functional.linear(x, _dense_weight(values, meta, x.shape[1]), bias)


SMALL_M = 16  # rows up to which reading half the weight bytes (cuda GEMV, CPU kernel) beats a (sparse) GEMM


def _fake(x, values, meta, bias):
    return x.new_empty((x.shape[0], values.shape[0]))


def _setup_context(ctx, inputs, output):
    x, values, meta, bias = inputs
    ctx.save_for_backward(x, values, meta)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _native_helpers(t: torch.Tensor) -> bool:
    """The C++ decompress/gather (one pass each) exist for CPU tensors; elsewhere torch ops do it."""
    return t.device.type == "cpu" and _ext.has_kernel("semi_structured_to_dense_cpu", "CPU")


def _dense_weight(values, meta, K):
    if _native_helpers(values):
        return torch.ops.fastdistill.semi_structured_to_dense_cpu(values, meta, K)
    return semi_structured_to_dense(values, meta, K)


def _backward(ctx, dy):
    x, values, meta = ctx.saved_tensors
    K = x.shape[1]
    dx = dv = db = None
    native = _native_helpers(x)
    if ctx.needs_input_grad[0]:
        dx = dy @ _dense_weight(values, meta, K)
    if ctx.needs_input_grad[1]:
        dw = dy.transpose(0, 1) @ x
        dv = (torch.ops.fastdistill.semi_structured_gather_cpu(dw, meta) if native
              else semi_structured_gather(dw, meta))
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        db = bias_grad(dy, ctx.bias_dtype)
    return dx, dv, None, db


for _name in ("triton", "cusparselt", "dense"):
    torch.library.register_fake(f"fastdistill::semi_structured_linear_{_name}")(_fake)
    torch.library.register_autograd(f"fastdistill::semi_structured_linear_{_name}", _backward,
                                    setup_context=_setup_context)

register_native(("semi_structured_linear_cpu", "semi_structured_linear_cuda"), _fake, (_backward, _setup_context))
register_native(("semi_structured_to_dense_cpu",), lambda values, meta, K: values.new_empty((values.shape[0], K)))
register_native(("semi_structured_gather_cpu",),
                lambda dense, meta: dense.new_empty((dense.shape[0], dense.shape[1] // 2)))
_PYTHON_OPS = {"triton": semi_structured_linear_triton, "cusparselt": semi_structured_linear_cusparselt,
               "dense": semi_structured_linear_dense}


def _op(backend: str):
    return _PYTHON_OPS[backend] if backend in _PYTHON_OPS else native(f"semi_structured_linear_{backend}")


def check_semi_structured(x, weight, bias) -> None:
    if not isinstance(weight, SemiStructuredWeight):
        raise TypeError(f"weight: expected a fastdistill.sparse.SemiStructuredWeight, got {type(weight).__name__}")
    check_activation(x, weight.shape[1], weight)
    check_bias(bias, weight.shape[0], x)


def semi_structured_linear(x: torch.Tensor, weight: SemiStructuredWeight, bias: Optional[torch.Tensor] = None, *,
                           backend: str = "auto") -> torch.Tensor:
    """y = x · Wᵀ (+ bias) for x (..., K) and a 2:4-compressed W [N, K] (K % 4 == 0). Output in x.dtype,
    fp32 accumulation. Differentiable w.r.t. x, weight.values (at the kept positions) and bias."""
    check_semi_structured(x, weight, bias)
    name = dispatch.select("semi_structured_linear", backend, x.device, (x.dtype,))
    if name == "reference":
        return semi_structured_linear_ref(x, weight, bias)
    rows = as_rows(x)
    if backend == "auto" and not os.environ.get("FASTDISTILL_BACKEND"):
        if x.is_cuda:
            name = _auto_cuda(rows.shape[0], weight.shape, x.dtype, name)
        elif name == "cpu" and rows.shape[0] > SMALL_M:
            name = "dense"
    y = _op(name)(rows, weight.values.contiguous(), weight.meta, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


@torch.compiler.assume_constant_result
def _auto_cuda(M: int, shape: tuple[int, int], dtype: torch.dtype, fallback: str) -> str:
    """The auto choice on CUDA (see the module docstring); `fallback` is the dispatch table's."""
    N, K = shape
    if M > SMALL_M:
        fits = N % 64 == 0 and K % 64 == 0 and M % 16 == 0  # cuSPARSELt's shape constraints
        usable = dispatch.reason("semi_structured_linear", "cusparselt", "cuda", (dtype,)) is None
        return "cusparselt" if fits and usable else fallback
    return "cuda" if dispatch.reason("semi_structured_linear", "cuda", "cuda", (dtype,)) is None else fallback
