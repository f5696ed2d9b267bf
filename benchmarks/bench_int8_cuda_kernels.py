"""Benchmark of the int8 GPU routes, every candidate side by side with PyTorch per M (the data the auto routing
tables in fastdistill/ops/int8_linear.py and int8_weight_only_linear.py cite).

    python benchmarks/bench_int8_cuda_kernels.py --device cuda --csv-dir OUT        # ~60 s on an H200

- quantize_per_token (bf16 -> int8 + scale) and the W8A8 epilogue (int32 -> bf16): GB/s vs eager PyTorch.
- W8A8 at M = 16, 256 and N (N = K = 8192): bf16 F.linear; torch._int_mm alone; quantize + _int_mm + our
  CUDA epilogue (the cuda route, plus the epilogue pass alone: its share decides whether it must be fused);
  the Triton kernel (int8 tl.dot + fused epilogue) after quantize: its default tile, the persistent TMA
  kernel's first tile (sm_90+) and the tuned choice among all candidates;
  and the auto route (quantize_per_token + int8_linear).
- W8A16 (int8_weight_only_linear, per channel) at M = 1, 16, 64, 256, 1024, 4096, N = K = 8192: bf16 F.linear,
  the cuda kernel, the Triton kernel (default and with swapped operands), dense (dequantize pass + cuBLAS; the
  pass alone too) and auto; at
  M <= 16 also per call inside a CUDA graph of 20 calls (a decode loop), which leaves out the launch gap.
Ratios (speedup_vs_torch) are against bf16 F.linear at the same shape, measured in the same run. Times are
medians of triton.testing.do_bench on random data. Writes <csv-dir>/int8_cuda_kernels_<device>.csv.
--device cpu runs the same cases at a small --n as a smoke test (Triton cases skipped).
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
            return do_bench(fn, warmup=10, rep=reps, return_mode="median")
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
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, handles, Triton compiles)
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


class Recorder:
    def __init__(self, env):
        self.env, self.rows = env, []

    def add(self, op, provider, shape, ms, nbytes=0.0, flops=0.0, vs=None):
        row = dict(self.env, op=op, provider=provider, shape=shape, ms=round(ms, 5),
                   gbps=round(nbytes / ms / 1e6, 1) if nbytes else "",
                   tflops=round(flops / ms / 1e9, 1) if flops else "",
                   speedup_vs_torch=round(vs / ms, 3) if vs else "")
        self.rows.append(row)
        print(f"{op:20s} {provider:34s} {shape:16s} {ms:9.4f} ms {str(row['gbps']):>8s} GB/s "
              f"{str(row['tflops']):>7s} TFLOP/s  x{row['speedup_vs_torch']}", flush=True)


def bench_memory_ops(rec, bench, ops, sfx, dev, n, g):
    bf = torch.bfloat16
    for m, k in ((n, n), (16, n)):  # quantize: read 2 B + write 1 B per element (+ 4 B per row)
        x = torch.randn(m, k, device=dev, dtype=bf, generator=g)
        nbytes = 3 * m * k + 4 * m
        t_torch = bench(lambda: quantize_eager(x))
        rec.add("quantize_per_token", "torch-eager", f"{m}x{k}", t_torch, nbytes)
        rec.add("quantize_per_token", f"fastdistill-{sfx}", f"{m}x{k}",
                bench(lambda: getattr(ops, f"quantize_per_token_{sfx}")(x)), nbytes, vs=t_torch)
    acc = torch.randint(-2 ** 20, 2 ** 20, (n, n), device=dev, dtype=torch.int32, generator=g)
    xs, ws = torch.rand(n, device=dev, generator=g) * 1e-3, torch.rand(n, device=dev, generator=g) * 1e-3
    bias = torch.randn(n, device=dev, dtype=bf, generator=g)
    t_torch = bench(lambda: epilogue_eager(acc, xs, ws, bias, bf))  # read 4 B, write 2 B per element
    rec.add("int8_linear_epilogue", "torch-eager", f"{n}x{n}", t_torch, 6 * n * n)
    rec.add("int8_linear_epilogue", f"fastdistill-{sfx}", f"{n}x{n}",
            bench(lambda: getattr(ops, f"int8_linear_epilogue_{sfx}")(acc, xs, ws, bias, bf)), 6 * n * n, vs=t_torch)


def bench_w8a8(rec, bench, ops, sfx, dev, n, m_list, g, triton_ok):
    import fastdistill
    from fastdistill.kernels import int8_linear as kern
    from fastdistill.ops.common import new_output

    bf = torch.bfloat16
    w = torch.randn(n, n, device=dev, dtype=bf, generator=g)
    w8 = torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8, generator=g)
    ws = torch.rand(n, device=dev, generator=g) * 1e-3
    bias = torch.randn(n, device=dev, dtype=bf, generator=g)
    quant, epi = getattr(ops, f"quantize_per_token_{sfx}"), getattr(ops, f"int8_linear_epilogue_{sfx}")
    for m in m_list:
        x = torch.randn(m, n, device=dev, dtype=bf, generator=g)
        xq, xs = quant(x)
        shape, flops = f"{m}x{n}x{n}", 2 * m * n * n
        t_bf16 = bench(lambda: F.linear(x, w))
        rec.add("w8a8_linear", "bf16 F.linear", shape, t_bf16, flops=flops)
        rec.add("w8a8_linear", "quantize only", shape, bench(lambda: quant(x)), flops=flops, vs=t_bf16)
        if m > 16:  # cuBLASLt's int8 GEMM needs M > 16 (the cuda route pads smaller M)
            rec.add("w8a8_linear", "torch._int_mm only", shape, bench(lambda: torch._int_mm(xq, w8.t())),
                    flops=flops, vs=t_bf16)
            acc = torch._int_mm(xq, w8.t())
            rec.add("w8a8_linear", f"epilogue pass only-{sfx}", shape, bench(lambda: epi(acc, xs, ws, bias, bf)),
                    flops=flops, vs=t_bf16)
        rec.add("w8a8_linear", f"quant+int8_linear-{sfx}", shape,
                bench(lambda: fastdistill.int8_linear(*quant(x), w8, ws, bias, bf, backend=sfx)), flops=flops,
                vs=t_bf16)
        if triton_ok:
            out = new_output((m, n), like=x)
            cap = torch.cuda.get_device_capability()
            tma = kern.w8a8_tma_configs(m, n, cap, True)
            for label, cfg in (("default", kern.w8a8_configs(m, cap)[0]), ("tma", tma[0] if tma else None),
                               ("tuned", None)):
                if label == "tma" and cfg is None:
                    continue
                def run(cfg=cfg):
                    q, s = quant(x)
                    kern.int8_linear_launch(q, w8, s, ws, bias, out, interpret=False, config=cfg)
                run()  # compiles (and tunes) outside the timing
                rec.add("w8a8_linear", f"quant+triton-{label}", shape, bench(run), flops=flops, vs=t_bf16)
        rec.add("w8a8_linear", "auto (quant+int8_linear)", shape,
                bench(lambda: fastdistill.int8_linear(*fastdistill.quantize_per_token(x), w8, ws, bias, bf)),
                flops=flops, vs=t_bf16)


def bench_w8a16(rec, bench, ops, sfx, dev, n, m_list, g, triton_ok):
    import fastdistill
    from fastdistill.kernels import int8_linear as kern
    from fastdistill.ops.int8_weight_only_linear import dequantize_weight, int8_weight_only_linear_dense

    bf = torch.bfloat16
    copies = 4 if dev == "cuda" else 1  # graph mode cycles through 4 weight copies so that the L2 holds none
    w16 = [torch.randn(n, n, device=dev, dtype=bf, generator=g) for _ in range(copies)]
    w8 = [torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8, generator=g) for _ in range(copies)]
    scale = torch.rand(n, device=dev, generator=g) * 1e-2
    native = getattr(ops, f"int8_weight_only_linear_{sfx}")
    for m in m_list:
        xm = torch.randn(m, n, device=dev, dtype=bf, generator=g)
        shape, flops = f"{m}x{n}x{n}", 2 * m * n * n
        # weight bytes streamed: bf16 F.linear reads 2 B per element, the int8 routes 1 B
        cases = [("bf16 F.linear", 2 * n * n, lambda i: F.linear(xm, w16[i])),
                 (f"fastdistill-{sfx}", n * n, lambda i: native(xm, w8[i], scale, None, 0)),
                 ("dense (dequant+GEMM)", 3 * n * n,
                  lambda i: int8_weight_only_linear_dense(xm, w8[i], scale, None, 0)),
                 ("auto", n * n, lambda i: fastdistill.int8_weight_only_linear(xm, w8[i], scale))]
        if triton_ok:
            swap_cfg = kern.w8a16_config(m, torch.cuda.get_device_capability(), swap=True)
            swap_out = torch.empty(m, n, device=dev, dtype=bf)
            cases[2:2] = [("fastdistill-triton", n * n,
                           lambda i: fastdistill.int8_weight_only_linear(xm, w8[i], scale, backend="triton")),
                          ("triton swapped operands", n * n,
                           lambda i: kern.int8_weight_only_linear_launch(xm, w8[i], scale, None, swap_out, 0,
                                                                         interpret=False, config=swap_cfg))]
        modes = [("", lambda fn: bench(lambda: fn(0)))]
        if dev == "cuda" and m <= 16:
            modes.append((" (graph)", lambda fn: graph_ms(bench, fn, copies)))
        for suffix, measure in modes:
            times = [measure(fn) for _, _, fn in cases]  # cases[0] (bf16) is the baseline
            for (provider, nbytes, _), ms in zip(cases, times):
                rec.add("w8a16_linear", provider + suffix, shape, ms, nbytes=nbytes, flops=flops,
                        vs=times[0] if ms is not times[0] else None)
    rec.add("w8a16_dequantize", "dequantize pass (int8 -> bf16)", f"{n}x{n}",
            bench(lambda: dequantize_weight(w8[0], scale, 0, bf)), nbytes=3 * n * n)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--csv-dir", default=harness.RESULTS)
    p.add_argument("--reps", type=int, default=60, help="do_bench repetition time in ms (CUDA)")
    p.add_argument("--n", type=int, default=8192, help="N = K of every shape (and M of the square W8A8 case)")
    p.add_argument("--m-w8a16", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096])
    p.add_argument("--m-w8a8", type=int, nargs="+", default=None, help="default: 16 256 N")
    p.add_argument("--skip", nargs="*", default=[], choices=("memory", "w8a8", "w8a16"))
    args = p.parse_args()
    dev, n = args.device, args.n
    from fastdistill import _ext
    assert _ext.load_error() is None, _ext.load_error()  # importing fastdistill._C registers the ops
    ops = torch.ops.fastdistill
    sfx = "cuda" if dev == "cuda" else "cpu"
    triton_ok = dev == "cuda"  # the interpreter is far too slow for these shapes
    bench = timer(dev, args.reps)
    rec = Recorder(harness.environment(dev))
    g = torch.Generator(device=dev).manual_seed(0)
    sections = [("memory", lambda: bench_memory_ops(rec, bench, ops, sfx, dev, n, g)),
                ("w8a8", lambda: bench_w8a8(rec, bench, ops, sfx, dev, n, args.m_w8a8 or [16, 256, n], g, triton_ok)),
                ("w8a16", lambda: bench_w8a16(rec, bench, ops, sfx, dev, n, args.m_w8a16, g, triton_ok))]
    path = None
    for name, run in sections:
        if name not in args.skip:
            run()
            # rewritten after every section: a run cut off by gpu_check's time limit keeps what it measured
            path = harness.write_csv(f"int8_cuda_kernels_{dev}", rec.rows, args.csv_dir)
    print("wrote", path)


if __name__ == "__main__":
    main()
