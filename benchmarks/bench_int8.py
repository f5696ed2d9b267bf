"""Benchmark of the int8 layers: W8A8 (Int8Linear forward = quantize + int8 GEMM + epilogue) and W8A16.

Providers, side by side in one run (forward only, each in its own subprocess):
  CPU: fp32 F.linear, torch.ao quantize_dynamic (fbgemm / onednn W8A8), fastdistill-cpu (Int8Linear: the packed
  CPU kernels); x_quantize_dynamic = time / quantize_dynamic's, sqnr_db = SQNR of the output vs the fp32 linear.
  Plus the demo student (`make demo`: MLP 64-128-128-10, SmoothQuant W8A8, batch 256) as mode "demo-mlp".
  GPU: fp32 / bf16 F.linear; torch._int_mm alone on pre-quantized int8 inputs (the raw GEMM) and with a separate
  dequantization (acc.float() * x_scale * w_scale + bias); the triton and cuda backends.
  torchao's int8 configs when installed.

    python benchmarks/bench_int8.py                    # CPU: W8A8 M = 1, 16, 512, W8A16 M = 1..512 at 4096^2
    python benchmarks/bench_int8.py --device cuda      # GPU: W8A8 8192^3, W8A16 M = 1..16 at 8192 x 8192
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


DEMO_HIDDEN = [128, 128]  # fastdistill.pipeline.config: student_hidden; digits: 64 features, 10 classes


def providers(device: str, mode: str) -> list[str]:
    if device == "cpu":  # torch._int_mm / bf16 take seconds a call on CPUs without VNNI/AMX/AVX512-BF16
        return ["fp32-linear", "quantize_dynamic", "fastdistill-cpu"]
    out = ["fp32-linear", "bf16-linear"]
    if mode == "w8a8":
        out += ["int_mm-raw", "int_mm+dequant"]
    try:
        import torchao  # noqa: F401
        out.append("torchao")
    except ImportError:
        pass
    backends = ["cpu"] if device == "cpu" else ["triton", "cuda"]
    return out + [f"fastdistill-{b}" for b in backends]


def build(provider: str, mode: str, M: int, K: int, N: int, device: str):
    """(function of no arguments to time, description)."""
    from fastdistill.quant import Int8Linear, quantize_per_token
    from fastdistill.reference.int8_linear import quantize_weight_ref

    if mode == "demo-mlp":
        return build_demo(provider, M, K)
    torch.manual_seed(0)  # the same layer in every worker (sqnr_db compares with the fp32 linear's output)
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(K, N).to(device)
    x32 = torch.randn(M, K, generator=g).to(device)
    act = torch.bfloat16 if device == "cuda" else torch.float32  # activation dtype of the int8 layers
    x = x32.to(act)
    if provider in ("fp32-linear", "bf16-linear"):
        dt = torch.float32 if provider == "fp32-linear" else torch.bfloat16
        w, b, xx = lin.weight.detach().to(dt), lin.bias.detach().to(dt), x32.to(dt)
        return lambda: F.linear(xx, w, b)
    if provider in ("int_mm-raw", "int_mm+dequant"):
        q, s = (t.to(device) for t in quantize_weight_ref(lin.weight.detach().cpu()))
        wt = q.t()
        xq, xs = quantize_per_token(x, backend="reference")
        b = lin.bias.detach()
        if provider == "int_mm-raw":
            return lambda: torch._int_mm(xq, wt)
        return lambda: (torch._int_mm(xq, wt).float() * xs[:, None] * s + b).to(act)
    if provider == "quantize_dynamic":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, torch.qint8)
        return lambda: qm(x32)
    if provider == "torchao":
        from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                          quantize_)
        model = torch.nn.Sequential(lin).to(act)
        quantize_(model, Int8DynamicActivationInt8WeightConfig() if mode == "w8a8" else Int8WeightOnlyConfig())
        return lambda: model(x)
    if provider.startswith("fastdistill-"):
        layer = Int8Linear.from_linear(lin, mode, backend=provider.split("-", 1)[1])
        return lambda: layer(x)
    raise ValueError(f"unknown provider {provider}")


def build_demo(provider: str, M: int, K: int):
    """The demo's student MLP (float, quantize_dynamic, or SmoothQuant W8A8 Int8Linear as the pipeline freezes it)."""
    from fastdistill import quant
    from fastdistill.pipeline.data import make_mlp

    model = make_mlp(K, DEMO_HIDDEN, 10, 0).eval()
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(0))
    if provider == "quantize_dynamic":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, torch.qint8)
    elif provider.startswith("fastdistill-"):
        smooth = quant.calibrate(model, [x], smooth_alpha=0.5)
        quant.quantize_(model, "w8a8", smooth=smooth, trainable=True, backend=provider.split("-", 1)[1])
        quant.freeze_(model)
    return lambda: model(x)


def worker(spec: dict) -> dict:
    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    with torch.no_grad():
        fn = build(spec["provider"], spec["mode"], spec["M"], spec["K"], spec["N"], device)
        for _ in range(2):  # compile / autotune / first touch
            out = fn()
        if spec.get("part") == "time":  # alone: PeakMemory's sampling thread would share the 2 cores
            return harness.summarize(harness.time_it(lambda _: fn(), device=device, warmup=1, reps=spec["reps"]))
        with harness.PeakMemory(device) as peak:
            harness.time_it(lambda _: fn(), device=device, warmup=0, reps=min(spec["reps"], 5))
        from fastdistill.testing import sqnr
        ref = build("fp32-linear", spec["mode"], spec["M"], spec["K"], spec["N"], device)()
    db = sqnr(out.float(), ref.float()) if out.is_floating_point() else None  # int_mm-raw: int32 sums
    return {"peak_mem_mb": peak.extra / 2**20, "sqnr_db": db}


def _ratios(results: list[dict]) -> None:
    for row in results:
        if "median_ms" not in row:
            continue
        same = {r["provider"]: r for r in results if (r["mode"], r["M"]) == (row["mode"], row["M"])}
        for ref in ("fp32-linear", "bf16-linear", "int_mm-raw", "int_mm+dequant", "quantize_dynamic"):
            if "median_ms" in same.get(ref, {}):
                row[f"x_{ref}"] = row["median_ms"] / same[ref]["median_ms"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", nargs="+", default=["w8a8", "w8a16", "demo-mlp"],
                   choices=["w8a8", "w8a16", "demo-mlp"])
    p.add_argument("--providers", nargs="+", help="subset of providers to run")
    p.add_argument("--reps", type=int)
    p.add_argument("--threads", type=int, help="CPU threads per worker (default: torch's)")
    p.add_argument("--out", help="CSV name under benchmarks/results (default int8_<device>)")
    p.add_argument("--csv-dir", help="also write the CSV here")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    gpu = args.device == "cuda"
    size = 8192 if gpu else 4096
    cases = {"w8a8": [(8192, size, size)] if gpu else [(m, size, size) for m in (1, 16, 512)],
             "w8a16": [(m, size, size) for m in ((1, 2, 4, 8, 16) if gpu else (1, 2, 4, 8, 16, 64, 512))],
             "demo-mlp": [(256, 64, 10)]}
    reps = args.reps or (20 if gpu else 5)
    env = harness.environment(args.device)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | threads {args.threads or 'default'}",
          flush=True)
    results = []
    for mode in args.modes:
        if mode == "demo-mlp" and gpu:  # the demo's figure is CPU latency
            continue
        for M, K, N in cases[mode]:
            for provider in args.providers or providers(args.device, mode):
                slow = provider.startswith("int_mm") and not gpu  # ~10 s a call on CPUs without VNNI/AMX
                fast = not gpu and (M <= 16 or mode == "demo-mlp")  # sub-ms calls: more reps for a stable median
                spec = dict(provider=provider, mode=mode, M=M, K=K, N=N, device=args.device,
                            reps=min(reps, 2) if slow else reps * 20 if fast else reps, threads=args.threads)
                # two workers: timing with glibc's heap as users run it, memory with exact RSS (harness._run_json)
                r = harness.run_worker(__file__, {**spec, "part": "time"}, exact_rss=False)
                r = {**r, **harness.run_worker(__file__, {**spec, "part": "memory"})}
                results.append({**env, "op": "int8_linear", "mode": mode, "M": M, "K": K, "N": N,
                                "threads": args.threads or torch.get_num_threads(), "provider": provider, **r})
                print(f"  {mode} M={M:5d} {provider:>18}: {harness.describe(r)}", flush=True)
    _ratios(results)
    harness.finish(args.out or f"int8_{args.device}", results, args.csv_dir,
                   ["mode", "M", "provider", "median_ms", "peak_mem_mb", "sqnr_db", "x_fp32-linear", "x_bf16-linear",
                    "x_int_mm-raw", "x_quantize_dynamic"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
