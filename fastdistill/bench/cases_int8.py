"""Benchmark cases of the int8 ops (forward, inference): int8_linear as the W8A8 layer runs it (Int8Linear:
quantize the activations per token + int8 GEMM + epilogue), int8_weight_only_linear (W8A16, Int8Linear
"w8a16") and quantize_per_token.

Peers: the float F.linear the layer replaces; on CPU torch.ao's quantize_dynamic (fbgemm / oneDNN W8A8) and
torch._weight_int8pack_mm (W8A16); torch._int_mm with per-token quantization and dequantization around it
(W8A8, CPU and CUDA); torchao's int8 configs on CUDA when installed."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from fastdistill.bench.cases import (DTYPES, Case, backend_of, baseline_providers, fastdistill_providers,
                                     installed, maybe_compile, unknown)

W8A8_SHAPES = {"small": [dict(M=64, N=1024, K=1024, dtype="float32")],
               "llm": [dict(M=8192, N=8192, K=8192, dtype="bfloat16")],
               "tiny": [dict(M=8, N=32, K=64, dtype="float32")]}
W8A16_SHAPES = {"small": [dict(M=1, N=1024, K=1024, dtype="float32"), dict(M=64, N=1024, K=1024, dtype="float32")],
                "llm": [dict(M=16, N=8192, K=8192, dtype="bfloat16"), dict(M=4096, N=8192, K=8192, dtype="bfloat16")],
                "tiny": [dict(M=1, N=32, K=64, dtype="float32"), dict(M=8, N=32, K=64, dtype="float32")]}
QUANT_SHAPES = {"small": dict(rows=256, K=4096, dtype="float32"), "llm": dict(rows=8192, K=8192, dtype="bfloat16"),
                "tiny": dict(rows=16, K=64, dtype="float32")}


def _layer(p: dict, device: str):
    """(x in the activation dtype, the float nn.Linear), the same in every provider's process."""
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(p["K"], p["N"])
    with torch.no_grad():
        lin.weight.copy_(torch.randn(p["N"], p["K"], generator=gen) * p["K"] ** -0.5)
        lin.bias.copy_(torch.randn(p["N"], generator=gen) * 0.1)
    x = torch.randn(p["M"], p["K"], generator=gen).to(device=device, dtype=DTYPES[p["dtype"]])
    return x, lin.to(device)


def _inference(fn):
    def step():
        with torch.no_grad():
            return fn()
    return step


def _peer_float(provider: str, lin, x):
    """torch-linear: the float layer in the activation dtype; torchao-*: torchao's int8 config of it."""
    if provider == "torch-linear":
        w, b = lin.weight.detach().to(x.dtype), lin.bias.detach().to(x.dtype)
        return lambda: F.linear(x, w, b)
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    model = torch.nn.Sequential(lin).to(x.dtype)
    quantize_(model, Int8DynamicActivationInt8WeightConfig() if provider == "torchao-w8a8" else Int8WeightOnlyConfig())
    return lambda: model(x)


def build_int8_linear(p: dict, provider: str, device: str):
    from fastdistill.nn import Int8Linear
    from fastdistill.reference.int8_linear import int8_linear_ref, quantize_per_token_ref, quantize_weight_ref

    x, lin = _layer(p, device)
    if provider in ("torch-linear", "torchao-w8a8"):
        return _inference(_peer_float(provider, lin, x))
    if provider == "torch-quantize_dynamic":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice
            qm = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, torch.qint8)
        return _inference(lambda: qm(x))
    if provider.startswith("fastdistill-"):
        layer = Int8Linear.from_linear(lin, "w8a8", backend=backend_of(provider)).eval()
        return _inference(lambda: layer(x))
    wq, ws = quantize_weight_ref(lin.weight)
    bias = lin.bias.detach().float()
    if provider in ("eager", "compile"):
        def ref(a):
            aq, s = quantize_per_token_ref(a)
            return int8_linear_ref(aq, s, wq, ws, bias, a.dtype)
        fn = maybe_compile(provider, ref)
        return _inference(lambda: fn(x))
    if provider == "torch-int_mm":  # the raw int8 GEMM with the quantization a user writes around it
        wt = wq.t()

        def int_mm():
            aq, s = quantize_per_token_ref(x)
            return (torch._int_mm(aq, wt).float() * s[:, None] * ws + bias).to(x.dtype)
        return _inference(int_mm)
    raise unknown("int8_linear", provider)


def int8_linear_cases(device: str, shapes: str) -> list[Case]:
    out = []
    for s in W8A8_SHAPES[shapes]:
        peers = ["torch-linear", "torch-int_mm"]
        peers += ["torch-quantize_dynamic"] if device == "cpu" else ["torchao-w8a8"] if installed("torchao") else []
        providers = fastdistill_providers("int8_linear", device, DTYPES[s["dtype"]],
                                          extra=("auto",) if device == "cuda" else ())
        out.append(Case("int8_linear", f"W8A8 layer M {s['M']} N {s['N']} K {s['K']} {s['dtype']}",
                        dict(s, mode="fwd"), tuple(providers + baseline_providers(*peers)), build_int8_linear,
                        flops=2 * s["M"] * s["N"] * s["K"]))
    return out


def build_w8a16(p: dict, provider: str, device: str):
    from fastdistill.nn import Int8Linear
    from fastdistill.reference.int8_linear import int8_weight_only_linear_ref, quantize_weight_ref

    x, lin = _layer(p, device)
    if provider in ("torch-linear", "torchao-w8a16"):
        return _inference(_peer_float(provider, lin, x))
    if provider.startswith("fastdistill-"):
        layer = Int8Linear.from_linear(lin, "w8a16", backend=backend_of(provider)).eval()
        return _inference(lambda: layer(x))
    wq, ws = quantize_weight_ref(lin.weight)
    bias = lin.bias.detach().float()
    if provider in ("eager", "compile"):
        fn = maybe_compile(provider, lambda a: int8_weight_only_linear_ref(a, wq, ws, bias))
        return _inference(lambda: fn(x))
    if provider == "torch-int8pack_mm":  # PyTorch's own W8A16 CPU kernel (per-channel scales)
        scales, b = ws.to(x.dtype), bias.to(x.dtype)
        return _inference(lambda: torch._weight_int8pack_mm(x, wq, scales) + b)
    raise unknown("int8_weight_only_linear", provider)


def w8a16_cases(device: str, shapes: str) -> list[Case]:
    out = []
    for s in W8A16_SHAPES[shapes]:
        peers = ["torch-linear"]
        peers += ["torch-int8pack_mm"] if device == "cpu" else ["torchao-w8a16"] if installed("torchao") else []
        providers = fastdistill_providers("int8_weight_only_linear", device, DTYPES[s["dtype"]],
                                          extra=("auto",) if device == "cuda" else ())
        M, N, K, e = s["M"], s["N"], s["K"], DTYPES[s["dtype"]].itemsize
        out.append(Case("int8_weight_only_linear", f"W8A16 layer M {M} N {N} K {K} {s['dtype']}",
                        dict(s, mode="fwd"), tuple(providers + baseline_providers(*peers)), build_w8a16,
                        bytes=N * K + 4 * N + (M * K + M * N) * e,  # int8 weights + scales, x and y
                        flops=2 * M * N * K))
    return out


def build_quantize(p: dict, provider: str, device: str):
    from fastdistill import quantize_per_token
    from fastdistill.reference.int8_linear import quantize_per_token_ref

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(p["rows"], p["K"], generator=gen).to(device=device, dtype=DTYPES[p["dtype"]])
    if provider in ("eager", "compile"):
        fn = maybe_compile(provider, quantize_per_token_ref)
    elif provider.startswith("fastdistill-"):
        backend = backend_of(provider)

        def fn(a):
            return quantize_per_token(a, backend=backend)
    else:
        raise unknown("quantize_per_token", provider)
    return _inference(lambda: fn(x))


def quantize_cases(device: str, shapes: str) -> list[Case]:
    s = QUANT_SHAPES[shapes]
    r, k = s["rows"], s["K"]
    providers = fastdistill_providers("quantize_per_token", device, DTYPES[s["dtype"]]) + baseline_providers()
    return [Case("quantize_per_token", f"{r}x{k} {s['dtype']}", dict(s, mode="fwd"), tuple(providers),
                 build_quantize, bytes=r * k * (DTYPES[s["dtype"]].itemsize + 1) + 4 * r)]  # read x, write q + scales


CASES = {"int8_linear": int8_linear_cases, "int8_weight_only_linear": w8a16_cases,
         "quantize_per_token": quantize_cases}
