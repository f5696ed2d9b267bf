// Row helpers of the CPU loss kernels (distill_loss.cpp, topk_distill_loss.cpp, sampled_distill_loss.cpp):
// the vectorized sweeps over one vocabulary row (FD_CLONES: one copy per x86 level) and the readers of a
// teacher's (log-prob, id) rows. Sums run in fp32 SIMD lanes over chunks of kChunk elements and the chunk
// sums add up in double: as accurate as PyTorch's cascade sum, at one horizontal add per chunk.
// Internal linkage (unnamed namespace): each kernel file keeps its own clones, as when they lived there.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "fd_checks.h"
#include "fd_cpu_isa.h"
#include "fd_math.h"

namespace fastdistill {
namespace {

constexpr int64_t kChunk = 64;

[[maybe_unused]] FD_CLONES float row_max(const float* z, int64_t V) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < V; ++j) m = fd::max_f32(m, z[j]);
  return m;
}

// e_j = exp(z_j * a - shift); returns sum e (chunk sums in double), NaN for NaN or +inf in z. cs (may be
// null) gets the fp32 sum of each chunk. No mask in this loop: byte and float lanes together made GCC
// fall back to 128-bit vectors.
[[maybe_unused]] FD_CLONES double exp_chunks(const float* z, int64_t V, float a, float shift, float* e, float* cs) {
  double total = 0.0;
  for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
    const int64_t j1 = std::min(V, j0 + kChunk);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = j0; j < j1; ++j) {
      e[j] = fd::exp_f32(z[j] * a - shift);
      s += e[j];
    }
    if (cs != nullptr) cs[j0 / kChunk] = s;
    total += s;
  }
  return total;
}

// g_j = e_j * ae + ez_j * az (a null pointer drops its term; both null: zeros).
[[maybe_unused]] FD_CLONES void fill_grad(float* g, int64_t V, const float* e, float ae, const float* ez, float az) {
  if (e != nullptr && ez != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) g[j] = e[j] * ae + ez[j] * az;
  } else if (e != nullptr || ez != nullptr) {
    const float* x = e ? e : ez;
    const float a = e ? ae : az;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) g[j] = x[j] * a;
  } else {
    std::fill(g, g + V, 0.0f);
  }
}

// A float row as is; a bf16/fp16 row widened into buf (V floats).
template <typename T>
const float* widen(const T* src, int64_t V, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t j = 0; j < V; ++j) buf[j] = static_cast<float>(src[j]);
    return buf.data();
  }
}

// The teacher's rows of a top-k or sampled cache: log-probs in any kernel float type, ids int32 or int64
// (read per row, k values, the k dimension contiguous).
struct TeacherRows {
  const void* lp;
  at::ScalarType lp_type;
  int64_t lp_stride;
  const void* ids;
  bool ids64;
  int64_t ids_stride;

  template <typename T>
  static void copy(const T* src, int64_t K, float* out) {
    for (int64_t i = 0; i < K; ++i) out[i] = static_cast<float>(src[i]);
  }
  void logprobs(int64_t r, int64_t K, float* out) const {
    const int64_t off = r * lp_stride;
    if (lp_type == at::kFloat) copy(static_cast<const float*>(lp) + off, K, out);
    else if (lp_type == at::kBFloat16) copy(static_cast<const c10::BFloat16*>(lp) + off, K, out);
    else copy(static_cast<const c10::Half*>(lp) + off, K, out);
  }
  void indices(int64_t r, int64_t K, int64_t* out) const {
    const int64_t off = r * ids_stride;
    for (int64_t i = 0; i < K; ++i) {
      out[i] = ids64 ? static_cast<const int64_t*>(ids)[off + i] : static_cast<const int32_t*>(ids)[off + i];
    }
  }
};

// Checks a teacher's log-prob / id pair named `<name>_logprobs` / `<name>_indices` (its (N, k) shape and k
// are checked by the caller) and returns the reader of its rows.
[[maybe_unused]] TeacherRows teacher_rows(const at::Tensor& logprobs, const at::Tensor& indices,
                                          const at::Tensor& student, const std::string& name) {
  const std::string lp = name + "_logprobs", ids = name + "_indices";
  TORCH_CHECK_VALUE(indices.sizes() == logprobs.sizes(), ids, ": shape ", indices.sizes(), " does not match ", lp,
                    " ", logprobs.sizes());
  TORCH_CHECK_TYPE(is_kernel_float(logprobs.scalar_type()), lp, ": dtype ", logprobs.scalar_type(),
                   " not supported (float32, bfloat16, float16)");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, ids,
                   ": expected int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(logprobs.size(1) == 1 || (logprobs.stride(1) == 1 && indices.stride(1) == 1), lp, "/", ids,
                    ": the k dimension must be contiguous");
  TORCH_CHECK_VALUE(logprobs.device() == student.device() && indices.device() == student.device(), lp, "/", ids,
                    ": expected on ", student.device());
  return TeacherRows{logprobs.data_ptr(), logprobs.scalar_type(), logprobs.stride(0),
                     indices.data_ptr(), indices.scalar_type() == at::kLong, indices.stride(0)};
}

// Calls rows(S{}) with S the C++ type of t, one of the kernel floats (checked before: check_distill_inputs).
template <typename F>
void for_kernel_float(at::ScalarType t, F&& rows) {
  switch (t) {
    case at::kFloat: return rows(float{});
    case at::kBFloat16: return rows(c10::BFloat16{});
    default: return rows(c10::Half{});
  }
}

}  // namespace
}  // namespace fastdistill
