// Launchers of the int8 CUDA kernels (csrc/cuda/int8_linear.cu, csrc/cuda/int8_w8a16.cu): plain pointers
// and sizes, shared by bindings_int8.cpp (ATen side) and the torch-free .cu files. The exact arithmetic
// of each op is fixed by the schema comments in csrc/ops.cpp. All tensors contiguous, row-major.
// Each returns a cudaError_t as int (0 on success).
#pragma once

#include <stdint.h>

#include "fd_cuda_launch.h"

namespace fastdistill {
namespace cuda_launch {

// x [M, K] (x_dtype) -> q [M, K] int8, scale [M] float32. Bitwise equal to the reference.
int quantize_per_token(const void* x, DType x_dtype, int8_t* q, float* scale, int64_t M, int64_t K,
                       cudaStream_t stream);

// acc [M, N] int32, x_scale [M], w_scale [N] float32, bias [N] (bias_dtype) or null -> out [M, N] (out_dtype):
// out = cast(((float)acc * x_scale[m]) * w_scale[n] (+ (float)bias[n])).
int int8_linear_epilogue(const int32_t* acc, const float* x_scale, const float* w_scale, const void* bias,
                         DType bias_dtype, void* out, DType out_dtype, int64_t M, int64_t N, cudaStream_t stream);

// x [M, K] (x_dtype), w [N, K] int8, w_scale [N] (group_size 0) or [N, K / group_size] float32,
// bias [N] (bias_dtype) or null -> out [M, N] in x_dtype = x · dequant(w)ᵀ (+ bias), fp32 accumulation.
int int8_weight_only_linear(const void* x, DType x_dtype, const int8_t* w, const float* w_scale, int64_t group_size,
                            const void* bias, DType bias_dtype, void* out, int64_t M, int64_t N, int64_t K,
                            cudaStream_t stream);

}  // namespace cuda_launch
}  // namespace fastdistill
