// CPU kernel of fastdistill::distill_loss_cpu: loss and student gradient in one call.
//
// Rows run in parallel (at::parallel_for, OpenMP). Per row the logits are read from memory once
// (bf16/fp16 rows are widened into a per-thread fp32 buffer while doing so); the later sweeps hit
// the L2-resident row. The inner loops are branch-free over the vocabulary and compiled for
// several x86 levels (target_clones), so GCC vectorizes them including fd::exp_f32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "fd_divergence.h"
#include "fd_checks.h"
#include "fd_cpu_isa.h"
#include "fd_cpu_rows.h"

namespace fastdistill {
namespace {

using fd::RowParams;

// Softmax of one row x * a: log p_k = (x_k * a - max) - log_sum, p_k = e_k * inv_sum with
// e_k = exp(x_k * a - max) kept from the sum (one exp per element per softmax, not two).
// Keeping max and log_sum apart (as torch.log_softmax does) preserves digits when |logits| is
// large: max + log_sum rounded to one float loses ~1e-3 at 1e4.
struct Softmax {
  float max = 0.0f, log_sum = 0.0f, inv_sum = 0.0f;
  const float* e = nullptr;
  bool poisoned = false;  // the row holds NaN or +inf (the NaN rule, fd_math.h)
};

struct RowStats {
  Softmax s, t, z;
};

FD_CLONES void row_max(const float* z, const float* y, int64_t V, float* mz_out, float* my_out) {
  float mz = -INFINITY, my = -INFINITY;
#pragma omp simd reduction(max : mz, my)
  for (int64_t k = 0; k < V; ++k) {
    mz = fd::max_f32(mz, z[k]);
    my = fd::max_f32(my, y[k]);
  }
  *mz_out = mz;
  *my_out = my;
}

// The NaN rule's scalar scan, only where a row's result is already non-finite (rare path).
bool row_poisoned(const float* x, int64_t V) {
  for (int64_t k = 0; k < V; ++k) {
    if (fd::poisons_row(x[k])) return true;
  }
  return false;
}

Softmax row_softmax(const float* x, int64_t V, float a, float row_max, float* e) {
  Softmax o;
  o.max = row_max * a;  // a = 1/T > 0 keeps the arg max
  o.e = e;
  if (o.max == -INFINITY) {  // all -inf: undefined softmax (only reached for rows that count)
    std::fill(e, e + V, NAN);
    o.log_sum = o.inv_sum = NAN;
    o.poisoned = row_poisoned(x, V);  // -inf and NaN: the plain-compare max may skip a NaN
    return o;
  }
  const float sum = (float)exp_chunks(x, V, a, o.max, e, nullptr);  // e_k = exp(x_k * a - max)
  // The NaN rule for free: the sum is NaN exactly when the row holds NaN (exp(NaN) = NaN, whatever the
  // max) or +inf (the max is +inf, and exp(inf - inf) = NaN).
  o.poisoned = sum != sum;
  o.log_sum = logf(sum);
  o.inv_sum = 1.0f / sum;
  return o;
}

// Sweeps 2 and 3 for one row (see fd_divergence.h). Returns D; writes the gradient
// w.r.t. the raw student logits (without the hard-label one-hot) to g when WRITE.
template <int DIV, bool WRITE, bool CE>
FD_INLINE float row_sweeps(const RowParams& rp0, const float* z, const float* y, int64_t V, const RowStats& st,
                           float scale, float* g) {
  RowParams rp = rp0;
  rp.div = DIV;  // constant-folds the switches in fd::row_terms / fd::grad_s
  const float it = rp.inv_t;
  const Softmax os = st.s, ot = st.t, oz = st.z;
  // delta = log p - log q = (y - z) / T - kd (fd::log_ratio), with the row constant kd taken in double.
  const float kd = (float)(((double)ot.max - os.max) + ((double)ot.log_sum - os.log_sum));
  double D = 0.0, C = 0.0;
  if (fd::needs_row_pass(DIV)) {
    for (int64_t k0 = 0; k0 < V; k0 += kChunk) {
      const int64_t k1 = std::min(V, k0 + kChunk);
      float dsum = 0.0f, csum = 0.0f;
#pragma omp simd reduction(+ : dsum, csum)
      for (int64_t k = k0; k < k1; ++k) {
        float d, c;
        const float lp = (y[k] * it - ot.max) - ot.log_sum, lq = (z[k] * it - os.max) - os.log_sum;
        fd::row_terms(rp, ot.e[k] * ot.inv_sum, os.e[k] * os.inv_sum, lp, lq,
                      fd::log_ratio(lp, lq, (y[k] - z[k]) * it, kd), d, c);
        dsum += d;
        csum += c;
      }
      D += dsum;
      C += csum;
    }
    if (!WRITE) return (float)D;
  }
  const float Df = (float)D, Cf = (float)C;
  const float gc = rp.grad_coef * scale, hc = rp.hard_weight * scale;
  double Dk = 0.0;  // D accumulated in this sweep (kl, mse)
  for (int64_t k0 = 0; k0 < V; k0 += kChunk) {
    const int64_t k1 = std::min(V, k0 + kChunk);
    float dsum = 0.0f;
#pragma omp simd reduction(+ : dsum)
    for (int64_t k = k0; k < k1; ++k) {
      float gk;
      if (DIV == fd::MSE) {
        float diff = z[k] - y[k];
        dsum += diff * diff;
        gk = gc * diff;
      } else {
        const float p = ot.e[k] * ot.inv_sum, q = os.e[k] * os.inv_sum;
        const float lp = (y[k] * it - ot.max) - ot.log_sum, lq = (z[k] * it - os.max) - os.log_sum;
        const float delta = fd::log_ratio(lp, lq, (y[k] - z[k]) * it, kd);
        if (DIV == fd::KL) {
          float d, c;
          fd::row_terms(rp, p, q, lp, lq, delta, d, c);
          dsum += d;
        }
        gk = WRITE ? gc * fd::grad_s(rp, p, q, lp, lq, delta, Df, Cf) : 0.0f;
      }
      if (CE) gk += hc * (oz.e[k] * oz.inv_sum);
      if (WRITE) g[k] = gk;
    }
    Dk += dsum;
  }
  if (DIV == fd::MSE) return (float)Dk * rp.inv_v;
  return DIV == fd::KL ? (float)Dk : Df;
}

template <int DIV>
FD_INLINE float row_sweeps_div(const RowParams& rp, const float* z, const float* y, int64_t V, const RowStats& st,
                               float scale, float* g, bool ce) {
  if (g != nullptr) {
    return ce ? row_sweeps<DIV, true, true>(rp, z, y, V, st, scale, g)
              : row_sweeps<DIV, true, false>(rp, z, y, V, st, scale, g);
  }
  return row_sweeps<DIV, false, false>(rp, z, y, V, st, scale, g);
}

FD_CLONES float row_divergence(const RowParams& rp, const float* z, const float* y, int64_t V, const RowStats& st,
                               float scale, float* g, bool ce) {
  switch (rp.div) {
    case fd::KL: return row_sweeps_div<fd::KL>(rp, z, y, V, st, scale, g, ce);
    case fd::REVERSE_KL: return row_sweeps_div<fd::REVERSE_KL>(rp, z, y, V, st, scale, g, ce);
    case fd::JSD: return row_sweeps_div<fd::JSD>(rp, z, y, V, st, scale, g, ce);
    case fd::TVD: return row_sweeps_div<fd::TVD>(rp, z, y, V, st, scale, g, ce);
    case fd::SKEW_KL: return row_sweeps_div<fd::SKEW_KL>(rp, z, y, V, st, scale, g, ce);
    case fd::SKEW_REVERSE_KL: return row_sweeps_div<fd::SKEW_REVERSE_KL>(rp, z, y, V, st, scale, g, ce);
    default: return row_sweeps_div<fd::MSE>(rp, z, y, V, st, scale, g, ce);
  }
}

template <typename S, typename Tt>
void distill_rows(const at::Tensor& student, const at::Tensor& teacher, const int64_t* labels, float scale,
                  const RowParams& rp, int64_t ignore_index, at::Tensor& loss, at::Tensor* grad) {
  const int64_t N = student.size(0), V = student.size(1);
  const int64_t ss = student.stride(0), ts = teacher.stride(0);
  const S* sp = student.data_ptr<S>();
  const Tt* tp = teacher.data_ptr<Tt>();
  float* lp = loss.data_ptr<float>();
  S* gp = grad ? grad->data_ptr<S>() : nullptr;
  const bool ce = rp.hard_weight != 0.0f && labels != nullptr;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> zb(std::is_same_v<S, float> ? 0 : V), yb(std::is_same_v<Tt, float> ? 0 : V);
    std::vector<float> gb(gp != nullptr && !std::is_same_v<S, float> ? V : 0);
    const bool soft = rp.div != fd::MSE;  // mse compares raw logits: no softmax
    const bool stats = soft || ce;  // needs row maxima (mse without the hard-label term does not)
    std::vector<float> es(soft ? V : 0), et(soft ? V : 0), ez(ce ? V : 0);  // exp(x * a - max) per softmax
    auto poison_row = [&](int64_t r, S* grow) {  // the NaN rule: NaN loss and gradient row
      lp[r] = NAN;
      if (grow) std::fill(grow, grow + V, S(NAN));
    };
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = labels ? labels[r] : 0;
      S* grow = gp ? gp + r * V : nullptr;
      if (labels && label == ignore_index) {
        lp[r] = 0.0f;
        if (grow) std::fill(grow, grow + V, S(0));
        continue;
      }
      const float* z = widen(sp + r * ss, V, zb);
      const float* y = widen(tp + r * ts, V, yb);
      RowStats st;
      float mz = 0.0f, my = 0.0f;
      if (stats) row_max(z, y, V, &mz, &my);
      if (soft) {
        st.s = row_softmax(z, V, rp.inv_t, mz, es.data());
        st.t = row_softmax(y, V, rp.inv_t, my, et.data());
      }
      if (ce) st.z = rp.ce_needs_own_softmax || rp.div == fd::MSE ? row_softmax(z, V, 1.0f, mz, ez.data()) : st.s;
      if (st.s.poisoned || st.t.poisoned || st.z.poisoned) {  // NaN or +inf: NaN loss and gradient
        poison_row(r, grow);
        continue;
      }
      float* g = nullptr;
      if (grow) g = std::is_same_v<S, float> ? reinterpret_cast<float*>(grow) : gb.data();
      float D = row_divergence(rp, z, y, V, st, scale, g, ce);
      // mse (no softmax of the teacher): a poisoned row has a NaN or infinite D (also from -inf: scan)
      if (!soft && !(D < INFINITY) && (row_poisoned(z, V) || row_poisoned(y, V))) {
        poison_row(r, grow);
        continue;
      }
      float row = rp.soft_coef * D;
      if (ce) {
        row += rp.hard_weight * ((st.z.max - z[label]) + st.z.log_sum);
        if (g) g[label] -= rp.hard_weight * scale;
      }
      lp[r] = row * scale;
      if (grow && !std::is_same_v<S, float>) {
        for (int64_t k = 0; k < V; ++k) grow[k] = static_cast<S>(g[k]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> distill_loss_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& labels,
                                                    const at::Tensor& scale, int64_t divergence,
                                                    double temperature, double weight, double soft_weight,
                                                    double hard_weight, bool scale_t2, int64_t ignore_index,
                                                    bool compute_grad) {
  check_distill_inputs(student, teacher, labels, scale, divergence, temperature, weight, at::kCPU);
  const int64_t N = student.size(0), V = student.size(1);
  at::Tensor lab_c;
  const int64_t* lab = cpu_labels(labels, V, hard_weight, ignore_index, lab_c);
  auto [loss, grad] = new_loss_and_grad(student, N, V, compute_grad);
  const RowParams rp = fd::make_row_params((int)divergence, temperature, weight, (float)soft_weight,
                                           (float)hard_weight, scale_t2, V);
  const float sc = scale.to(at::kFloat).item<float>();  // CPU tensor: no device sync
  at::Tensor* gptr = compute_grad ? &grad : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "distill_loss_cpu", [&] {
    using S = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, teacher.scalar_type(), "distill_loss_cpu", [&] {
      if constexpr (std::is_same_v<S, double> || std::is_same_v<scalar_t, double>) {
        TORCH_CHECK_TYPE(false, "distill_loss_cpu: float64 logits are not supported (use float32/bf16/fp16)");
      } else {
        distill_rows<S, scalar_t>(student, teacher, lab, sc, rp, ignore_index, loss, gptr);
      }
    });
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) { m.impl("distill_loss_cpu", &distill_loss_cpu); }

}  // namespace fastdistill
