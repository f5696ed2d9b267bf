"""The int8 GPU routes (issue 14): the auto routing tables (pure functions of shape and capability), the dense
W8A16 route (dequantize to x's dtype + torch's GEMM) against the reference on CPU, the Triton dequantization
and the L2-grouped W8A8 grid in the interpreter, the GPU tile configurations' shared-memory budget; and, marked
gpu, the routes on a CUDA device (benchmarks/gpu_check.sh)."""
import os

import pytest
import torch

from fastdistill.kernels import int8_linear as k
from fastdistill.ops.int8_linear import W8A8_CUDA_ROUTES, int8_linear, w8a8_cuda_route
from fastdistill.ops.int8_weight_only_linear import (W8A16_CUDA_ROUTES, dequantize_weight, int8_weight_only_linear,
                                                     int8_weight_only_linear_dense, w8a16_cuda_route)
from fastdistill.reference.int8_linear import (dequantize_weight_ref, int8_linear_ref, int8_weight_only_linear_f64,
                                               int8_weight_only_linear_ref, quantize_per_token_ref,
                                               quantize_weight_ref)
from fastdistill.testing import assert_close_to_oracle

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CAPS = [(8, 0), (8, 6), (9, 0), (10, 0), (12, 0)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- routing tables --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cap", CAPS)
def test_w8a16_route_by_m(cap):
    """H200 CSV: the cuda kernel is 1.29-1.34x bf16 up to M 16 and 0.55x at M 64 (dense predicted 0.48x), 0.23x
    at M 4096 (dense predicted 0.94x): cuda up to 64 rows, dense above, for any N, K; unmeasured GPUs share it."""
    for N, K in ((8192, 8192), (4096, 11008), (7, 40)):
        assert [w8a16_cuda_route(M, N, K, cap) for M in (0, 1, 16, 64)] == ["cuda"] * 4
        assert [w8a16_cuda_route(M, N, K, cap) for M in (65, 256, 1024, 4096, 10**6)] == ["dense"] * 5
        for dtype in (torch.bfloat16, torch.float16):
            assert w8a16_cuda_route(4096, N, K, cap, dtype) == "dense"
        # float32 x: cuBLAS may run TF32; the cuda kernel keeps fp32 FMAs at every M
        assert {w8a16_cuda_route(M, N, K, cap, torch.float32) for M in (1, 64, 65, 4096)} == {"cuda"}


@pytest.mark.parametrize("cap", CAPS)
def test_w8a8_route_is_cuda_until_triton_is_measured(cap):
    assert {w8a8_cuda_route(M, 8192, 8192, cap) for M in (1, 16, 17, 256, 8192)} == {"cuda"}


def test_route_tables_are_well_formed():
    for table, names in ((W8A16_CUDA_ROUTES, {"cuda", "dense", "triton"}), (W8A8_CUDA_ROUTES, {"cuda", "triton"})):
        for rows in table.values():
            limits = [limit for limit, _ in rows]
            assert limits[-1] is None and limits[:-1] == sorted(limits[:-1]), rows  # increasing, catch-all last
            assert {route for _, route in rows} <= names, rows


# ---- GPU tile configurations -----------------------------------------------------------------------------

SMEM = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (9, 0): 227 * 1024, (10, 0): 227 * 1024, (12, 0): 99 * 1024}


@pytest.mark.parametrize("cap", CAPS)
def test_gpu_configs_fit_shared_memory(cap):
    """Each pipeline stage holds an A and a B tile (W8A8: int8 both; W8A16: 16-bit x, int8 w plus its 16-bit
    conversion); every candidate must fit the GPU's per-block shared memory, or the launch fails there."""
    for M in (1, 16, 17, 64, 65, 256, 257, 8192):
        for bm, bn, bk, warps, stages in k.w8a8_configs(M, cap):
            assert stages * (bm * bk + bk * bn) <= SMEM[cap], (M, cap, bm, bn, bk, stages)
            assert warps in (4, 8) and bm >= 16 and bn >= 16 and bk >= 32
        bm, bn, bk, warps, stages = k.w8a16_config(M, cap)  # (the compile test below checks every kernel exactly)
        assert stages * (2 * bm * bk + bk * bn) + 2 * bk * bn <= SMEM[cap], (M, cap)


def test_w8a8_tile_grows_with_m():
    firsts = [k.w8a8_configs(M, (9, 0))[0] for M in (1, 64, 256, 8192)]
    assert [c[0] for c in firsts] == [16, 64, 128, 128] and firsts[-1][:3] == (128, 256, 128)


# ---- dense W8A16 route (CPU) -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [0, 16])
def test_dequantize_weight_one_rounding(dtype, group_size, seed):
    q, s = quantize_weight_ref(torch.randn(37, 48, generator=_gen(seed)) * 3, group_size)
    out = dequantize_weight(q, s, group_size, dtype)
    assert out.dtype == dtype and torch.equal(out, dequantize_weight_ref(q, s, group_size).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [0, 20])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
def test_dense_route_matches_oracle(dtype, group_size, bias_dtype, seed):
    g = _gen(seed)
    M, K, N = 9, 200, 67
    q, s = quantize_weight_ref(torch.randn(N, K, generator=g), group_size)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = None if bias_dtype is None else torch.randn(N, generator=g).to(bias_dtype)
    out = int8_weight_only_linear_dense(x, q, s, bias, group_size)
    assert out.dtype == dtype and out.shape == (M, N)
    oracle = int8_weight_only_linear_f64(x, q, s, bias, group_size)
    ref = int8_weight_only_linear_ref(x, q, s, bias, group_size)
    # the weight and (a float32) bias are rounded to x's dtype before the GEMM: one more rounding than the reference
    assert_close_to_oracle(out, oracle, ref, roundings=1 if dtype == torch.float32 else 2, msg=f"{dtype}")


def test_dense_route_empty_and_nan():
    q, s = quantize_weight_ref(torch.randn(5, 8), 0)
    assert int8_weight_only_linear_dense(torch.randn(0, 8), q, s, None, 0).shape == (0, 5)
    q0, s0 = torch.zeros(5, 0, dtype=torch.int8), torch.ones(5, 2)  # K = 0 with per-group scales
    b = torch.randn(5)
    assert torch.equal(int8_weight_only_linear_dense(torch.randn(3, 0), q0, s0, b, 0), b.expand(3, 5))
    x = torch.randn(2, 8)
    x[1, 3] = float("nan")
    out = int8_weight_only_linear_dense(x, q, s, None, 0)
    assert out[1].isnan().all() and not out[0].isnan().any()


def test_dense_route_autograd_compile_and_opcheck(seed):
    g = _gen(seed)
    q, s = quantize_weight_ref(torch.randn(6, 16, generator=g), 8)
    x = torch.randn(4, 16, generator=g, requires_grad=True)
    bias = torch.randn(6, generator=g, requires_grad=True)
    dy = torch.randn(4, 6, generator=g)
    int8_weight_only_linear_dense(x, q, s, bias, 8).backward(dy)
    x2, b2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    int8_weight_only_linear_ref(x2, q, s, b2, 8).backward(dy)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bias.grad, b2.grad)
    torch.library.opcheck(torch.ops.fastdistill.int8_weight_only_linear_dense.default, (x.detach(), q, s, bias, 8))
    compiled = torch.compile(int8_weight_only_linear_dense, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x.detach(), q, s, None, 8), int8_weight_only_linear_dense(x.detach(), q, s, None, 8))


# ---- Triton kernels in the interpreter ---------------------------------------------------------------------

needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="GPU machines run these for real (gpu cases below)")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # (the interpreter truncates bf16 casts)
@pytest.mark.parametrize("group_size", [0, 12])
def test_triton_dequantize_kernel(dtype, group_size, seed):
    q, s = quantize_weight_ref(torch.randn(5, 36, generator=_gen(seed)), group_size)
    out = torch.full((5, 36), float("nan"), dtype=dtype)
    k.dequantize_weight_launch(q, s, out, group_size)
    assert torch.equal(out, dequantize_weight_ref(q, s, group_size).to(dtype))


@needs_interpreter
@pytest.mark.parametrize("M", [5, 40])  # the 16- and 64-token swapped tiles (GPU configurations)
@pytest.mark.parametrize("group_size", [0, 20])
def test_w8a16_swapped_kernel(M, group_size, seed):
    """fp16 x: the interpreter has no bf16 matmul (test_int8_gpu_config.py says why); same code path."""
    g = _gen(seed)
    K, N = 200, 130
    q, s = quantize_weight_ref(torch.randn(N, K, generator=g), group_size)
    x, bias = torch.randn(M, K, generator=g).half(), torch.randn(N, generator=g)
    out = torch.full((M, N), float("nan"), dtype=torch.float16)
    cfg = k.w8a16_config(M, (9, 0), group_size > 0, swap=True)
    k.int8_weight_only_linear_launch(x, q, s, bias, out, group_size, interpret=True, gpu_config=True, config=cfg)
    oracle = int8_weight_only_linear_f64(x, q, s, bias, group_size)
    assert_close_to_oracle(out, oracle, int8_weight_only_linear_ref(x, q, s, bias, group_size), msg=str(cfg))


@needs_interpreter
def test_largest_m_bucket_gpu_configs(seed):
    """M > 256 (test_int8_gpu_config.py runs the smaller buckets): W8A8 128 x 256 x 128 bitwise, W8A16 128 x 128 x 64
    and the swapped 256-token tile (fp16) against the oracle."""
    g = _gen(seed)
    M, K, N = 300, 200, 130
    x8 = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    w8 = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    xs, ws = torch.rand(M, generator=g) * 1e-2, torch.rand(N, generator=g) * 1e-2
    out = torch.full((M, N), float("nan"))
    k.int8_linear_launch(x8, w8, xs, ws, None, out, interpret=True, gpu_config=True)
    assert torch.equal(out, int8_linear_ref(x8, xs, w8, ws))
    q, s = quantize_weight_ref(torch.randn(N, K, generator=g), 0)
    x = torch.randn(M, K, generator=g).half()
    oracle, ref = int8_weight_only_linear_f64(x, q, s), int8_weight_only_linear_ref(x, q, s)
    for cfg in (None, k.w8a16_config(M, (9, 0), swap=True)):
        out = torch.full((M, N), float("nan"), dtype=torch.float16)
        k.int8_weight_only_linear_launch(x, q, s, None, out, 0, interpret=True, gpu_config=True, config=cfg)
        assert_close_to_oracle(out, oracle, ref, msg=str(cfg))


@needs_interpreter
def test_w8a8_grouped_grid_covers_every_tile(seed):
    """16-row interpreter tiles: 10 row tiles (a full group of 8 + a partial one of 2) x 3 column tiles; a wrong
    tile mapping leaves poisoned (NaN) tiles or writes one twice."""
    g = _gen(seed)
    M, N, K = 16 * 9 + 3, 70, 40
    x = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    xs, ws = torch.rand(M, generator=g), torch.rand(N, generator=g)
    out = torch.full((M, N), float("nan"))
    k.int8_linear_launch(x, w, xs, ws, None, out, interpret=True)
    assert torch.equal(out, int8_linear_ref(x, xs, w, ws))


@needs_interpreter
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_w8a8_tma_kernel_persistent(out_dtype, seed):
    """The persistent TMA kernel: 3 programs walk 10 x 3 tiles (partial ones read zeros beyond the edges)."""
    g = _gen(seed)
    M, N, K = 16 * 9 + 3, 70, 48
    x = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    xs, ws, bias = torch.rand(M, generator=g) * 1e-2, torch.rand(N, generator=g) * 1e-2, torch.randn(N, generator=g)
    out = torch.full((M, N), float("nan"), dtype=out_dtype)
    k.int8_linear_launch(x, w, xs, ws, bias, out, interpret=True, config=(16, 32, 32, 4, 1, "tma"))
    assert torch.equal(out, int8_linear_ref(x, xs, w, ws, bias, out_dtype))


def test_w8a8_tma_candidates_follow_tma_rules():
    assert k.w8a8_tma_configs(4096, 8192, (9, 0), True)[0][-1] == "tma"
    assert k.w8a8_tma_configs(64, 8192, (10, 0), True)
    assert not k.w8a8_tma_configs(4096, 8192, (8, 0), True)  # no TMA before sm_90
    assert not k.w8a8_tma_configs(4096, 8200 + 4, (9, 0), True)  # row stride not a multiple of 16 bytes
    assert not k.w8a8_tma_configs(4096, 8192, (9, 0), False)  # unaligned base
    assert not k.w8a8_tma_configs(16, 8192, (9, 0), True)  # 16 rows: no 64-row wgmma tile


# ---- on a GPU (benchmarks/gpu_check.sh) -----------------------------------------------------------------------

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("M", [1, 64, 65, 300])  # both sides of the W8A16 crossover
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_w8a16_auto_and_every_route(M, dtype, seed):
    g = _gen(seed)
    K, N = 512, 776
    q, s = quantize_weight_ref(torch.randn(N, K, generator=g), 0)
    x, bias = torch.randn(1, M, K, generator=g).to(dtype), torch.randn(N, generator=g)  # M rows, batch dims
    oracle = int8_weight_only_linear_f64(x, q, s, bias)
    ref = int8_weight_only_linear_ref(x, q, s, bias)
    args = (x.cuda(), q.cuda(), s.cuda(), bias.cuda())
    for backend in ("auto", "cuda", "triton"):
        out = int8_weight_only_linear(*args, backend=backend).cpu()
        assert_close_to_oracle(out, oracle, ref, roundings=2, msg=backend)
    swapped = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
    k.int8_weight_only_linear_launch(args[0].view(M, K), args[1], args[2], args[3], swapped, 0, interpret=False,
                                     config=k.w8a16_config(M, torch.cuda.get_device_capability(), swap=True))
    assert_close_to_oracle(swapped.cpu().view(1, M, N), oracle, ref, roundings=2, msg="swap")
    dense = int8_weight_only_linear_dense(args[0].reshape(-1, K), *args[1:3], args[3], 0).cpu().view(1, M, N)
    assert_close_to_oracle(dense, oracle, ref, roundings=2, msg="dense")
    w = dequantize_weight(args[1], args[2], 0, dtype)  # the Triton dequantization: round to nearest even on GPUs
    assert torch.equal(w.cpu(), dequantize_weight_ref(q, s).to(dtype))


@gpu
@pytest.mark.parametrize("M", [5, 40, 200, 1024])  # every W8A8 bucket; 1024^3 = 2^30 multiply-adds is tuned
def test_gpu_w8a8_triton_configs_bitwise(M, seed):
    g = _gen(seed)
    N = K = 1024
    x = torch.randn(M, K, generator=g)
    xq, xs = quantize_per_token_ref(x)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    ws, bias = torch.rand(N, generator=g) * 1e-2, torch.randn(N, generator=g).to(torch.bfloat16)
    expected = int8_linear_ref(xq, xs, w, ws, bias, torch.bfloat16)
    cuda = [t.cuda() for t in (xq, xs, w, ws, bias)]
    cap = torch.cuda.get_device_capability()
    for c in k.w8a8_configs(M, cap) + k.w8a8_tma_configs(M, K, cap, True):
        out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
        k.int8_linear_launch(*cuda, out, interpret=False, config=c)
        assert torch.equal(out.cpu(), expected), c
    for backend in ("auto", "triton", "cuda"):
        assert torch.equal(int8_linear(*cuda, torch.bfloat16, backend=backend).cpu(), expected), backend


# ---- compiled for real GPUs (no GPU needed; slow: ~40 compiles) ------------------------------------------------

COMPILE_SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastdistill.kernels import int8_linear as k


def compile_(fn, types, const, cfg, cc):
    sig = {p.name: "constexpr" if p.is_constexpr else types[p.name] for p in fn.params}
    # what a launch with 16-byte aligned pointers and N, K multiples of 16 specializes on
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in types.items()
             if n in fn.arg_names and (t.startswith("*") or n in ("N", "K"))}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in const.items()},
                    attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                       options=dict(num_warps=cfg[3], num_stages=cfg[4], enable_fp_fusion=False))
    return c.asm["ptx"], c.metadata.shared


out = []
w8a8 = dict(x_ptr="*i8", w_ptr="*i8", xs_ptr="*fp32", ws_ptr="*fp32", b_ptr="*bf16", out_ptr="*bf16", M="i32",
            N="i32", K="i32")
w8a16 = dict(x_ptr="*bf16", w_ptr="*i8", s_ptr="*fp32", b_ptr="*bf16", out_ptr="*bf16", M="i32", N="i32", K="i32",
             GROUP="i32", N_GROUPS="i32")
for cc in (80, 86, 90):
    cap = (cc // 10, cc % 10)
    for M in (16, 64, 256, 8192):
        for cfg in k.w8a8_configs(M, cap):
            ptx, smem = compile_(k._int8_linear_kernel, w8a8, dict(HAS_BIAS=True, BLOCK_M=cfg[0], BLOCK_N=cfg[1],
                                                                   BLOCK_K=cfg[2]), cfg, cc)
            out.append(dict(cc=cc, kernel="w8a8", cfg=cfg, smem=smem, wgmma="wgmma" in ptx and ".s8" in ptx,
                            pipelined="cp.async" in ptx, fma="fma.rn.f32" in ptx))
        for grouped in (False, True):
            for swap in (False, True):
                cfg = k.w8a16_config(M, cap, grouped, swap)
                const = dict(PER_CHANNEL=not grouped, HAS_BIAS=True, BLOCK_M=cfg[0], BLOCK_N=cfg[1], BLOCK_K=cfg[2])
                fn = k._weight_only_swap_kernel if swap else k._weight_only_kernel
                ptx, smem = compile_(fn, w8a16, const if swap else dict(const, IEEE=False), cfg, cc)
                out.append(dict(cc=cc, kernel="w8a16", cfg=cfg, smem=smem, wgmma="wgmma" in ptx,
                                pipelined="cp.async" in ptx, fma=False))
for M in (64, 256, 8192):
    for cfg in k.w8a8_tma_configs(M, 8192, (9, 0), True):
        bm, bn, bk = cfg[:3]
        types = dict(w8a8, x_desc=f"tensordesc<i8[{bm}, {bk}]>", w_desc=f"tensordesc<i8[{bn}, {bk}]>",
                     PROGRAMS="i32")
        ptx, smem = compile_(k._int8_linear_tma_kernel, types, dict(HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn,
                                                                    BLOCK_K=bk), cfg, 90)
        out.append(dict(cc=90, kernel="w8a8_tma", cfg=cfg, smem=smem, wgmma="wgmma" in ptx and ".s8" in ptx,
                        pipelined="cp.async.bulk.tensor" in ptx, fma="fma.rn.f32" in ptx))
ptx, _ = compile_(k._dequantize_weight_kernel, dict(w_ptr="*i8", s_ptr="*fp32", out_ptr="*bf16", K="i32",
                                                    GROUP="i32", N_GROUPS="i32"),
                  dict(PER_CHANNEL=True, BLOCK_K=4096), (0, 0, 0, 8, 3), 90)
print(json.dumps(dict(configs=out, dequant_v4="ld.global.v4" in ptx)))
"""
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}  # per-block opt-in shared memory


@pytest.mark.slow
def test_gpu_configs_compile_within_shared_memory():
    """Every GPU configuration compiled for sm_80, sm_86 and sm_90 fits that GPU's shared memory (a launch that
    needs more fails at run time: per-group W8A16 at 128 x 128 x 64 with 3 stages needed 112 KB on sm_86), is
    software-pipelined (cp.async; TMA for the persistent kernel), W8A8 has no FMA contraction (bit-exact
    epilogue) and uses int8 wgmma on sm_90 from 64 rows up; the dequantization loads 16 bytes per thread."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=900)
    if proc.returncode != 0 and "ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower():
        pytest.skip("triton's bundled ptxas is unavailable here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["dequant_v4"]
    for c in r["configs"]:
        assert c["smem"] <= SMEM_LIMIT[c["cc"]] and c["pipelined"] and not c["fma"], c
        if c["cc"] == 90 and c["cfg"][0] >= 64:
            assert c["wgmma"], c
