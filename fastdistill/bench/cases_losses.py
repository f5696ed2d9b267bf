"""Benchmark cases of the distillation losses: distill_loss (one case per divergence), fused_linear_distill_loss
and topk_distill_loss, each timed forward + backward ("full": what a training step runs)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdistill.bench.cases import (DTYPES, Case, backend_of, baseline_providers, fastdistill_providers, installed,
                                     maybe_compile, unknown)

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "mse")
LIGER_DIVERGENCES = ("kl", "reverse_kl", "jsd")  # LigerJSD's beta covers these
LIGER_BETA = {"kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}
# rows x vocab (and the hidden sizes of the fused head) per shape set: "small" keeps a CPU run short,
# "llm" is the GPU target of the loss issues (8192 tokens x Llama-3's 128256 vocabulary in bf16).
LOSS_SHAPES = {"small": dict(rows=256, vocab=8192, dtype="float32"),
               "llm": dict(rows=8192, vocab=128256, dtype="bfloat16"),
               "tiny": dict(rows=16, vocab=256, dtype="float32")}
FUSED_SHAPES = {"small": dict(tokens=256, h_s=256, h_t=256, vocab=8192, dtype="float32"),
                "llm": dict(tokens=8192, h_s=2048, h_t=4096, vocab=128256, dtype="bfloat16"),
                "tiny": dict(tokens=16, h_s=32, h_t=48, vocab=256, dtype="float32")}
TOPK = 64


def _elem(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def _randn(gen, shape, dtype: str, device: str, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=DTYPES[dtype])


def _train_step(fn, args, leaves, mode: str):
    """One forward (+ backward for "full"); the gradients are dropped after each call so that every call
    allocates its own (they count in the peak memory) and nothing is held between calls."""
    def step():
        loss = fn(*args)
        if mode == "full":
            loss.backward()
            for t in leaves:
                t.grad = None
        return loss
    return step


def _liger(device: str, divergence: str) -> list[str]:
    ok = device == "cuda" and divergence in LIGER_DIVERGENCES and installed("liger_kernel")
    return ["liger-jsd"] if ok else []


def build_distill_loss(p: dict, provider: str, device: str):
    from fastdistill import distill_loss
    from fastdistill.reference import distill_loss_ref

    gen = torch.Generator().manual_seed(0)
    shape = (p["rows"], p["vocab"])
    student = _randn(gen, shape, p["dtype"], device, 3.0).requires_grad_(True)
    teacher = _randn(gen, shape, p["dtype"], device, 3.0)
    T, div = p["temperature"], p["divergence"]
    if provider in ("eager", "compile"):
        fn = maybe_compile(provider, lambda s, t: distill_loss_ref(s, t, divergence=div, temperature=T))
    elif provider == "torch-kl_div":  # the formula users write for kl
        def fn(s, t):
            return F.kl_div(F.log_softmax(s.float() / T, -1), F.softmax(t.float() / T, -1),
                            reduction="batchmean") * T * T
    elif provider.startswith("fastdistill-"):
        backend = backend_of(provider)

        def fn(s, t):
            return distill_loss(s, t, divergence=div, temperature=T, backend=backend)
    elif provider == "liger-jsd":
        from liger_kernel.transformers import LigerJSD

        jsd = LigerJSD(beta=LIGER_BETA[div])

        def fn(s, t):
            return jsd(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)) * T * T
    else:
        raise unknown("distill_loss", provider)
    return _train_step(fn, (student, teacher), [student], p["mode"])


def distill_loss_cases(device: str, shapes: str) -> list[Case]:
    s = LOSS_SHAPES[shapes]
    out = []
    for div in DIVERGENCES:
        peers = (["torch-kl_div"] if div == "kl" else []) + _liger(device, div)
        providers = fastdistill_providers("distill_loss", device, DTYPES[s["dtype"]]) + baseline_providers(*peers)
        params = dict(s, divergence=div, temperature=2.0, mode="full")
        out.append(Case("distill_loss", f"{div} {s['rows']}x{s['vocab']} {s['dtype']} fwd+bwd", params,
                        tuple(providers), build_distill_loss,
                        bytes=3 * s["rows"] * s["vocab"] * _elem(s["dtype"])))  # read both, write the gradient
    return out


def build_fused_linear(p: dict, provider: str, device: str):
    from fastdistill import fused_linear_distill_loss
    from fastdistill.reference import fused_linear_distill_loss_ref

    gen = torch.Generator().manual_seed(0)
    n, h_s, h_t, v, dt = p["tokens"], p["h_s"], p["h_t"], p["vocab"], p["dtype"]
    hs, ht = _randn(gen, (n, h_s), dt, device).requires_grad_(True), _randn(gen, (n, h_t), dt, device)
    ws = _randn(gen, (v, h_s), dt, device, 3 * h_s ** -0.5).requires_grad_(True)
    wt = _randn(gen, (v, h_t), dt, device, 3 * h_t ** -0.5)
    T, div = p["temperature"], p["divergence"]
    if provider in ("eager", "compile"):  # both heads' logits in the inputs' dtype, as the models' lm_head
        fn = maybe_compile(provider, lambda a, b, c, d: fused_linear_distill_loss_ref(
            a, b, c, d, dtype=a.dtype, divergence=div, temperature=T))
    elif provider.startswith("fastdistill-"):
        backend = backend_of(provider)

        def fn(a, b, c, d):
            return fused_linear_distill_loss(a, b, c, d, divergence=div, temperature=T, backend=backend)
    elif provider == "liger-fused-linear-jsd":
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=LIGER_BETA[div], temperature=T)
        fn = jsd
    else:
        raise unknown("fused_linear_distill_loss", provider)
    return _train_step(fn, (hs, ws, ht, wt), [hs, ws], p["mode"])


def fused_linear_cases(device: str, shapes: str) -> list[Case]:
    s = FUSED_SHAPES[shapes]
    peers = ["liger-fused-linear-jsd"] if _liger(device, "kl") else []
    providers = fastdistill_providers("fused_linear_distill_loss", device, DTYPES[s["dtype"]])
    params = dict(s, divergence="kl", temperature=1.0, mode="full")
    n, v = s["tokens"], s["vocab"]
    flops = 2 * n * v * (s["h_s"] + s["h_t"]) + 2 * 2 * n * v * s["h_s"]  # both heads + the student's dh, dW
    name = f"kl {n} tokens H {s['h_s']}/{s['h_t']} V {v} {s['dtype']} fwd+bwd"
    return [Case("fused_linear_distill_loss", name, params, tuple(providers + baseline_providers(*peers)),
                 build_fused_linear, flops=flops)]


def build_topk(p: dict, provider: str, device: str):
    from fastdistill import topk_distill_loss
    from fastdistill.reference import topk_distill_loss_ref

    gen = torch.Generator().manual_seed(0)
    shape = (p["rows"], p["vocab"])
    student = _randn(gen, shape, p["dtype"], device, 3.0).requires_grad_(True)
    teacher = _randn(gen, shape, "float32", device, 3.0)
    T, div, tail = p["temperature"], p["divergence"], p["tail"]
    lp, ids = torch.log_softmax(teacher / T, -1).topk(p["k"], -1)
    lp = lp.to(DTYPES[p["lp_dtype"]])  # a teacher cache stores fp16 log-probs
    del teacher
    if provider in ("eager", "compile"):
        fn = maybe_compile(provider, lambda s, a, b: topk_distill_loss_ref(s, a, b, tail=tail, divergence=div,
                                                                           temperature=T))
    elif provider.startswith("fastdistill-"):
        backend = backend_of(provider)

        def fn(s, a, b):
            return topk_distill_loss(s, a, b, tail=tail, divergence=div, temperature=T, backend=backend)
    else:
        raise unknown("topk_distill_loss", provider)
    return _train_step(fn, (student, lp, ids), [student], p["mode"])


def topk_cases(device: str, shapes: str) -> list[Case]:
    s = LOSS_SHAPES[shapes]
    providers = fastdistill_providers("topk_distill_loss", device, DTYPES[s["dtype"]]) + baseline_providers()
    params = dict(s, k=TOPK, lp_dtype="float16", tail="renormalize", divergence="kl", temperature=2.0, mode="full")
    r, v = s["rows"], s["vocab"]
    nbytes = 2 * r * v * _elem(s["dtype"]) + r * TOPK * (2 + 8)  # student + gradient, fp16 log-probs + int64 ids
    return [Case("topk_distill_loss", f"kl k={TOPK} {r}x{v} {s['dtype']} fwd+bwd", params, tuple(providers),
                 build_topk, bytes=nbytes)]


CASES = {"distill_loss": distill_loss_cases, "fused_linear_distill_loss": fused_linear_cases,
         "topk_distill_loss": topk_cases}
