"""Compiles the Triton kernels for an A100 (sm_80) and an H100/H200 (sm_90) without a GPU: the interpreter used
by the CPU tests accepts code that compiled Triton rejects (e.g. non-constexpr globals); this does not.
Runs in a subprocess because the test session imported triton in interpreter mode. Every variant compiles
for sm_90; sm_80 gets the variants A100 users run (the default training call: no labels, gradient written),
which keeps the runtime small."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shared by the compile scripts: the triton signature of a kernel from its parameters (constexpr ones from
# the annotation), the given pointer/scalar types, and i64 for strides not listed.
SIGNATURE = r"""
def signature(fn, types):
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in types:
            sig[p.name] = types[p.name]
        elif "stride" in p.name:
            sig[p.name] = "i64"
        else:
            raise KeyError(f"{fn.__name__}: no type for argument {p.name!r}: add it to the test's types")
    return sig
"""

SCRIPT = SIGNATURE + r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastdistill.kernels import distill_loss as kernels

types = dict(S="*bf16", s_stride="i64", T="*fp32", t_stride="i64", L="*i64", SCALE="*fp32", LOSS="*fp32",
             G="*bf16", V="i32", inv_t="fp32", w="fp32", w1m="fp32", log_w="fp32", log_1mw="fp32",
             soft_coef="fp32", grad_coef="fp32", inv_v="fp32", hard_weight="fp32", ignore_index="i64")
fn = kernels._distill_loss_kernel
FULL, TRAIN, LOSS_ONLY = (True, True, True, True), (False, False, False, True), (False, False, False, False)
# (arch, div, (HAS_LABELS, CE, CE_OWN, WRITE)): everything on; the default training call; loss only (eval).
variants = [(90, div, v) for div in range(7) for v in (FULL, TRAIN)] + [(90, 0, LOSS_ONLY)]
variants += [(80, div, TRAIN) for div in range(7)] + [(80, 0, FULL)]
results = []
for cc, div, (labels, ce, ce_own, write) in variants:
    const = dict(DIV=div, HAS_LABELS=labels, CE=ce, CE_OWN=ce_own, WRITE=write, BLOCK_V=8192)
    src = ASTSource(fn=fn, signature=signature(fn, types),
                    constexprs={(fn.arg_names.index(n),): v for n, v in const.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                         options=dict(num_warps=16, enable_fp_fusion=False)).asm["ptx"]
    results.append({"cc": cc, "div": div, "labels": labels, "write": write, "target": f".target sm_{cc}" in ptx,
                    "loads": "ld.global" in ptx, "stores": ptx.count("st.global"), "atomics": "atom." in ptx})
print(json.dumps(results))
"""


# topk_distill_loss: every divergence with all features on (bucket tail with its rare rest-max
# branch, labels, own hard-label softmax, gradient), renormalize with and without the gradient, and the
# default training call (no labels, gradient written); sm_80: the training call and everything on.
TOPK_SCRIPT = SIGNATURE + r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastdistill.kernels import topk_distill_loss as kernels

types = dict(S="*bf16", s_stride="i64", LP="*fp16", lp_stride="i64", IDX="*i32", idx_stride="i64", L="*i64",
             SCALE="*fp32", LOSS="*fp32", G="*bf16", V="i32", K="i32", inv_t="fp32", w="fp32", w1m="fp32",
             log_w="fp32", log_1mw="fp32", soft_coef="fp32", grad_coef="fp32", hard_weight="fp32",
             ignore_index="i64")
fn = kernels._topk_distill_loss_kernel
# (arch, div, bucket, labels (+ CE, CE_OWN), write)
variants = [(90, div, True, True, True) for div in range(6)]
variants += [(90, 0, False, True, True), (90, 2, False, False, False), (90, 0, True, False, True)]
variants += [(80, 0, True, False, True), (80, 0, True, True, True)]
results = []
for cc, div, bucket, labels, write in variants:
    const = dict(DIV=div, BUCKET=bucket, HAS_LABELS=labels, CE=labels, CE_OWN=labels, WRITE=write, BLOCK_V=8192,
                 BLOCK_K=128, RB=kernels.REST_BLOCK_V)
    src = ASTSource(fn=fn, signature=signature(fn, types),
                    constexprs={(fn.arg_names.index(n),): v for n, v in const.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                         options=dict(num_warps=16, enable_fp_fusion=False)).asm["ptx"]
    results.append({"cc": cc, "div": div, "bucket": bucket, "labels": labels, "write": write,
                    "target": f".target sm_{cc}" in ptx, "loads": "ld.global" in ptx, "atomics": "atom." in ptx,
                    "fp64": "add.f64" in ptx or "add.rn.f64" in ptx})
print(json.dumps(results))
"""


def _compile(script):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower():
        pytest.skip("triton's bundled ptxas is unavailable here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernel_compiles_for_sm80_and_sm90():
    results = _compile(SCRIPT)
    assert len(results) == 23
    assert all(r["target"] and r["loads"] and not r["atomics"] for r in results), results
    train = [r for r in results if not r["labels"] and r["write"]]
    assert {r["cc"] for r in train} == {80, 90} and len(train) == 14, train  # the default training call, every div
    loss_only = next(r for r in results if not r["write"])
    assert all(r["stores"] > loss_only["stores"] for r in train), results  # it also writes the gradient


def test_topk_kernel_compiles_for_sm80_and_sm90():
    results = _compile(TOPK_SCRIPT)
    assert len(results) == 11
    assert all(r["target"] and r["loads"] and not r["atomics"] for r in results), results
    assert all(r["fp64"] for r in results if r["bucket"]), results  # the rest mass is summed in fp64
    assert {r["cc"] for r in results if not r["labels"] and r["write"]} == {80, 90}, results


def test_kernel_globals_survive_tritons_launch_check():
    """Compiled Triton re-checks every global a kernel used at each launch with `deepcopy(v) != v`; a
    constexpr NaN fails it forever ("Global variable NAN has changed", seen on the H200 with triton 3.6).
    The interpreter skips that check, so this test does it for every module under fastdistill/kernels."""
    import copy
    import importlib
    import pkgutil

    import triton.language as tl

    import fastdistill.kernels as pkg

    bad = []
    for mod in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"fastdistill.kernels.{mod.name}")
        for name, val in vars(module).items():
            if isinstance(val, (tl.constexpr, int, float)) and copy.deepcopy(val) != val:
                bad.append(f"{mod.name}.{name}")
    assert not bad, f"globals that compare unequal to their own copy: {bad}"
