// Helpers shared by the int8 CPU kernels (csrc/cpu/int8_linear.cpp, csrc/cpu/int8_weight_only_linear.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

#include <cstdlib>
#include <cstring>
#include <optional>

namespace fastdistill {

inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.is_contiguous(), name, ": expected a contiguous 2-D tensor, got shape ",
                    t.sizes(), " strides ", t.strides());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
}

// bias as contiguous float32 (held by `holder`), nullptr without bias.
inline const float* bias_f32(const std::optional<at::Tensor>& bias, at::Tensor& holder) {
  if (!bias.has_value()) return nullptr;
  holder = bias->to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
}

inline void check_int8_matrix(const at::Tensor& t, const char* name) {
  check_rows(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kChar, name, ": expected int8, got ", t.scalar_type());
}

// Runs worker(take, n) on each thread of at::parallel_for; take() hands out tasks 0..n-1 one at a time. On a
// shared machine a slowed thread then takes fewer tasks instead of holding up a fixed share of the work (seen:
// 2-thread static splits ran slower than 1 thread while other processes used a core). Results do not depend
// on which thread runs a task.
template <typename F>
inline void parallel_tasks(int64_t n, const F& worker) {
  std::atomic<int64_t> next{0};
  auto take = [&next]() { return next.fetch_add(1, std::memory_order_relaxed); };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { worker(take, n); });
}

}  // namespace fastdistill
