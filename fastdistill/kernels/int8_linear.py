"""Triton kernels of the int8 ops (exact formulas in csrc/ops.cpp, shared with the C++/CUDA kernels).

- per-token quantization: one program per row, sweep 1 absmax, sweep 2 quantize (row re-read from L2);
  divisions with div_rn (plain `/` is the approximate div.full.f32 on NVIDIA) and round-half-even by
  the 1.5 * 2^23 trick (exact for |v| <= 127), so the int8 bits match the other backends.
- W8A8: int8 tl.dot into int32 accumulators, epilogue ((acc * x_scale) * w_scale) + bias in the same
  kernel; launched with enable_fp_fusion=False so the epilogue is not contracted into FMAs.
- W8A16: int8 weight tiles loaded and dequantized in registers; per-channel scales applied once to
  the fp32 accumulator (the int8 values are exact in bf16/fp16, so the tensor-core dot loses nothing),
  per-group scales applied to the weight tile before the dot.
"""
import torch
import triton
import triton.language as tl

RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: v + M - M rounds |v| < 2^22 to nearest even
TINY = tl.constexpr(2.0**-64)  # rows with max|x| below it are scaled by PRE first (127 / a would overflow)
PRE = tl.constexpr(2.0**64)
ABS_BITS = tl.constexpr(0x7FFFFFFF)
INF_BITS = tl.constexpr(0x7F800000)
NAN_BITS = tl.constexpr(0x7FC00000)  # the one NaN every backend writes as the scale of a NaN row


@triton.jit
def _quantize_per_token_kernel(x_ptr, q_ptr, s_ptr, K, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    # absmax on the magnitude bits as integers: the float order for non-negative floats, and NaN sorts above
    # inf, so a NaN row keeps its NaN (tl.maximum / tl.max on floats drop NaN on GPUs)
    amax = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * K + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, x.to(tl.int32, bitcast=True) & ABS_BITS)
    bits = tl.max(amax, axis=0)
    a = bits.to(tl.float32, bitcast=True)
    nan = tl.full((), NAN_BITS, tl.int32).to(tl.float32, bitcast=True)
    tl.store(s_ptr + row, tl.where(bits > INF_BITS, nan, tl.math.div_rn(a, 127.0)))
    ok = (bits > 0) & (bits < INF_BITS)  # zero, inf and NaN rows quantize to 0
    pre = tl.where(a < TINY, PRE, 1.0)
    inv = tl.math.div_rn(tl.full((), 127.0, tl.float32), tl.where(ok, a * pre, 1.0))
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(x_ptr + row * K + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum((x * pre) * inv, -127.0), 127.0)
        v = (v + RNE_MAGIC) - RNE_MAGIC
        tl.store(q_ptr + row * K + k0 + offs, tl.where(ok, v, 0.0).to(tl.int8), mask=mask)


def quantize_per_token_config(K: int, gpu: bool) -> tuple[int, int]:
    """(BLOCK_K, num_warps): the GPU's, or a small block that keeps the interpreter fast."""
    if not gpu:
        return 32, 4
    block = min(4096, max(16, triton.next_power_of_2(K)))
    return block, 4 if block <= 1024 else 8


def quantize_per_token_launch(x, q, scale, *, interpret: bool, gpu_config: bool | None = None) -> None:
    """gpu_config (default: not interpret) picks the GPU's configuration; tests set it to run that exact
    configuration in the interpreter."""
    M, K = x.shape
    if M == 0:
        return
    block, warps = quantize_per_token_config(K, not interpret if gpu_config is None else gpu_config)
    # enable_fp_fusion=False: x * inv must round before the +-1.5*2^23 (the interpreter ignores the option)
    _quantize_per_token_kernel[(M,)](x, q, scale, K, BLOCK_K=block, num_warps=warps, enable_fp_fusion=False)


@triton.jit
def _int8_linear_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, M, N, K, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * K
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(x_rows + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
        b = tl.load(w_cols + kk[:, None], mask=(kk[:, None] < K) & (rn[None, :] < N), other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    t = (acc.to(tl.float32) * xs[:, None]) * ws[None, :]
    if HAS_BIAS:
        t = t + tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], t.to(out_ptr.dtype.element_ty), mask=mask)


def _gemm_blocks(M: int, gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps); small M gets a 16-row tile (the GEMV regime). Without gpu:
    small tiles that keep the interpreter fast."""
    if not gpu:
        return 16, 32, 32, 4
    if M <= 16:
        return 16, 64, 128, 4
    if M <= 64:
        return 64, 128, 128, 4
    return 128, 128, 64, 8


def _interpreter_out(out, interpret: bool, gpu: bool):
    """The interpreter casts float32 -> bf16 by truncation (GPUs round to nearest even; its fp16 cast rounds
    correctly), so interpreted kernels write bf16 outputs as float32 and torch does the rounding; returns the
    buffer the kernel writes. gpu=True (the GPU configuration, tests) keeps the kernel's own cast."""
    if interpret and not gpu and out.dtype == torch.bfloat16:
        return torch.empty(out.shape, dtype=torch.float32, device=out.device)
    return out


def int8_linear_launch(x, w, x_scale, w_scale, bias, out, *, interpret: bool, gpu_config: bool | None = None) -> None:
    """gpu_config (default: not interpret): the GPU's tiles and in-kernel output cast (tests run it interpreted)."""
    M, K = x.shape
    N = w.shape[0]
    if M == 0 or N == 0:
        return
    gpu = not interpret if gpu_config is None else gpu_config
    final, out = out, _interpreter_out(out, interpret, gpu)
    bm, bn, bk, warps = _gemm_blocks(M, gpu)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    # the interpreter ignores num_stages and enable_fp_fusion
    _int8_linear_kernel[grid](x, w, x_scale, w_scale, bias if bias is not None else x_scale, out, M, N, K,
                              HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                              num_stages=3, enable_fp_fusion=False)
    if out is not final:
        final.copy_(out)


@triton.jit
def _weight_only_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, GROUP, N_GROUPS,
                        PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * K
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(x_rows + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        wmask = (kk[:, None] < K) & (rn[None, :] < N)
        q = tl.load(w_cols + kk[:, None], mask=wmask, other=0).to(tl.float32)
        if not PER_CHANNEL:  # w = q * scale[n, k // GROUP] before the dot
            s = tl.load(s_ptr + rn.to(tl.int64)[None, :] * N_GROUPS + kk[:, None] // GROUP, mask=wmask, other=0.0)
            q = q * s
        if IEEE:
            acc += tl.dot(a.to(tl.float32), q, input_precision="ieee")
        else:
            acc += tl.dot(a, q.to(a.dtype))
    if PER_CHANNEL:
        acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def int8_weight_only_linear_launch(x, w, w_scale, bias, out, group_size: int, *, interpret: bool,
                                   gpu_config: bool | None = None) -> None:
    """gpu_config (default: not interpret): the GPU's tiles, dot precision and output cast. The interpreter
    has no bf16 matmul (it would multiply the raw bits), so bf16 x needs IEEE fp32 dots when interpreted."""
    M, K = x.shape
    N = w.shape[0]
    if M == 0 or N == 0:
        return
    gpu = not interpret if gpu_config is None else gpu_config
    final, out = out, _interpreter_out(out, interpret, gpu)
    bm, bn, bk, warps = _gemm_blocks(M, gpu)
    if gpu:
        bk = min(bk, 64)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    group = group_size if group_size else max(K, 1)
    _weight_only_kernel[grid](x, w, w_scale, bias if bias is not None else w_scale, out, M, N, K, group,
                              max(K // group, 1), PER_CHANNEL=group_size == 0, HAS_BIAS=bias is not None,
                              IEEE=x.dtype.itemsize == 4 or not gpu, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                              num_warps=warps, num_stages=3)
    if out is not final:
        final.copy_(out)
