"""Benchmark of the int8 CUDA kernels (the native ops fastdistill::*_cuda), side by side with PyTorch.

    python benchmarks/bench_int8_cuda_kernels.py --device cuda --csv-dir OUT

- quantize_per_token (M x K, bf16 -> int8 + scale): GB/s (bytes read + written) vs the eager PyTorch
  composition (amax, divide, multiply, round, clamp, cast).
- int8_linear_epilogue (M x N int32 -> bf16, scales + bias): GB/s vs the eager composition; and the
  whole W8A8 linear (quantize + torch._int_mm + epilogue) vs bf16 F.linear at the same shape.
- int8_weight_only_linear (W8A16) at M = 1, 8, 16 (and 64, 4096 for context), N = K = 8192, per channel and
  group_size 128, vs bf16 F.linear (cuBLAS): time, weight GB/s and the speedup; at M <= 16 also per call
  inside a CUDA graph of 20 calls (how a decode loop runs), which leaves out the per-launch gap.
Times are medians of triton.testing.do_bench (which flushes the L2 between repetitions), on random data.
Writes <csv-dir>/int8_cuda_kernels_<device>.csv with device, versions and date.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def timer(device: str, reps: int):
    if device == "cuda":
        from triton.testing import do_bench

        def bench(fn):
            fn()
            torch.cuda.synchronize()
            return do_bench(fn, warmup=25, rep=reps, return_mode="median")
        return bench

    def bench_cpu(fn):  # CPU: plain median of wall-clock times
        fn()
        times = []
        for _ in range(max(3, reps // 20)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return bench_cpu


def graph_ms(bench, fn, copies: int = 4, calls: int = 20) -> float:
    """Per-call time of `calls` launches of fn(i % copies) captured in one CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, handles)
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % copies)
    return bench(graph.replay) / calls


def quantize_eager(x):
    a = x.float().abs().amax(dim=1)
    inv = torch.where(a == 0, torch.zeros_like(a), 127.0 / a)
    q = torch.round(torch.clamp(x.float() * inv[:, None], -127, 127)).to(torch.int8)
    return q, a / 127.0


def epilogue_eager(acc, xs, ws, bias, dtype):
    return ((acc.float() * xs[:, None]) * ws[None, :] + bias.float()).to(dtype)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--csv-dir", default=harness.RESULTS)
    p.add_argument("--reps", type=int, default=100, help="do_bench repetition time in ms (CUDA)")
    p.add_argument("--n", type=int, default=8192, help="N = K of the GEMM shapes")
    p.add_argument("--m-list", type=int, nargs="+", default=[1, 8, 16, 64, 4096])
    args = p.parse_args()
    dev, n = args.device, args.n
    from fastdistill import _ext
    assert _ext.load_error() is None, _ext.load_error()  # importing fastdistill._C registers the ops
    ops = torch.ops.fastdistill
    sfx = "cuda" if dev == "cuda" else "cpu"
    quant, epi, w8a16 = (getattr(ops, f"{name}_{sfx}") for name in
                         ("quantize_per_token", "int8_linear_epilogue", "int8_weight_only_linear"))
    bench = timer(dev, args.reps)
    env = harness.environment(dev)
    rows = []

    def add(op, provider, shape, ms, nbytes=0.0, flops=0.0, vs=None):
        row = dict(env, op=op, provider=provider, shape=shape, ms=round(ms, 5),
                   gbps=round(nbytes / ms / 1e6, 1) if nbytes else "", tflops=round(flops / ms / 1e9, 1) if flops else "",
                   speedup_vs_torch=round(vs / ms, 3) if vs else "")
        rows.append(row)
        print(f"{op:22s} {provider:26s} {shape:20s} {ms:9.4f} ms {str(row['gbps']):>8s} GB/s "
              f"{str(row['tflops']):>7s} TFLOP/s  x{row['speedup_vs_torch']}", flush=True)

    g = torch.Generator(device=dev).manual_seed(0)
    bf = torch.bfloat16
    # quantize_per_token: read 2 B + write 1 B per element (+ 4 B per row).
    for m, k in ((n, n), (16, n), (4096, 4096 + 8)):
        x = torch.randn(m, k, device=dev, dtype=bf, generator=g)
        nbytes = 3 * m * k + 4 * m
        t_torch = bench(lambda: quantize_eager(x))
        add("quantize_per_token", "torch-eager", f"{m}x{k}", t_torch, nbytes)
        add("quantize_per_token", f"fastdistill-{sfx}", f"{m}x{k}", bench(lambda: quant(x)), nbytes, vs=t_torch)

    # epilogue: read 4 B, write 2 B per element.
    m = n
    acc = torch.randint(-2 ** 20, 2 ** 20, (m, n), device=dev, dtype=torch.int32, generator=g)
    xs = torch.rand(m, device=dev, generator=g) * 1e-3
    ws = torch.rand(n, device=dev, generator=g) * 1e-3
    bias = torch.randn(n, device=dev, dtype=bf, generator=g)
    t_torch = bench(lambda: epilogue_eager(acc, xs, ws, bias, bf))
    add("int8_linear_epilogue", "torch-eager", f"{m}x{n}", t_torch, 6 * m * n)
    add("int8_linear_epilogue", f"fastdistill-{sfx}", f"{m}x{n}", bench(lambda: epi(acc, xs, ws, bias, bf)),
        6 * m * n, vs=t_torch)
    del acc

    # W8A8 linear at M = N = K: quantize + _int_mm + epilogue vs bf16 F.linear.
    x = torch.randn(m, n, device=dev, dtype=bf, generator=g)
    w = torch.randn(n, n, device=dev, dtype=bf, generator=g)
    w8 = torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8, generator=g)
    w8t = w8.t()

    def w8a8():
        q, s = quant(x)
        return epi(torch._int_mm(q, w8t), s, ws, bias, bf)
    flops = 2 * m * n * n
    t_bf16 = bench(lambda: F.linear(x, w))
    add("w8a8_linear", "bf16 F.linear", f"{m}x{n}x{n}", t_bf16, flops=flops)
    xq = quant(x)[0]
    add("w8a8_linear", "torch._int_mm only", f"{m}x{n}x{n}", bench(lambda: torch._int_mm(xq, w8t)), flops=flops,
        vs=t_bf16)
    add("w8a8_linear", f"quant+_int_mm+epi-{sfx}", f"{m}x{n}x{n}", bench(w8a8), flops=flops, vs=t_bf16)

    # W8A16: weights stream once; GB/s counts the int8 weight bytes (bf16 F.linear reads twice as many).
    # "graph": 20 calls replayed from one CUDA graph (as a decode loop runs them), cycling through 4 weight
    # copies so that the L2 holds none; per-call medians of single launches include the launch gap.
    scale = torch.rand(n, device=dev, generator=g) * 1e-2
    gscale = torch.rand(n, n // 128, device=dev, generator=g) * 1e-2
    ws_bf16 = [w] + [torch.randn(n, n, device=dev, dtype=bf, generator=g) for _ in range(3)] if dev == "cuda" else []
    ws_int8 = [w8] + [w8.clone() for _ in range(3)] if dev == "cuda" else []
    for m in args.m_list:
        xm = torch.randn(m, n, device=dev, dtype=bf, generator=g)
        shape, flops = f"{m}x{n}x{n}", 2 * m * n * n
        cases = [("bf16 F.linear", 2 * n * n, lambda i: F.linear(xm, ws_bf16[i] if ws_bf16 else w)),
                 (f"fastdistill-{sfx} per-channel", n * n,
                  lambda i: w8a16(xm, ws_int8[i] if ws_int8 else w8, scale, None, 0)),
                 (f"fastdistill-{sfx} group 128", n * n,
                  lambda i: w8a16(xm, ws_int8[i] if ws_int8 else w8, gscale, None, 128))]
        modes = [("", lambda fn: bench(lambda: fn(0)))]
        if dev == "cuda" and m <= 16:
            modes.append((" (graph)", lambda fn: graph_ms(bench, fn)))
        for suffix, measure in modes:
            times = [measure(fn) for _, _, fn in cases]  # cases[0] (bf16) is the baseline
            for (provider, nbytes, _), ms in zip(cases, times):
                add("w8a16_linear", provider + suffix, shape, ms, nbytes=nbytes, flops=flops,
                    vs=times[0] if ms is not times[0] else None)

    path = harness.write_csv(f"int8_cuda_kernels_{dev}", rows, args.csv_dir)
    print("wrote", path)


if __name__ == "__main__":
    main()
