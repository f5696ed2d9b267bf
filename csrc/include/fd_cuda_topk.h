// Launchers of the offline-target CUDA loss kernels (csrc/cuda/topk_distill_loss.cu and
// sampled_distill_loss.cu): plain pointers and sizes, shared by bindings_topk.cpp (ATen side) and the
// torch-free .cu files. For the .cu files only (__CUDACC__), the block reductions both kernels use.
#pragma once

#include <stdint.h>

#include "fd_cuda_launch.h"

namespace fastdistill {
namespace cuda_launch {

// The teacher's k entries per row: log-probs (N, K) in any DType and ids (N, K) int32 or int64, each
// with its row stride (the k dimension contiguous).
struct SparseTeacher {
  const void* logprobs;
  int64_t lp_stride;
  DType lp_dtype;
  const void* ids;
  int64_t id_stride;
  bool ids64;
  int64_t K;
};

// student: (N, V) with a row stride; labels (N,) int64 or null; scale: one float on the device; loss (N,)
// float; grad (N, V) contiguous in the student dtype, or null for loss only. Returns a cudaError_t as int.
// bucket (tail 1) keeps a bit per vocabulary entry in shared memory: topk_bucket_smem_bytes(V) bytes.
int topk_distill_loss(const void* student, int64_t student_stride, DType student_dtype, const SparseTeacher& teacher,
                      const int64_t* labels, const float* scale, float* loss, void* grad, int64_t N, int64_t V,
                      const fd::RowParams& rp, bool bucket, int64_t ignore_index, bool hard_label_term,
                      cudaStream_t stream);

// The largest V the bucket tail handles on the current device (its shared-memory limit per block).
int64_t topk_bucket_max_vocab();

// Forward KL against k draws (duplicates allowed) with the "counts" estimator; rp from make_row_params(KL, ...).
int sampled_distill_loss(const void* student, int64_t student_stride, DType student_dtype,
                         const SparseTeacher& teacher, const int64_t* labels, const float* scale, float* loss,
                         void* grad, int64_t N, int64_t V, const fd::RowParams& rp, int64_t ignore_index,
                         bool hard_label_term, cudaStream_t stream);

}  // namespace cuda_launch
}  // namespace fastdistill

#if defined(__CUDACC__)
#include "fd_cuda_mma.h"

namespace fastdistill {
namespace sparse_teacher {

constexpr int kThreads = 512;  // one block per row
constexpr int kWarps = kThreads / 32;

using mma::from_f;
using mma::to_f;

__device__ __forceinline__ int64_t load_id(const cuda_launch::SparseTeacher& t, int64_t row, int64_t i) {
  const int64_t off = row * t.id_stride + i;
  return t.ids64 ? static_cast<const int64_t*>(t.ids)[off] : (int64_t) static_cast<const int32_t*>(t.ids)[off];
}

__device__ __forceinline__ float load_lp(const cuda_launch::SparseTeacher& t, int64_t row, int64_t i) {
  const int64_t off = row * t.lp_stride + i;
  switch (t.lp_dtype) {  // uniform per launch: no divergence
    case cuda_launch::F32:
      return static_cast<const float*>(t.logprobs)[off];
    case cuda_launch::BF16:
      return to_f(static_cast<const __nv_bfloat16*>(t.logprobs)[off]);
    default:
      return to_f(static_cast<const __half*>(t.logprobs)[off]);
  }
}

// Running softmax denominator: sum of exp(x - m) over the elements seen (as in distill_loss.cu).
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

// Fixed butterflies within and across warps: every thread ends with the same bits, run to run.
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

// A row under the NaN rule (fd_math.h): NaN loss and an all-NaN gradient row (g may be null).
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

}  // namespace sparse_teacher
}  // namespace fastdistill
#endif
