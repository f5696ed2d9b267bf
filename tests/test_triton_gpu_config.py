"""The loss Triton kernels in the exact configuration a GPU runs, checked against the float64 reference.

The ops pass `interpret=interpreting()` to the launchers, and under TRITON_INTERPRET the launchers cap
BLOCK_V at 1024 to keep the interpreter fast; that cap is the only configuration switch of the loss
kernels (their intermediates are fp32 / fp64 on both, outputs in the student's dtype, no IEEE or
upcast switches). Here the launchers get `interpret=False`: the same BLOCK_V (2048 and 8192, several
blocks per row with a masked tail), BLOCK_K, num_warps and enable_fp_fusion as on a GPU, and bf16 /
fp16 inputs and bf16 gradients. What the interpreter cannot reproduce: num_warps and fp-fusion are
ignored by it, numpy's exp/log replace the GPU's approximate ones, and it truncates fp32 -> bf16
casts where a GPU rounds (one extra rounding allowed below); benchmarks/gpu_check.sh covers those.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastdistill.ops.loss_common import DIVERGENCE_CODES, resolve
from fastdistill.reference import distill_loss_ref
from fastdistill.reference.topk_distill_loss import topk_distill_loss_ref
from fastdistill.testing import assert_close_to_oracle, make_labels, make_logits

from conftest import HAS_CUDA, backend_device
from topk_cases import make_topk

pytest.importorskip("triton")
DEVICE = backend_device("triton")


def _kernel_options(divergence, temperature, hard_weight, beta=0.5, skew=0.1):
    """The launchers' keyword arguments as the ops derive them (fastdistill/ops/distill_loss.py)."""
    code, w, soft_weight = resolve(divergence, beta, skew, 1.0)
    mse = code == DIVERGENCE_CODES["mse"]
    coef = soft_weight * (1.0 if mse else temperature ** 2)
    return dict(divergence=code, inv_t=1.0 / temperature, w=w, log_w=math.log(w) if w > 0 else -math.inf,
                log_1mw=math.log1p(-w) if w < 1 else -math.inf, soft_coef=coef, grad_coef=coef / temperature,
                hard_weight=hard_weight, ignore_index=-100), mse, soft_weight


def _gpu_block_differs(V):
    from fastdistill.kernels.distill_loss import pick_block_v

    gpu, interpreted = pick_block_v(V, interpret=False), pick_block_v(V, interpret=True)
    if not HAS_CUDA:  # else this would test the interpreter's configuration again
        assert gpu != interpreted, (V, gpu, interpreted)
    return gpu


def _judge(loss, grad, rows_fn, student, tag, abs_floor=None):
    """loss / grad (scale 1: d(sum of rows)) vs the float64 oracle, judged by the reference in the
    outputs' precision (fp32 math on the same rounded inputs, as tests/distill_cases.py does)."""
    s64 = student.detach().double().requires_grad_(True)
    oracle = rows_fn(s64, torch.float64)
    (grad64,) = torch.autograd.grad(oracle.sum(), s64)
    s_low = student.detach().requires_grad_(True)
    ref = rows_fn(s_low, torch.float32)
    (ref_grad,) = torch.autograd.grad(ref.sum(), s_low)
    assert_close_to_oracle(loss, oracle, ref, abs_floor=abs_floor, msg=f"loss {tag}")
    assert grad.dtype == student.dtype
    roundings = 2 if grad.dtype == torch.bfloat16 and not HAS_CUDA else 1  # interpreter truncates to bf16
    assert_close_to_oracle(grad, grad64, ref_grad, roundings=roundings, msg=f"grad {tag}")


@pytest.mark.parametrize("V,dtype,divergence", [
    (1271, torch.bfloat16, "kl"), (1271, torch.bfloat16, "jsd"), (1271, torch.float16, "skew_reverse_kl"),
    (1271, torch.bfloat16, "mse"), (8200, torch.float32, "kl"),
])
def test_distill_loss_kernel_gpu_config(V, dtype, divergence, seed):
    from fastdistill.kernels.distill_loss import distill_loss_triton_launch

    _gpu_block_differs(V)
    T, hard = (2.0, 0.3) if V < 4096 else (1.0, 0.0)
    student = make_logits((3, V), dtype=dtype, seed=seed, device=DEVICE)
    teacher = make_logits((3, V), dtype=dtype, seed=seed + 1, device=DEVICE)
    labels = make_labels((3,), V, seed=seed, device=DEVICE)
    labels[0] = -100  # one ignored row at least
    opts, mse, soft_weight = _kernel_options(divergence, T, hard)
    if mse:
        opts["grad_coef"] = 2.0 * soft_weight / V
    loss = torch.full((3,), math.nan, device=DEVICE)
    grad = torch.full_like(student, math.nan)
    distill_loss_triton_launch(student, teacher, labels, torch.ones(1, device=DEVICE), loss, grad, **opts,
                               interpret=False)

    def rows(x, dt):
        return distill_loss_ref(x.to(dt), teacher.to(dt), labels, divergence=divergence, temperature=T,
                                hard_weight=hard, reduction="none")
    _judge(loss, grad, rows, student, f"distill_loss V={V} {dtype} {divergence}")
    assert torch.all(grad[0] == 0) and loss[0] == 0


@pytest.mark.parametrize("V,tail,divergence", [
    (1271, "renormalize", "kl"), (1271, "bucket", "jsd"), (8200, "bucket", "kl"),
])
def test_topk_kernel_gpu_config(V, tail, divergence, seed):
    from fastdistill.kernels.topk_distill_loss import topk_distill_loss_triton_launch

    _gpu_block_differs(V)
    T, hard, k = 2.0, 0.3, 16
    student = make_logits((3, V), dtype=torch.bfloat16, seed=seed, device=DEVICE)
    lp, ids = make_topk((3, V), k, temperature=T, seed=seed + 1, dtype=torch.float16, device=DEVICE)
    labels = make_labels((3,), V, seed=seed, device=DEVICE)
    labels[0] = -100
    opts, _, _ = _kernel_options(divergence, T, hard)
    loss = torch.full((3,), math.nan, device=DEVICE)
    grad = torch.full_like(student, math.nan)
    topk_distill_loss_triton_launch(student, lp, ids, labels, torch.ones(1, device=DEVICE), loss, grad,
                                    bucket=tail == "bucket", **opts, interpret=False)

    def rows(x, dt):
        return topk_distill_loss_ref(x.to(dt), lp.to(dt), ids, labels, tail=tail, divergence=divergence,
                                     temperature=T, hard_weight=hard, reduction="none")
    # abs_floor: the bucket tail's documented fp32 log q_rest error (tests/topk_cases.py)
    _judge(loss, grad, rows, student, f"topk V={V} {tail} {divergence}", abs_floor=1e-6 if tail == "bucket" else None)
    assert torch.all(grad[0] == 0) and loss[0] == 0
