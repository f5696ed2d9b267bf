// Shared by the CUDA bindings (csrc/cuda/bindings*.cpp, compiled against torch): tensor dtypes to the
// DType codes of the torch-free launchers.
#pragma once

#include <ATen/ATen.h>

#include "fd_cuda_launch.h"

namespace fastdistill {

inline cuda_launch::DType launch_dtype(at::ScalarType t) {
  if (t == at::kBFloat16) return cuda_launch::BF16;
  if (t == at::kHalf) return cuda_launch::F16;
  return cuda_launch::F32;
}

}  // namespace fastdistill
