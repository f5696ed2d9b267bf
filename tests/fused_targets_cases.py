"""Shared helpers of the fused linear top-k / sampled loss tests: problems and the float64 oracle check."""
from __future__ import annotations

import os

import torch

from fastdistill.cache.sampling import sample_teacher_targets
from fastdistill.ops.fused_linear_sampled_distill_loss import fused_linear_sampled_distill_loss
from fastdistill.ops.fused_linear_topk_distill_loss import fused_linear_topk_distill_loss
from fastdistill.reference.fused_linear_topk_distill_loss import fused_linear_targets_loss_ref
from fastdistill.testing import assert_close_to_oracle, reduced_reference
from topk_cases import make_topk

LOSSES = {"topk": fused_linear_topk_distill_loss, "sampled": fused_linear_sampled_distill_loss}
HEAD = ("student_hidden", "student_weight", "student_bias")


def make_problem(seed, *, n=19, h=12, v=131, k=8, kind="topk", temperature=1.0, dtype=torch.float32, bias=True,
                 device="cpu"):
    """Hidden states, head and the teacher's targets (top-k shuffled within rows, or k sorted draws with
    duplicates). Scales keep logits O(3) so every divergence is exercised."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    p = dict(student_hidden=rand(n, h), student_weight=rand(v, h, scale=h ** -0.5 * 3),
             student_bias=rand(v) if bias else None)
    if kind == "topk":
        lp, ids = make_topk((n, v), k, temperature=temperature, seed=seed + 5, device=device)
    else:
        teacher = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
        lp, ids = sample_teacher_targets(teacher, k, temperature, generator=torch.Generator().manual_seed(seed))
        lp, ids = lp.to(device), ids.to(device)
    return p, lp, ids


def check(kind, backend, p, lp, ids, labels=None, *, seed=0, grads=HEAD, **options):
    """Loss and gradients of `backend` vs the float64 oracle (the unfused reference loss on materialized
    float64 logits), judged by the same computation in the inputs' dtype."""
    reduction = options.get("reduction", "batchmean")
    grads = [k for k in grads if p.get(k) is not None]
    inputs = {k: (v.detach().requires_grad_(k in grads) if v is not None else None) for k, v in p.items()}
    out = LOSSES[kind](inputs["student_hidden"], inputs["student_weight"], lp, ids,
                       student_bias=inputs["student_bias"], labels=labels, backend=backend, **options)
    assert out.dtype == torch.float32
    g = torch.Generator().manual_seed(seed + 3)
    upstream = torch.ones(out.shape, dtype=torch.float64) if reduction == "batchmean" else (
        torch.rand(out.shape, generator=g, dtype=torch.float64) + 0.5)
    upstream = upstream.to(out.device)
    actual = torch.autograd.grad(out, [inputs[k] for k in grads], upstream.float()) if grads else ()

    ref_options = {k: v for k, v in options.items() if k != "chunk_size"}

    def ref(x, dtype=None, **changes):
        return fused_linear_targets_loss_ref(kind, x["student_hidden"], x["student_weight"],
                                             lp.double() if dtype is None else lp, ids,
                                             student_bias=x["student_bias"], labels=labels, dtype=dtype,
                                             **{**ref_options, **changes})
    x64 = {k: (v.detach().double().requires_grad_(k in grads) if v is not None else None) for k, v in p.items()}
    oracle = ref(x64)
    oracle_grads = torch.autograd.grad(oracle, [x64[k] for k in grads], upstream) if grads else ()
    low = {k: (v.detach().requires_grad_(k in grads) if v is not None else None) for k, v in p.items()}
    dtype = p["student_hidden"].dtype
    judge = ref(low, dtype)
    judge_grads = torch.autograd.grad(judge, [low[k] for k in grads], upstream.to(judge.dtype)) if grads else ()

    tag = f"{kind} {backend} {options} {dtype} seed={seed}"
    judge = judge.float()
    if reduction != "none":
        judge = reduced_reference(ref(p, dtype, reduction="none").float(), ref(x64, reduction="none").detach(),
                                  oracle, labels=labels, reduction=reduction, num_items=options.get("num_items"))
    assert_close_to_oracle(out, oracle, judge, msg=f"loss {tag}")
    roundings = 1 if reduction == "batchmean" or dtype == torch.float32 else 2
    if backend == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        roundings += 1  # the interpreter truncates fp32 -> bf16 casts
    for name, a, o, r in zip(grads, actual, oracle_grads, judge_grads):
        assert a.dtype == p[name].dtype and a.shape == p[name].shape, name
        assert_close_to_oracle(a, o, r, roundings=roundings, msg=f"d/d{name} {tag}")
    return out, actual
