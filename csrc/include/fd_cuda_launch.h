// Launchers of the CUDA kernels: plain pointers and sizes, so that bindings_*.cpp (ATen side) and the
// .cu files (torch-free) share one declaration.
#pragma once

#include <stdint.h>

#include "fd_divergence.h"

typedef struct CUstream_st* cudaStream_t;

namespace fastdistill {
namespace cuda_launch {

enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// student/teacher: (N, V) with row strides; labels (N,) or null; scale: one float on the device;
// loss (N,) float; grad (N, V) contiguous in the student dtype, or null for loss only.
// Returns a cudaError_t as int (0 on success).
int distill_loss(const void* student, int64_t student_stride, DType student_dtype, const void* teacher,
                 int64_t teacher_stride, DType teacher_dtype, const int64_t* labels, const float* scale,
                 float* loss, void* grad, int64_t N, int64_t V, const fd::RowParams& rp, int64_t ignore_index,
                 bool hard_label_term, cudaStream_t stream);

}  // namespace cuda_launch
}  // namespace fastdistill
