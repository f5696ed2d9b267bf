"""Compiles the sparse Triton kernels for an A100 (sm_80) and an H100/H200 (sm_90) without a GPU (the interpreter
accepts code compiled Triton rejects), in a subprocess because the test session imported triton in interpreter mode.
Checks: no atomics (deterministic), tensor-core MMAs for 16-bit operands, no TF32 for fp32."""
import pytest

pytest.importorskip("triton")
from test_triton_compile import SIGNATURE, _compile  # noqa: E402  (the shared subprocess runner)

SCRIPT = SIGNATURE + r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastdistill.kernels import block_sparse_linear as bsr, semi_structured_linear as s24

def build(fn, types, const, cc):
    src = ASTSource(fn=fn, signature=signature(fn, types),
                    constexprs={(fn.arg_names.index(n),): v for n, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=4)).asm["ptx"]

results = []
for dt in ("bf16", "fp32"):
    prec = "ieee" if dt == "fp32" else None
    i32 = dict(M="i32", K="i32", N="i32", R="i32", MB="i32")
    p = lambda *names: {n: f"*{dt}" for n in names}
    idx = lambda *names: {n: "*i32" for n in names}
    kernels = [
        (bsr._bsr_fwd_kernel, {**p("x_ptr", "v_ptr", "b_ptr", "y_ptr"), **idx("crow_ptr", "col_ptr"), **i32},
         dict(HAS_BIAS=True, BM=64, BN=64, BK=64, PREC=prec, UPCAST=False)),
        (bsr._bsr_dx_kernel, {**p("dy_ptr", "v_ptr", "dx_ptr"), **idx("ccol_ptr", "row_ptr", "perm_ptr"), **i32},
         dict(BM=64, BN=32, BK=16, PREC=prec, UPCAST=False)),
        (bsr._bsr_dw_kernel, {**p("dy_ptr", "x_ptr", "dv_ptr"), **idx("crow_ptr", "col_ptr"), **i32},
         dict(SEARCH=8, BM=32, BN=16, BK=64, PREC=prec, UPCAST=False)),
        (s24._semi_structured_kernel, {**p("x_ptr", "v_ptr", "b_ptr", "y_ptr"), "meta_ptr": "*u8", **i32},
         dict(HAS_BIAS=True, BM=16, BN=64, BK=64, PREC=prec, UPCAST=False)),
    ]
    for cc in (90, 80):
        for fn, types, const in kernels if dt == "bf16" else kernels[:1]:  # fp32: one kernel for the IEEE check
            ptx = build(fn, types, const, cc)
            results.append({"kernel": fn.__name__, "dtype": dt, "cc": cc, "target": f".target sm_{cc}" in ptx,
                            "atomics": "atom." in ptx, "mma": "mma" in ptx, "tf32": ".tf32" in ptx})
print(json.dumps(results))
"""


def test_sparse_kernels_compile_for_sm80_and_sm90():
    results = _compile(SCRIPT)
    assert len(results) == 10
    for r in results:
        assert r["target"] and not r["atomics"], r
        if r["dtype"] == "bf16":
            assert r["mma"], r  # tensor cores
        else:
            assert not r["tf32"], r  # fp32 stays IEEE
