// CPU kernel of fastdistill::sampled_distill_loss_cpu: distillation from k token ids drawn (with
// replacement) from the teacher's distribution, estimator "counts" (fastdistill/cache/sampling.py).
//
// Per row, with s = z / T, q = softmax(s) over the full vocabulary and c = soft_coef:
//   loss = c * mean_j (lp_j - log q(x_j)) + hard_weight * CE(z, label)
//   grad = c / T * (q - p_hat) + hard-label term,  p_hat(x) = #{j : x_j = x} / k
// Rows run in parallel (at::parallel_for); within a row every sum has a fixed order and the draws are
// subtracted one after the other (duplicates add up in draw order), so the result is bitwise
// deterministic with no atomics. Vectorized row loops: fd_cpu_rows.h.
// A bad id sets a flag inside the parallel loop; the error is raised after it (as topk does).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "fd_checks.h"
#include "fd_cpu_rows.h"
#include "fd_divergence.h"

namespace fastdistill {
namespace {

struct Config {
  fd::RowParams rp;
  int64_t V, K, ignore_index;
  float scale;  // of every row's loss and gradient
};

template <typename S>
void sampled_rows(const at::Tensor& student, const TeacherRows& draws, const int64_t* labels, const Config& cf,
                  at::Tensor& loss, at::Tensor* grad, std::atomic<bool>& bad_ids) {
  const int64_t N = student.size(0), V = cf.V, K = cf.K, ss = student.stride(0);
  const S* sp = student.data_ptr<S>();
  float* lossp = loss.data_ptr<float>();
  S* gp = grad ? grad->data_ptr<S>() : nullptr;
  const fd::RowParams& rp = cf.rp;
  const float it = rp.inv_t;
  const bool ce = rp.hard_weight != 0.0f && labels != nullptr;
  const bool own_z = ce && rp.ce_needs_own_softmax;  // T != 1: the hard-label term has its own softmax
  constexpr bool f32 = std::is_same_v<S, float>;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V + K, 1));

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> zb(f32 ? 0 : V), gb(gp != nullptr && !f32 ? V : 0), e(V), ez(own_z ? V : 0);
    std::vector<int64_t> id(K);
    std::vector<float> lpv(K);
    auto poison_row = [&](int64_t r, S* grow) {  // NaN loss and gradient row
      lossp[r] = NAN;
      if (grow) std::fill(grow, grow + V, S(NAN));
    };
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = labels ? labels[r] : 0;
      S* grow = gp ? gp + r * V : nullptr;
      if (labels && label == cf.ignore_index) {  // the draws of ignored rows are never read
        lossp[r] = 0.0f;
        if (grow) std::fill(grow, grow + V, S(0));
        continue;
      }
      draws.indices(r, K, id.data());
      bool ids_ok = true;
      for (int64_t i = 0; i < K; ++i) ids_ok &= id[i] >= 0 && id[i] < V;
      if (!ids_ok) {
        bad_ids.store(true, std::memory_order_relaxed);
        poison_row(r, grow);
        continue;
      }
      draws.logprobs(r, K, lpv.data());
      // The NaN rule: NaN / +inf in a log-prob, or -inf (a drawn token has probability > 0), poisons the
      // row; so does NaN / +inf in the student row (a NaN exp sum) or an all -inf row (no softmax).
      bool poisoned = false;
      for (int64_t i = 0; i < K; ++i) poisoned |= fd::poisons_row(lpv[i]) | (lpv[i] == -INFINITY);
      const float* z = widen(sp + r * ss, V, zb);
      const float mz = row_max(z, V);
      if (poisoned || mz == -INFINITY) { poison_row(r, grow); continue; }
      const float m = mz * it;
      const double total = exp_chunks(z, V, it, m, e.data(), nullptr);
      if (total != total) { poison_row(r, grow); continue; }
      const float log_sum = (float)std::log(total), inv_sum = (float)(1.0 / total);
      double d = 0.0;  // sum_j (lp_j - log q(x_j)), in draw order
      for (int64_t i = 0; i < K; ++i) d += lpv[i] - ((z[id[i]] * it - m) - log_sum);
      float row = rp.soft_coef * (float)(d / (double)K);
      float mz_ce = m, ls_ce = log_sum, inv_ce = inv_sum;  // the softmax of the hard-label term
      if (own_z) {
        const double tz = exp_chunks(z, V, 1.0f, mz, ez.data(), nullptr);
        mz_ce = mz;
        ls_ce = (float)std::log(tz);
        inv_ce = (float)(1.0 / tz);
      }
      if (ce) row += rp.hard_weight * ((mz_ce - z[label]) + ls_ce);
      lossp[r] = row * cf.scale;

      if (grow) {
        float* g = f32 ? reinterpret_cast<float*>(grow) : gb.data();
        const float gc = rp.grad_coef * cf.scale, hc = rp.hard_weight * cf.scale;
        // gc * q + hc * softmax(z) (the same e at T = 1), then - gc / k at each draw and - hc at the label.
        const float* e_ce = own_z ? ez.data() : e.data();
        if (ce && !own_z) fill_grad(g, V, e.data(), gc * inv_sum + hc * inv_ce, nullptr, 0.0f);
        else fill_grad(g, V, e.data(), gc * inv_sum, ce ? e_ce : nullptr, hc * inv_ce);
        const float per_draw = gc / (float)K;
        for (int64_t i = 0; i < K; ++i) g[id[i]] -= per_draw;
        if (ce) g[label] -= hc;
        if constexpr (!f32) {
          for (int64_t j = 0; j < V; ++j) grow[j] = static_cast<S>(g[j]);
        }
      }
    }
  });
}

// Called after the parallel loop saw a bad id: finds the first one and raises naming it.
[[noreturn]] void raise_bad_ids(const TeacherRows& draws, const int64_t* labels, int64_t ignore_index, int64_t N,
                                int64_t K, int64_t V) {
  std::vector<int64_t> id(K);
  for (int64_t r = 0; r < N; ++r) {
    if (labels && labels[r] == ignore_index) continue;
    draws.indices(r, K, id.data());
    for (int64_t i = 0; i < K; ++i) {
      TORCH_CHECK_VALUE(id[i] >= 0 && id[i] < V, "teacher_sampled_indices: id ", id[i], " in row ", r,
                        " is outside [0, V = ", V, ")");
    }
  }
  TORCH_CHECK_VALUE(false, "teacher_sampled_indices: invalid ids");  // not reached
}

std::tuple<at::Tensor, at::Tensor> sampled_distill_loss_cpu(
    const at::Tensor& student, const at::Tensor& logprobs, const at::Tensor& indices,
    const std::optional<at::Tensor>& labels, const at::Tensor& scale, double temperature, double soft_weight,
    double hard_weight, bool scale_t2, int64_t ignore_index, bool compute_grad) {
  // The student, labels and options are checked as for distill_loss (the student stands in for the teacher).
  check_distill_inputs(student, student, labels, scale, fd::KL, temperature, 0.0, at::kCPU);
  const int64_t N = student.size(0), V = student.size(1);
  TORCH_CHECK_VALUE(logprobs.dim() == 2 && logprobs.size(0) == N, "teacher_sampled_logprobs: expected shape (", N,
                    ", k), got ", logprobs.sizes());
  const int64_t K = logprobs.size(1);
  TORCH_CHECK_VALUE(K >= 1, "teacher_sampled_logprobs: k = ", K, " draws per row (need k >= 1)");
  const TeacherRows draws = teacher_rows(logprobs, indices, student, "teacher_sampled");
  at::Tensor lab_c;
  const int64_t* lab = cpu_labels(labels, V, hard_weight, ignore_index, lab_c);
  auto [loss, grad] = new_loss_and_grad(student, N, V, compute_grad);
  const Config cf{fd::make_row_params(fd::KL, temperature, 0.0, (float)soft_weight, (float)hard_weight, scale_t2, V),
                  V, K, ignore_index, scale.to(at::kFloat).item<float>()};  // CPU tensor: no device sync
  std::atomic<bool> bad_ids{false};
  at::Tensor* gptr = compute_grad ? &grad : nullptr;

  for_kernel_float(student.scalar_type(),
                   [&](auto s) { sampled_rows<decltype(s)>(student, draws, lab, cf, loss, gptr, bad_ids); });
  if (bad_ids.load()) raise_bad_ids(draws, lab, ignore_index, N, K, V);
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) { m.impl("sampled_distill_loss_cpu", &sampled_distill_loss_cpu); }

}  // namespace fastdistill
