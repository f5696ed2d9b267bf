"""Benchmark of the sparse CUDA kernels against dense cuBLAS and PyTorch's own sparse paths (GPU only).

    python benchmarks/bench_sparse_cuda_kernels.py --csv-dir OUT [--quick]

Block-sparse (BSR): x [M, K] · Wᵀ with W [N, K] bf16, random block patterns; providers: dense
F.linear (cuBLAS), torch's BSR matmul (W.to_sparse_bsr() @ xᵀ), fastdistill's cuda fwd op, and the
fwd + dx + dw ops against dense fwd + bwd; with 64-wide blocks both M tiles of the fwd/dx kernels
(FASTDISTILL_BSR_TILE_M = 128, the default, and 256). 2:4: dense F.linear, PyTorch's semi-structured weight
(to_sparse_semi_structured, cuSPARSELt/CUTLASS) when this torch has it, and fastdistill's cuda op,
for M = 1..64 (memory-bound: GB/s of the bytes each reads) and M = 8192.
Times are medians of triton.testing.do_bench; every fastdistill output is checked against dense first.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from fastdistill.sparse.formats import BlockSparseWeight, SemiStructuredWeight  # noqa: E402

DEV = "cuda"


def bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def bsr_weight(n: int, k: int, block: tuple[int, int], sparsity: float, dtype, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    bn, bk = block
    keep = torch.rand(n // bn, k // bk, device=DEV, generator=g) >= sparsity
    mask = keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    dense = torch.randn(n, k, device=DEV, dtype=dtype, generator=g) * mask
    return dense, BlockSparseWeight.from_dense(dense, mask=mask, block_size=block)


def bsr_rows(m: int, n: int, k: int, block, sparsity: float, with_bwd: bool, with_torch: bool = True) -> list[dict]:
    ops = torch.ops.fastdistill
    dtype = torch.bfloat16
    dense, w = bsr_weight(n, k, block, sparsity, dtype)
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    dy = torch.randn(m, n, device=DEV, dtype=dtype)
    shape = f"{m}x{n}x{k} {block[0]}x{block[1]} {int(sparsity * 100)}%"
    flops = 2.0 * m * n * k
    sparse_flops = flops * w.density

    def fwd():
        return ops.block_sparse_linear_fwd_cuda(x, w.values, w.crow_indices, w.col_indices, None, n)

    err = rel_err(fwd(), F.linear(x, dense))
    rows = []

    def add(provider, mode, ms, useful_flops):
        rows.append({"case": "bsr", "shape": shape, "mode": mode, "provider": provider, "ms": ms,
                     "tflops_effective": useful_flops / ms / 1e9, "rel_err_vs_dense": err})

    tiles = ("128", "256") if block[0] == 64 or block[1] == 64 else ("128",)
    add("dense_cublas", "fwd", bench(lambda: F.linear(x, dense)), flops)
    for tile in tiles:
        os.environ["FASTDISTILL_BSR_TILE_M"] = tile  # read by the bindings at each call
        add(f"fastdistill-cuda-tile{tile}", "fwd", bench(fwd), sparse_flops)
    if with_bwd:
        def dense_full():
            y = F.linear(x, dense)
            return y, dy @ dense, dy.t() @ x

        def dx():
            return ops.block_sparse_linear_dx_cuda(dy, w.values, w.ccol_indices, w.row_indices, w.perm, k)

        def dw():
            return ops.block_sparse_linear_dw_cuda(dy, x, w.crow_indices, w.col_indices, block[0], block[1])

        def sparse_full():
            return fwd(), dx(), dw()

        add("dense_cublas", "dx", bench(lambda: dy @ dense), flops)
        add("dense_cublas", "dw", bench(lambda: dy.t() @ x), flops)
        add("fastdistill-cuda", "dw", bench(dw), sparse_flops)
        for tile in tiles:
            os.environ["FASTDISTILL_BSR_TILE_M"] = tile
            add(f"fastdistill-cuda-tile{tile}", "dx", bench(dx), sparse_flops)
        add("dense_cublas", "fwd+bwd", bench(dense_full), 3 * flops)
        for tile in tiles:
            os.environ["FASTDISTILL_BSR_TILE_M"] = tile
            add(f"fastdistill-cuda-tile{tile}", "fwd+bwd", bench(sparse_full), 3 * sparse_flops)
    os.environ.pop("FASTDISTILL_BSR_TILE_M", None)
    if with_torch:  # last: it may compile kernels of its own
        try:
            bsr = dense.to_sparse_bsr(block)
            add("torch_bsr", "fwd", bench(lambda: bsr @ x.t()), sparse_flops)
        except Exception as e:  # noqa: BLE001 - record what this torch lacks
            print("torch BSR matmul unavailable:", repr(e)[:200])
    for r in rows:
        r["speedup_vs_dense"] = next(d["ms"] for d in rows if d["provider"] == "dense_cublas"
                                     and d["mode"] == r["mode"]) / r["ms"]
    return rows


def semi_rows(ms: list[int], n: int, k: int) -> list[dict]:
    dtype = torch.bfloat16
    g = torch.Generator(device=DEV).manual_seed(1)
    dense = torch.randn(n, k, device=DEV, dtype=dtype, generator=g)
    mask = torch.tensor([1, 0, 1, 0], device=DEV, dtype=torch.bool).repeat(n, k // 4)
    dense = dense * mask
    w = SemiStructuredWeight.from_dense(dense, mask=mask)
    try:
        from torch.sparse import to_sparse_semi_structured
        w_torch = to_sparse_semi_structured(dense)
    except Exception as e:  # noqa: BLE001
        print("torch semi-structured unavailable:", repr(e)[:200])
        w_torch = None
    op = torch.ops.fastdistill.semi_structured_linear_cuda
    weight_bytes = w.values.numel() * 2 + w.meta.numel()
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=DEV, dtype=dtype)
        err = rel_err(op(x, w.values, w.meta, None), F.linear(x, dense))
        shape = f"{m}x{n}x{k} 2:4"
        case = []
        dense_ms = bench(lambda: F.linear(x, dense))
        case.append(("dense_cublas", dense_ms, n * k * 2))
        case.append(("fastdistill-cuda", bench(lambda: op(x, w.values, w.meta, None)), weight_bytes))
        if w_torch is not None:
            try:
                case.append(("torch_semi_structured", bench(lambda: F.linear(x, w_torch)), weight_bytes))
            except Exception as e:  # noqa: BLE001 - e.g. M below the kernel's minimum
                print(f"torch semi-structured at M={m}:", repr(e)[:200])
        for provider, t, nbytes in case:
            rows.append({"case": "2:4", "shape": shape, "mode": "fwd", "provider": provider, "ms": t,
                         "tflops_effective": 2.0 * m * n * k / t / 1e9, "gbps_weight": nbytes / t / 1e6,
                         "rel_err_vs_dense": err, "speedup_vs_dense": dense_ms / t})
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda", choices=["cuda"])
    p.add_argument("--csv-dir", default=None)
    p.add_argument("--out", default="sparse_cuda_kernels_h200")
    p.add_argument("--quick", action="store_true", help="only the issue's target shapes (64x64 blocks at 90%%, "
                   "2:4 at M = 1..16)")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    env = harness.environment("cuda")
    rows = []
    n = k = 8192
    phases = [lambda: bsr_rows(8192, n, k, (64, 64), 0.9, with_bwd=True, with_torch=False),
              lambda: semi_rows([1, 4, 8, 16] + ([] if args.quick else [32, 64, 8192]), n, k)]
    if not args.quick:
        phases += [lambda: bsr_rows(8192, n, k, (64, 64), 0.5, with_bwd=True),
                   lambda: bsr_rows(8192, n, k, (32, 32), 0.9, with_bwd=False),
                   lambda: bsr_rows(8192, n, k, (16, 16), 0.9, with_bwd=False)]
    phases.append(lambda: bsr_rows(8192, n, k, (64, 64), 0.9, with_bwd=False))  # + torch's BSR, last
    for phase in phases:
        new = [{**env, **r} for r in phase()]
        for r in new:
            print(f"{r['case']:4s} {r['shape']:28s} {r['mode']:8s} {r['provider']:26s} {r['ms']:9.4f} ms "
                  f"x{r['speedup_vs_dense']:5.2f} vs dense  {r['tflops_effective']:7.1f} TFLOP/s  "
                  f"err {r['rel_err_vs_dense']:.1e}", flush=True)
        rows += new
        if args.csv_dir:  # partial results survive a time limit
            harness.write_csv(args.out, rows, args.csv_dir)
    harness.finish(args.out, rows, args.csv_dir,
                   ["case", "shape", "mode", "provider", "ms", "speedup_vs_dense", "tflops_effective"])


if __name__ == "__main__":
    main()
