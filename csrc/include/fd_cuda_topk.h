// Launchers of the offline-target CUDA loss kernels (csrc/cuda/topk_distill_loss.cu and
// sampled_distill_loss.cu): plain pointers and sizes, shared by bindings_topk.cpp (ATen side) and the
// torch-free .cu files. For the .cu files only (__CUDACC__), the device readers of those rows and the row
// loss both kernels write (the block reductions: fd_cuda_block.cuh).
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
#include "fd_cuda_block.cuh"

namespace fastdistill {
namespace sparse_teacher {

using namespace cuda_block;  // kThreads, the block reductions, poison_row / zero_row

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

// Thread 0 writes the row's loss: soft_coef * D plus the hard-label CE (softmax(z) around zm with log-sum
// zls), times scale. An out-of-range label yields NaN (a kernel cannot raise).
template <typename S>
__device__ __forceinline__ void write_row_loss(float* loss, const fd::RowParams& rp, double D, bool ce, const S* z,
                                               int64_t label, int64_t V, float zm, float zls, float scale) {
  if (threadIdx.x != 0) return;
  float row_loss = rp.soft_coef * (float)D;
  if (ce) {
    const float zl = (label >= 0 && label < V) ? to_f(z[label]) : NAN;
    row_loss += rp.hard_weight * ((zm - zl) + zls);
  }
  *loss = row_loss * scale;
}

// The hard-label term of entry j's gradient: hc * (softmax(z)_j - [j == label]).
__device__ __forceinline__ float hard_grad(float hc, float zj, float zm, float zls, int64_t j, int64_t label) {
  return hc * expf((zj - zm) - zls) - (j == label ? hc : 0.0f);
}

}  // namespace sparse_teacher
}  // namespace fastdistill
#endif
