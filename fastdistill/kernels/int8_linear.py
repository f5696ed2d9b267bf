"""Triton kernels of the int8 ops (exact formulas in csrc/ops.cpp, shared with the C++/CUDA kernels).

- per-token quantization: one program per row, sweep 1 absmax, sweep 2 quantize (row re-read from L2);
  divisions with div_rn (plain `/` is the approximate div.full.f32 on NVIDIA) and round-half-even by
  the 1.5 * 2^23 trick (exact for |v| <= 127), so the int8 bits match the other backends.
- W8A8: int8 tl.dot into int32 accumulators, epilogue ((acc * x_scale) * w_scale) + bias in the same
  kernel; launched with enable_fp_fusion=False so the epilogue is not contracted into FMAs. Two kernels
  (L2-grouped tiles; a persistent TMA one for sm_90+) and per-M tiles, tuned once per shape bucket.
- W8A16: int8 weight tiles loaded and dequantized in registers; per-channel scales applied once to
  the fp32 accumulator (the int8 values are exact in bf16/fp16, so the tensor-core dot loses nothing),
  per-group scales applied to the weight tile before the dot. A swapped-operand variant (candidate).
- Weight dequantization to a float dtype in one pass (the dense W8A16 route's first half).
"""
import functools

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (Triton >= 3.4; the GPU image has 3.6)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: v + M - M rounds |v| < 2^22 to nearest even
TINY = tl.constexpr(2.0**-64)  # rows with max|x| below it are scaled by PRE first (127 / a would overflow)
PRE = tl.constexpr(2.0**64)
GROUP_M = tl.constexpr(8)  # W8A8 row tiles per L2 group
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
def _grouped_tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(row tile, column tile) of 1-D tile index `tile`, in groups of GROUP_M row tiles: consecutive programs
    share weight column tiles in the L2."""
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // per_group) * GROUP_M
    rows = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (tile % per_group) % rows, (tile % per_group) // rows


@triton.jit
def _int8_epilogue_store(acc, rm, rn, xs_ptr, ws_ptr, b_ptr, out_ptr, M, N, HAS_BIAS: tl.constexpr):
    xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    t = (acc.to(tl.float32) * xs[:, None]) * ws[None, :]
    if HAS_BIAS:
        t = t + tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], t.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int8_linear_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, M, N, K, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
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
    _int8_epilogue_store(acc, rm, rn, xs_ptr, ws_ptr, b_ptr, out_ptr, M, N, HAS_BIAS)


@triton.jit
def _int8_linear_tma_kernel(x_desc, w_desc, xs_ptr, ws_ptr, b_ptr, out_ptr, M, N, K, PROGRAMS,
                            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    """Persistent W8A8 (sm_90+): PROGRAMS programs walk the output tiles; operand tiles arrive by TMA (host
    tensor descriptors, out-of-bounds parts read as zeros), int8 wgmma, the same epilogue as above."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS):
        pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            a = x_desc.load([pid_m * BLOCK_M, k0])
            b = w_desc.load([pid_n * BLOCK_N, k0])
            acc += tl.dot(a, b.T, out_dtype=tl.int32)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _int8_epilogue_store(acc, rm, rn, xs_ptr, ws_ptr, b_ptr, out_ptr, M, N, HAS_BIAS)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per M bucket. Not yet measured on a GPU: chosen by the tile
# bytes each stage keeps in shared memory. "big": GPUs with >= 160 KB of shared memory per block (sm_80, sm_90,
# sm_100); the others (sm_86/89/120: 99 KB) get the small tiles. W8A8: int8 operands, 128-wide K steps (one
# 128-byte line per row); Hopper's int8 wgmma takes 64-row warpgroup tiles, so M > 256 gets 128 x 256 tiles
# (48 KB per stage, 3 stages) and the tuner below picks among the candidates by timing them once.
W8A8_CONFIGS_BIG = ((16, [(16, 64, 256, 4, 4), (16, 128, 128, 4, 4)]),
                    (64, [(64, 128, 128, 4, 4), (64, 64, 256, 4, 4)]),
                    (256, [(128, 128, 128, 8, 4), (64, 256, 128, 8, 4), (128, 64, 128, 4, 4)]),
                    (None, [(128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (256, 128, 128, 8, 3),
                            (128, 256, 64, 8, 4)]))
W8A8_CONFIGS_SMALL = ((16, [(16, 64, 128, 4, 3)]), (64, [(64, 128, 128, 4, 3)]), (None, [(128, 128, 64, 8, 3)]))
# W8A16: small M is weight-bandwidth bound: narrow N tiles give >= 2 programs per SM at N = 8192 (256 of 32
# rows); large M is compute bound: 128 x 128 tiles, 8 warps.
W8A16_CONFIGS = ((16, (16, 32, 128, 4, 4)), (64, (64, 64, 128, 4, 4)), (256, (64, 128, 64, 4, 4)),
                 (None, (128, 128, 64, 8, 3)))
# The swapped-operand W8A16 kernel (a candidate the benchmark times against the default; unmeasured): tokens
# are the wgmma's N side (16..256), weight rows its 64/128-row M side.
W8A16_SWAP_CONFIGS = ((16, (16, 64, 128, 4, 4, "swap")), (64, (64, 64, 128, 4, 4, "swap")),
                      (256, (128, 128, 64, 8, 3, "swap")), (None, (256, 128, 64, 8, 3, "swap")))
INTERPRETER_CONFIG = (16, 32, 32, 4, 1)  # small tiles keep the interpreter fast
BIG_SMEM = ((8, 0), (9, 0), (10, 0), (10, 3))


def _bucket(table, M: int):
    return next(c for limit, c in table if limit is None or M <= limit)


def w8a8_configs(M: int, capability: tuple[int, int]) -> list[tuple[int, int, int, int, int]]:
    """The candidate GPU configurations for M rows; the first one is the default (no tuning)."""
    return list(_bucket(W8A8_CONFIGS_BIG if tuple(capability) in BIG_SMEM else W8A8_CONFIGS_SMALL, M))


# The persistent TMA kernel's candidates (sm_90+; K % 16 == 0 and 16-byte aligned operands: TMA's rules); the
# tuner times them with the pointer kernel's. No 16-row tile: a wgmma warpgroup covers 64 rows.
W8A8_TMA_CONFIGS = ((16, []), (64, [(64, 128, 128, 4, 4, "tma")]), (256, [(128, 128, 128, 8, 4, "tma")]),
                    (None, [(128, 256, 128, 8, 3, "tma"), (128, 128, 128, 8, 4, "tma")]))


def w8a8_tma_configs(M: int, K: int, capability: tuple[int, int], aligned: bool) -> list[tuple]:
    if tuple(capability) < (9, 0) or K % 16 != 0 or K == 0 or not aligned or TensorDescriptor is None:
        return []
    return list(_bucket(W8A8_TMA_CONFIGS, M))


def w8a16_config(M: int, capability: tuple[int, int], grouped: bool = False, swap: bool = False) -> tuple:
    """Per-group scales add a [BLOCK_K, BLOCK_N] float32 tile to every stage: at most 3 stages then, 2 on 99 KB
    GPUs (Triton 3.9 for sm_86: 3 stages of 128 x 128 x 64 take 112 KB; for sm_80, 4 of 64 x 64 x 128 168 KB)."""
    c = _bucket(W8A16_SWAP_CONFIGS if swap else W8A16_CONFIGS, M)
    big = tuple(capability) in BIG_SMEM
    return c[:4] + (min(c[4], (3 if big else 2) if grouped else (c[4] if big else 3)),) + c[5:]


def _capability(t: torch.Tensor) -> tuple[int, int]:
    """The device's compute capability; CPU tensors (interpreted GPU configurations in tests): sm_90's."""
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else (9, 0)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Programs of the persistent kernel: one per SM; CPU (interpreter tests): 3, so that programs loop."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3


_TUNED: dict = {}


def _tuned(key, candidates, run):
    """The fastest of `candidates` for `key` (timed once per process; W8A8 results are exact integers plus an
    elementwise epilogue, so every candidate gives the same bits). The first candidate while a CUDA graph is
    being captured (timing would synchronize) and where there is only one."""
    if key in _TUNED:
        return _TUNED[key]
    if len(candidates) == 1 or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    from triton.testing import do_bench

    times = []
    for c in candidates:
        try:
            times.append(do_bench(lambda c=c: run(c), warmup=5, rep=20, return_mode="median"))
        except Exception:  # a tile that does not fit this GPU (out of resources) is skipped
            times.append(float("inf"))
    _TUNED[key] = candidates[min(range(len(times)), key=times.__getitem__)]
    return _TUNED[key]


def _interpreter_out(out, interpret: bool, gpu: bool):
    """The interpreter casts float32 -> bf16 by truncation (GPUs round to nearest even; its fp16 cast rounds
    correctly), so interpreted kernels write bf16 outputs as float32 and torch does the rounding; returns the
    buffer the kernel writes. gpu=True (the GPU configuration, tests) keeps the kernel's own cast."""
    if interpret and not gpu and out.dtype == torch.bfloat16:
        return torch.empty(out.shape, dtype=torch.float32, device=out.device)
    return out


def int8_linear_launch(x, w, x_scale, w_scale, bias, out, *, interpret: bool, gpu_config: bool | None = None,
                       config: tuple | None = None) -> None:
    """gpu_config (default: not interpret): the GPU's tiles and in-kernel output cast (tests run it interpreted);
    config: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, "tma"]) instead of the tuned choice (benchmarks,
    tests); "tma": the persistent TMA kernel."""
    M, K = x.shape
    N = w.shape[0]
    if M == 0 or N == 0:
        return
    gpu = not interpret if gpu_config is None else gpu_config
    final, out = out, _interpreter_out(out, interpret, gpu)

    b = bias if bias is not None else x_scale

    def run(c):
        bm, bn, bk, warps, stages = c[:5]
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        # the interpreter ignores num_stages and enable_fp_fusion
        if len(c) == 6:  # "tma"
            xd, wd = TensorDescriptor(x, [M, K], [K, 1], [bm, bk]), TensorDescriptor(w, [N, K], [K, 1], [bn, bk])
            programs = min(tiles, _sm_count(x.device))
            _int8_linear_tma_kernel[(programs,)](xd, wd, x_scale, w_scale, b, out, M, N, K, programs,
                                                 HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                 num_warps=warps, num_stages=stages, enable_fp_fusion=False)
            return
        _int8_linear_kernel[(tiles,)](x, w, x_scale, w_scale, b, out, M, N, K, HAS_BIAS=bias is not None,
                                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
                                      enable_fp_fusion=False)

    if config is None and not gpu:
        config = INTERPRETER_CONFIG
    if config is None:
        cap = _capability(x)
        aligned = x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
        candidates = w8a8_configs(M, cap) + w8a8_tma_configs(M, K, cap, aligned)
        # tuned where the GEMM is large enough for the tile to matter (>= 2^30 multiply-adds); M by power of 2
        big = not interpret and M * N * K >= 2**30
        key = (x.device, 1 << (M - 1).bit_length(), N, K, out.dtype, bias is not None)
        config = _tuned(key, candidates, run) if big else candidates[0]
    run(config)
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


@triton.jit
def _weight_only_swap_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, GROUP, N_GROUPS,
                             PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """16-bit x only: out^T tile = dequantized w tile [BLOCK_N, BLOCK_K] . x^T tile [BLOCK_K, BLOCK_M], so the
    converted weights are the dot's left operand, which sm_90's wgmma takes from registers (no shared-memory
    round trip; seen in Triton 3.9's PTX), and 16-token tiles still fill a 64-row warpgroup tile."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        wmask = (rn[:, None] < N) & (kk[None, :] < K)
        q = tl.load(w_ptr + rn.to(tl.int64)[:, None] * K + kk[None, :], mask=wmask, other=0)
        xt = tl.load(x_ptr + rm.to(tl.int64)[None, :] * K + kk[:, None], mask=(kk[:, None] < K) & (rm[None, :] < M),
                     other=0.0)
        if not PER_CHANNEL:
            q = q.to(tl.float32) * tl.load(s_ptr + rn.to(tl.int64)[:, None] * N_GROUPS + kk[None, :] // GROUP,
                                           mask=wmask, other=0.0)
        acc += tl.dot(q.to(xt.dtype), xt)
    if PER_CHANNEL:
        acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0)[:, None]
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    mask = (rn[:, None] < N) & (rm[None, :] < M)
    tl.store(out_ptr + rm.to(tl.int64)[None, :] * N + rn[:, None], acc.to(out_ptr.dtype.element_ty), mask=mask)


def int8_weight_only_linear_launch(x, w, w_scale, bias, out, group_size: int, *, interpret: bool,
                                   gpu_config: bool | None = None, config: tuple | None = None) -> None:
    """gpu_config (default: not interpret): the GPU's tiles, dot precision and output cast. The interpreter
    has no bf16 matmul (it would multiply the raw bits), so bf16 x needs IEEE fp32 dots when interpreted.
    config: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, "swap"]) instead of the default (benchmarks,
    tests); "swap": the swapped-operand kernel (16-bit x)."""
    M, K = x.shape
    N = w.shape[0]
    if M == 0 or N == 0:
        return
    gpu = not interpret if gpu_config is None else gpu_config
    final, out = out, _interpreter_out(out, interpret, gpu)
    if config is None:
        config = w8a16_config(M, _capability(x), group_size > 0) if gpu else INTERPRETER_CONFIG
    bm, bn, bk, warps, stages = config[:5]
    group = group_size if group_size else max(K, 1)
    args = (x, w, w_scale, bias if bias is not None else w_scale, out, M, N, K, group, max(K // group, 1))
    if len(config) == 6:  # "swap"
        _weight_only_swap_kernel[(triton.cdiv(N, bn), triton.cdiv(M, bm))](
            *args, PER_CHANNEL=group_size == 0, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            num_warps=warps, num_stages=stages)
    else:
        _weight_only_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            *args, PER_CHANNEL=group_size == 0, HAS_BIAS=bias is not None, IEEE=x.dtype.itemsize == 4 or not gpu,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    if out is not final:
        final.copy_(out)


@triton.jit
def _dequantize_weight_kernel(w_ptr, s_ptr, out_ptr, K, GROUP, N_GROUPS, PER_CHANNEL: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    q = tl.load(w_ptr + n * K + offs, mask=mask, other=0).to(tl.float32)
    if PER_CHANNEL:
        s = tl.load(s_ptr + n)
    else:
        s = tl.load(s_ptr + n * N_GROUPS + offs // GROUP, mask=mask, other=0.0)
    tl.store(out_ptr + n * K + offs, (q * s).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_weight_launch(w, w_scale, out, group_size: int) -> None:
    """out [N, K] (any float dtype) = q * scale in float32, rounded once to out's dtype: one pass (reads 1 byte,
    writes out's bytes per element). One program per (row, 4096-wide chunk); 16-byte int8 loads."""
    N, K = w.shape
    if N == 0 or K == 0:
        return
    block = min(4096, max(16, triton.next_power_of_2(K)))
    group = group_size if group_size else K
    _dequantize_weight_kernel[(N, triton.cdiv(K, block))](w, w_scale, out, K, group, K // group,
                                                          PER_CHANNEL=group_size == 0, BLOCK_K=block,
                                                          num_warps=4 if block <= 1024 else 8)
