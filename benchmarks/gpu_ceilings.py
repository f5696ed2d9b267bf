"""Measures the H200 ceilings the sparse and int8 benchmarks compare against, in one short run.

    python benchmarks/gpu_ceilings.py --csv-dir OUT

Device-to-device copy bandwidth, dense bf16 GEMM, int8 `torch._int_mm`, PyTorch's 2:4
semi-structured GEMM and BSR matmul when this torch has them, at the issue's shapes (8192 squared,
and M = 1..16 for the memory-bound case). Median of `triton.testing.do_bench` on random data.
"""
import argparse
import csv
import os
import time

import torch
from triton.testing import do_bench


def bench(fn):
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--csv-dir", default="benchmarks/results")
    args = p.parse_args()
    dev = "cuda"
    rows = []

    def add(name, shape, ms, flops=0.0, nbytes=0.0):
        rows.append(dict(name=name, shape=shape, ms=f"{ms:.4f}", tflops=f"{flops / ms / 1e9:.1f}" if flops else "",
                         gbps=f"{nbytes / ms / 1e6:.0f}" if nbytes else ""))
        print(f"{name:28s} {shape:22s} {ms:9.4f} ms {rows[-1]['tflops']:>8s} TFLOP/s {rows[-1]['gbps']:>6s} GB/s",
              flush=True)

    src = torch.randn(2 ** 30 // 4, device=dev)
    dst = torch.empty_like(src)
    add("copy_fp32", "1GiB", bench(lambda: dst.copy_(src)), nbytes=2 * src.numel() * 4)
    del src, dst

    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    add("mm_bf16", f"{n}^3", bench(lambda: a @ b.t()), flops=2 * n ** 3)
    ai = torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8)
    bi = torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8)
    add("int_mm", f"{n}^3", bench(lambda: torch._int_mm(ai, bi.t())), flops=2 * n ** 3)
    for m in (1, 8, 16, 32):
        xs = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        add("mm_bf16", f"{m}x{n}x{n}", bench(lambda: xs @ b.t()), nbytes=n * n * 2)
        if m > 16:
            xi = torch.randint(-127, 128, (m, n), device=dev, dtype=torch.int8)
            add("int_mm", f"{m}x{n}x{n}", bench(lambda: torch._int_mm(xi, bi.t())), nbytes=n * n)

    try:
        from torch.sparse import to_sparse_semi_structured
        mask = torch.tensor([1, 1, 0, 0], device=dev, dtype=torch.bool).repeat(n, n // 4)
        w24 = to_sparse_semi_structured(b * mask)
        add(f"mm_2to4_{type(w24).__name__}", f"{n}^3", bench(lambda: torch.mm(w24, a.t())), flops=2 * n ** 3)
        for m in (16, 32, 64):
            xs = torch.randn(n, m, device=dev, dtype=torch.bfloat16)
            add("mm_2to4", f"{m}x{n}x{n}", bench(lambda: torch.mm(w24, xs)), nbytes=n * n)
    except Exception as e:  # noqa: BLE001 - the ceiling run records what this torch lacks
        print("2:4 semi-structured unavailable:", repr(e)[:300])

    try:
        keep = torch.rand(n // 64, n // 64, device=dev) < 0.1
        wb = (b.view(n // 64, 64, n // 64, 64) * keep[:, None, :, None]).view(n, n)
        bsr = wb.to_sparse_bsr((64, 64))
        add("bsr_mm_90pct_64", f"{n}^3", bench(lambda: bsr @ a.t()), flops=0.2 * n ** 3)
    except Exception as e:  # noqa: BLE001
        print("torch BSR matmul unavailable:", repr(e)[:300])

    os.makedirs(args.csv_dir, exist_ok=True)
    path = os.path.join(args.csv_dir, "gpu_ceilings_h200.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["date", "device", "torch", "name", "shape", "ms", "tflops", "gbps"])
        w.writeheader()
        for r in rows:
            w.writerow(dict(date=time.strftime("%Y-%m-%d"), device=torch.cuda.get_device_name(),
                            torch=torch.__version__, **r))
    print("wrote", path)


if __name__ == "__main__":
    main()
