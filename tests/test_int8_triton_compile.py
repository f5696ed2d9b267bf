"""Compiles the int8 Triton kernels for sm_90 (every variant) and sm_80 (each kernel once) without a GPU (the
interpreter accepts code compiled Triton rejects) and checks the PTX for what the bit-exactness contract
needs: IEEE div.rn (not div.full), a NaN-keeping integer max and no flush-to-zero in the quantizer, int8
MMAs and no FMA contraction in the W8A8 epilogue, no TF32 in the fp32 W8A16 path."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from test_triton_compile import SIGNATURE  # noqa: E402  (the kernel signature from its parameters)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = SIGNATURE + r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastdistill.kernels import int8_linear as k


def ptx(fn, types, const, warps=4, fusion=True, cc=90):
    src = ASTSource(fn=fn, signature=signature(fn, types),
                    constexprs={(fn.arg_names.index(n),): v for n, v in const.items()})
    p = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                       options=dict(num_warps=warps, num_stages=3, enable_fp_fusion=fusion)).asm["ptx"]
    assert f".target sm_{cc}" in p, cc
    return p


out = {}
for cc in (90, 80):
    p = ptx(k._quantize_per_token_kernel, dict(x_ptr="*bf16", q_ptr="*i8", s_ptr="*fp32", K="i32"),
            dict(BLOCK_K=4096), 8, fusion=False, cc=cc)
    out[f"quant_{cc}"] = {"div_rn": "div.rn.f32" in p, "div_approx": "div.full" in p or "div.approx" in p,
                          "int_max": "max.s32" in p, "ftz": ".ftz" in p}
types = dict(x_ptr="*i8", w_ptr="*i8", xs_ptr="*fp32", ws_ptr="*fp32", b_ptr="*bf16", out_ptr="*bf16", M="i32",
             N="i32", K="i32")
for bm, bn, bk, w, cc in [(128, 128, 64, 8, 90), (16, 64, 128, 4, 90), (128, 128, 64, 8, 80)]:
    p = ptx(k._int8_linear_kernel, types, dict(HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), w, fusion=False,
            cc=cc)
    out[f"w8a8_{bm}_{cc}"] = {"int8_mma": "mma" in p and ".s8" in p, "fma": "fma.rn.f32" in p}
types = dict(x_ptr="*bf16", w_ptr="*i8", s_ptr="*fp32", b_ptr="*bf16", out_ptr="*bf16", M="i32", N="i32", K="i32",
             GROUP="i32", N_GROUPS="i32")
for per, cc in [(True, 90), (False, 90), (True, 80)]:
    p = ptx(k._weight_only_kernel, types, dict(PER_CHANNEL=per, HAS_BIAS=True, IEEE=False, BLOCK_M=16, BLOCK_N=64,
                                               BLOCK_K=64), cc=cc)
    out[f"w8a16_{per}_{cc}"] = {"mma": "mma" in p}
types.update(x_ptr="*fp32", out_ptr="*fp32")
p = ptx(k._weight_only_kernel, types, dict(PER_CHANNEL=True, HAS_BIAS=False, IEEE=True, BLOCK_M=64, BLOCK_N=128,
                                           BLOCK_K=64))
out["w8a16_fp32"] = {"tf32": "tf32" in p}
print(json.dumps(out))
"""


def test_int8_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower():
        pytest.skip("triton's bundled ptxas is unavailable here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # int_max: the row max on the float bits as integers keeps NaN (a float max drops it on GPUs);
    # no .ftz: denormal rows are kept for the tiny-row rescaling.
    assert r["quant_90"] == r["quant_80"] == {"div_rn": True, "div_approx": False, "int_max": True, "ftz": False}, r
    for key in ("w8a8_128_90", "w8a8_16_90", "w8a8_128_80"):
        assert r[key] == {"int8_mma": True, "fma": False}, r
    assert r["w8a16_True_90"]["mma"] and r["w8a16_False_90"]["mma"] and r["w8a16_True_80"]["mma"], r
    assert not r["w8a16_fp32"]["tf32"], r
