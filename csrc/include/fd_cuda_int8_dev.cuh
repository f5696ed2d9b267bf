// Device helpers shared by the int8 CUDA kernels (.cu files only).
#pragma once

#include "fd_cuda_launch.h"
#include "fd_cuda_mma.h"

namespace fastdistill {
namespace int8_dev {

// Element i of a float32/bfloat16/float16 vector whose dtype is known only at run time (the bias).
__device__ __forceinline__ float load_as_float(const void* p, cuda_launch::DType dt, int64_t i) {
  if (dt == cuda_launch::BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  if (dt == cuda_launch::F16) return __half2float(static_cast<const __half*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

}  // namespace int8_dev
}  // namespace fastdistill
