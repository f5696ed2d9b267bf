// Block-level building blocks of the one-block-per-row CUDA loss kernels (distill_loss.cu,
// topk_distill_loss.cu, sampled_distill_loss.cu): the online-softmax accumulator and its merge, and the
// block reductions. Per-thread partials, then a fixed butterfly within warps and across the warps'
// results: no atomics, every thread ends with the same bits, run to run. Torch-free (bare `nvcc -c`).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "fd_cuda_mma.h"

namespace fastdistill {
namespace cuda_block {

constexpr int kThreads = 512;  // one block per row
constexpr int kWarps = kThreads / 32;

using mma::from_f;  // element conversions shared with the tensor-core kernels (fd_cuda_mma.h)
using mma::to_f;

// Running softmax denominator: sum of exp(x - m) over the elements seen.
struct SoftmaxAcc {
  float m;
  double s;
};

__device__ __forceinline__ void acc_add(SoftmaxAcc& a, float x) {
  if (x == -INFINITY) return;
  if (x > a.m) {
    a.s = a.s * (double)expf(a.m - x) + 1.0;
    a.m = x;
  } else {
    a.s += (double)expf(x - a.m);
  }
}

__device__ __forceinline__ void acc_merge(SoftmaxAcc& a, const SoftmaxAcc& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return;
  a.s = a.s * (double)expf(a.m - m) + b.s * (double)expf(b.m - m);
  a.m = m;
}

// The merge and + are commutative, so lane order does not matter. smem: kWarps entries.
__device__ __forceinline__ SoftmaxAcc block_merge(SoftmaxAcc a, SoftmaxAcc* smem) {
  for (int o = 16; o > 0; o >>= 1) {
    SoftmaxAcc b{__shfl_xor_sync(0xffffffffu, a.m, o), __shfl_xor_sync(0xffffffffu, a.s, o)};
    acc_merge(a, b);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = a;
  __syncthreads();
  a = lane < kWarps ? smem[lane] : SoftmaxAcc{-INFINITY, 0.0};
  for (int o = 16; o > 0; o >>= 1) {
    SoftmaxAcc b{__shfl_xor_sync(0xffffffffu, a.m, o), __shfl_xor_sync(0xffffffffu, a.s, o)};
    acc_merge(a, b);
  }
  return a;
}

__device__ __forceinline__ double block_sum(double v, double* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < kWarps ? smem[lane] : 0.0;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float block_max(float v, double* smem) {  // smem: kWarps doubles, reused
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < kWarps ? (float)smem[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// A row under the NaN rule (fd_math.h): NaN loss and an all-NaN gradient row (g may be null: loss only).
template <typename S>
__device__ __forceinline__ void poison_row(S* g, int64_t V, float* loss) {
  if (g != nullptr)
    for (int64_t k = threadIdx.x; k < V; k += kThreads) g[k] = from_f<S>(NAN);
  if (threadIdx.x == 0) *loss = NAN;
}

template <typename S>
__device__ __forceinline__ void zero_row(S* g, int64_t V, float* loss) {  // an ignored row
  if (g != nullptr)
    for (int64_t k = threadIdx.x; k < V; k += kThreads) g[k] = from_f<S>(0.0f);
  if (threadIdx.x == 0) *loss = 0.0f;
}

// This block's row (blockIdx.x): the student row z, the gradient row g (null: loss only), the label (-1
// without labels) and the thread's index.
template <typename S>
struct BlockRow {
  int64_t row;
  const S* z;
  S* g;
  int64_t label;
  int tid;
};

template <typename S>
__device__ __forceinline__ BlockRow<S> block_row(const S* student, int64_t ss, S* grad, int64_t V,
                                                 const int64_t* labels) {
  const int64_t row = blockIdx.x;
  return BlockRow<S>{row, student + row * ss, grad != nullptr ? grad + row * V : nullptr,
                     labels != nullptr ? labels[row] : -1, (int)threadIdx.x};
}

}  // namespace cuda_block
}  // namespace fastdistill
