"""sampled_distill_loss accuracy: every backend vs the float64 reference (loss and gradient), the reference
vs hand-computed formulas, duplicates, k = 1 and k > V, temperatures, hard labels, dtypes, extreme logits.
The helpers at the top are shared with test_sampled_distill_loss_api.py."""
import math
import os

import pytest
import torch

from conftest import KERNEL_BACKENDS, backend_device
from fastdistill.cache.sampling import sample_teacher_targets
from fastdistill.ops.sampled_distill_loss import sampled_distill_loss
from fastdistill.reference.sampled_distill_loss import sampled_distill_loss_ref
from fastdistill.testing import assert_close_to_oracle, make_labels, make_logits, reduced_reference

ALL_BACKENDS = KERNEL_BACKENDS + ["reference"]


def make_sampled(shape, k, *, temperature=1.0, seed=0, device="cpu", dtype=torch.float32, index_dtype=torch.int64,
                 scale=2.0, duplicates=True):
    """k draws per row from softmax(teacher / T) (the cache's sampler), shuffled within each row (the kernels
    must not rely on the sorted order), with the first two draws of every row forced equal (duplicates)."""
    teacher = make_logits(shape, dtype=torch.float64, seed=seed, scale=scale)
    lp, ids = sample_teacher_targets(teacher, k, temperature, generator=torch.Generator().manual_seed(seed + 5))
    if duplicates and k > 1:
        lp[..., 1], ids[..., 1] = lp[..., 0], ids[..., 0]
    order = torch.rand(lp.shape, generator=torch.Generator().manual_seed(seed + 3)).argsort(-1)
    lp, ids = lp.gather(-1, order), ids.gather(-1, order)
    return lp.to(dtype).to(device), ids.to(index_dtype).to(device)


def _grad(loss, x, upstream):
    (g,) = torch.autograd.grad(loss, x, upstream)
    return g


def check_against_oracle(backend, student, lp, ids, labels=None, *, seed=0, **options):
    """sampled_distill_loss(backend) vs the float64 reference: loss, and gradient under a random upstream grad."""
    reduction = options.get("reduction", "batchmean")
    s = student.detach().requires_grad_(True)
    out = sampled_distill_loss(s, lp, ids, labels=labels, backend=backend, **options)
    assert out.dtype == torch.float32
    g = torch.Generator().manual_seed(seed + 7)
    upstream = (torch.rand(out.shape, generator=g, dtype=torch.float64) + 0.5).to(out.device)
    if reduction == "batchmean":
        upstream = torch.ones_like(upstream)
    s64 = student.detach().double().requires_grad_(True)
    oracle = sampled_distill_loss_ref(s64, lp.double(), ids, labels, **options)
    grad = _grad(out, s, upstream.float())
    grad64 = _grad(oracle, s64, upstream)
    s_low = student.detach().requires_grad_(True)
    lp_low = lp.float() if lp.dtype == torch.float64 else lp  # what the kernels read
    ref = sampled_distill_loss_ref(s_low, lp_low, ids, labels, **options)
    ref_grad = _grad(ref, s_low, upstream.float())
    tag = f"{backend} {options} k={ids.shape[-1]} dtype={student.dtype}/{lp.dtype} seed={seed}"
    if reduction != "none":
        rows_options = {**options, "reduction": "none"}
        ref = reduced_reference(sampled_distill_loss_ref(student, lp_low, ids, labels, **rows_options),
                                sampled_distill_loss_ref(student.double(), lp.double(), ids, labels, **rows_options),
                                oracle, labels=labels, reduction=reduction, num_items=options.get("num_items"),
                                ignore_index=options.get("ignore_index", -100))
    assert_close_to_oracle(out, oracle, ref, msg=f"loss {tag}")
    assert grad.dtype == student.dtype and grad.shape == student.shape
    roundings = 1 if reduction == "batchmean" or student.dtype == torch.float32 else 2
    if backend == "triton" and student.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        roundings += 1  # the interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest even)
    assert_close_to_oracle(grad, grad64, ref_grad, roundings=roundings, msg=f"grad {tag}")
    if labels is not None:
        ignored = labels == options.get("ignore_index", -100)
        assert torch.all(grad[ignored] == 0)
        if reduction == "none":
            assert torch.all(out[ignored] == 0)
    return out, grad


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (V, k, labels, hard_weight, reduction, student dtype): k = 1, k = 24 (duplicates) at an odd V = 1271, and
# k > V (draws with replacement) at V = 97 (the interpreter's cost grows like k²); a Latin square.
CASES = [(1271, 1, "none", 0.0, "batchmean", F32), (1271, 1, "ignore", 0.6, "none", BF16),
         (1271, 1, "ignore", 0.0, "sum", F16), (1271, 24, "none", 0.0, "sum", BF16),
         (1271, 24, "ignore", 0.0, "none", F32), (1271, 24, "ignore", 0.6, "batchmean", F16),
         (97, 300, "none", 0.0, "none", F16), (97, 300, "ignore", 0.6, "sum", F32),
         (97, 300, "ignore", 0.0, "batchmean", BF16)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("vocab,k,label_mode,hard_weight,reduction,dtype", CASES,
                         ids=[f"V{v}-k{k}-{lm}{hw}-{r}-{str(dt)[6:]}" for v, k, lm, hw, r, dt in CASES])
def test_matches_reference(backend, vocab, k, label_mode, hard_weight, reduction, dtype, seed):
    device = backend_device(backend)
    rows = 2 if backend == "triton" and device == "cpu" else 3
    shape = (rows, 2, vocab)  # 3-D: rows are all leading dims
    student = make_logits(shape, dtype=dtype, device=device, seed=seed)
    lp, ids = make_sampled(shape, k, temperature=2.0, seed=seed + 1, device=device, dtype=torch.float16,
                           index_dtype=torch.int32 if k == 24 else torch.int64)
    labels = make_labels(shape[:-1], vocab, seed=seed, device=device) if label_mode == "ignore" else None
    check_against_oracle(backend, student, lp, ids, labels, seed=seed, temperature=2.0, soft_weight=0.8,
                         hard_weight=hard_weight, reduction=reduction)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("temperature,scale_t2", [(1.0, True), (0.5, False), (3.0, True)])
def test_temperatures_and_weights(backend, temperature, scale_t2, seed):
    """T = 1 shares the softmax with the hard-label term; T != 1 gives that term its own."""
    device = backend_device(backend)
    student = make_logits((6, 517), device=device, seed=seed)
    lp, ids = make_sampled((6, 517), 20, temperature=temperature, seed=seed + 1, device=device)
    labels = make_labels((6,), 517, seed=seed, device=device)
    check_against_oracle(backend, student, lp, ids, labels, seed=seed, temperature=temperature, soft_weight=0.6,
                         hard_weight=0.4, scale_t2=scale_t2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", ("extreme", "neginf"))
def test_extreme_and_masked_logits(backend, kind, seed):
    """±1e4 student logits, or -inf student entries (masked tokens; the draws avoid them, a drawn token the
    student masks would be an infinite loss)."""
    device = backend_device(backend)
    student = make_logits((4, 333), device=device, seed=seed, kind=kind)
    lp, ids = make_sampled((4, 333), 16, seed=seed + 1, device=device)
    if kind == "neginf":
        finite = torch.isfinite(student).to(torch.int64)
        ids = torch.where(torch.isneginf(student.gather(-1, ids)), finite.argmax(-1, keepdim=True), ids)
    labels = make_labels((4,), 333, seed=seed, device=device)
    labels = torch.where(torch.isneginf(student.gather(1, labels.clamp(min=0)[:, None]))[:, 0], -100, labels)
    out, grad = check_against_oracle(backend, student, lp, ids, labels, seed=seed, hard_weight=0.3,
                                     reduction="none")
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()


# V = 3, T = 1, student z = [0, ln 2, 0]: q = (1/4, 1/2, 1/4). Draws (1, 1, 2) with teacher p = (0.2, 0.5, 0.3).
HAND_Z = [0.0, math.log(2.0), 0.0]
HAND_IDS = [1, 2, 1]
HAND_LP = [math.log(0.5), math.log(0.3), math.log(0.5)]
# loss = mean_j (log p(x_j) - log q(x_j)) = (2 ln(0.5 / 0.5) + ln(0.3 / 0.25)) / 3;
# grad = q - p_hat with p_hat = (0, 2/3, 1/3)
HAND_LOSS = math.log(0.3 / 0.25) / 3
HAND_GRAD = [0.25, 0.5 - 2 / 3, 0.25 - 1 / 3]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_hand_computed(backend):
    device = backend_device(backend)
    z = torch.tensor([HAND_Z], device=device, requires_grad=True)
    loss = sampled_distill_loss(z, torch.tensor([HAND_LP], device=device), torch.tensor([HAND_IDS], device=device),
                                backend=backend)
    loss.backward()
    assert abs(loss.item() - HAND_LOSS) < 2e-6
    torch.testing.assert_close(z.grad, torch.tensor([HAND_GRAD], device=device), rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dtypes_of_logprobs_and_ids(backend, seed):
    """fp16 / bf16 / fp32 / fp64 log-probs (fp64 read as fp32 by the kernels; the reference computes in fp64
    then), int32 / int64 ids."""
    device = backend_device(backend)
    student = make_logits((5, 299), device=device, seed=seed)
    lp_dtypes = (torch.float16, torch.bfloat16) + ((torch.float64,) if backend != "reference" else ())
    for lpdt, idt in zip(lp_dtypes, (torch.int32, torch.int64, torch.int32)):
        lp, ids = make_sampled((5, 299), 9, temperature=2.0, seed=seed + 1, device=device, dtype=lpdt,
                               index_dtype=idt)
        check_against_oracle(backend, student, lp, ids, seed=seed, temperature=2.0, reduction="sum")


@pytest.mark.parametrize("V,dtype,k", [(1271, torch.bfloat16, 24), (8200, torch.float32, 100)])
def test_triton_kernel_gpu_config(V, dtype, k, seed):
    """The launcher with interpret=False: the BLOCK_V a GPU runs (2048 / 8192, a masked tail), as
    tests/test_triton_gpu_config.py does for the other loss kernels."""
    from fastdistill.kernels.distill_loss import pick_block_v
    from fastdistill.kernels.sampled_distill_loss import sampled_distill_loss_triton_launch

    device = backend_device("triton")
    assert pick_block_v(V, interpret=False) > 1024
    T, hard = 2.0, 0.3
    student = make_logits((3, V), dtype=dtype, seed=seed, device=device)
    lp, ids = make_sampled((3, V), k, temperature=T, seed=seed + 1, dtype=torch.float16, device=device)
    labels = make_labels((3,), V, seed=seed, device=device)
    labels[0] = -100
    loss = torch.full((3,), math.nan, device=device)
    grad = torch.full_like(student, math.nan)
    sampled_distill_loss_triton_launch(student, lp, ids, labels, torch.ones(1, device=device), loss, grad,
                                       inv_t=1 / T, soft_coef=T * T, grad_coef=T, hard_weight=hard, ignore_index=-100,
                                       interpret=False)
    s64 = student.detach().double().requires_grad_(True)
    oracle = sampled_distill_loss_ref(s64, lp.double(), ids, labels, temperature=T, hard_weight=hard, reduction="none")
    (grad64,) = torch.autograd.grad(oracle.sum(), s64)
    s_low = student.detach().requires_grad_(True)
    ref = sampled_distill_loss_ref(s_low, lp, ids, labels, temperature=T, hard_weight=hard, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), s_low)
    assert_close_to_oracle(loss, oracle, ref.float(), msg="loss")
    roundings = 2 if dtype == torch.bfloat16 and device == "cpu" else 1  # the interpreter truncates to bf16
    assert_close_to_oracle(grad, grad64, ref_grad, roundings=roundings, msg="grad")
    assert torch.all(grad[0] == 0) and loss[0] == 0


# Compiled Triton rejects code the interpreter accepts: compile the kernel for sm_90 (everything on, and loss
# only) and sm_80 (the default training call: no labels, gradient written) without a GPU, in a subprocess
# (this session imported triton in interpreter mode).
COMPILE_SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastdistill.kernels import sampled_distill_loss as kernels

types = dict(S="*bf16", s_stride="i64", LP="*fp16", lp_stride="i64", IDX="*i32", idx_stride="i64", L="*i64",
             SCALE="*fp32", LOSS="*fp32", G="*bf16", V="i32", K="i32", inv_t="fp32", soft_coef="fp32",
             grad_coef="fp32", hard_weight="fp32", ignore_index="i64")
fn = kernels._sampled_distill_loss_kernel
results = []
variants = ((90, True, True, True), (90, True, True, False), (80, False, False, True))
for cc, labels, ce_own, write in variants:
    const = dict(HAS_LABELS=labels, CE=labels, CE_OWN=ce_own, WRITE=write, BLOCK_V=8192, BLOCK_K=64)
    sig = {p.name: "constexpr" if p.is_constexpr else types[p.name] for p in fn.params}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in const.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=16)).asm["ptx"]
    results.append({"cc": cc, "write": write, "target": f".target sm_{cc}" in ptx, "stores": ptx.count("st.global"),
                    "atomics": "atom." in ptx, "barrier": "bar.sync" in ptx or "barrier.sync" in ptx})
print(json.dumps(results))
"""


@pytest.mark.slow  # ~15 s of Triton compiles
def test_triton_kernel_compiles_for_sm80_and_sm90():
    import json
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower():
        pytest.skip("triton's bundled ptxas is unavailable here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 3 and all(r["target"] and not r["atomics"] for r in results), results
    assert all(r["barrier"] for r in results if r["write"]), results  # the sweep's stores land before the draws'
    assert all(r["stores"] > results[1]["stores"] for r in results if r["write"]), results
