// CPU kernel of fastdistill::topk_distill_loss_cpu: distillation from a teacher's top-k log-probs.
//
// Rows run in parallel (at::parallel_for, OpenMP). Per row the k ids are checked (range, duplicates)
// against a per-thread byte mask of the vocabulary, which also tells the rest bucket's members
// apart. The divergence runs over k (+1) categories with fd::row_terms / fd::grad_s_any_mass; only
// the bucket tail and the hard-label term sweep the whole student row (vectorized loops as in
// fd_cpu_rows.h). A bad id sets a flag inside the parallel loop; the error is raised after it.
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

// A rest sum below this (relative to the row max's term, 1) is recomputed around the rest's own
// max: a student spike of +1e4 on a top-k id underflows every other exp to 0, yet the rest bucket
// still has a finite log-probability and a gradient of order p_rest.
constexpr double kTinyRest = 1e-20;

// Sum of e over the entries no id takes: the chunk sums, with the (at most k) chunks holding an id
// summed again without them. Never total - (top-k terms): that cancels when the rest is tiny.
// `hit` (a byte per chunk) is all zero on entry and on return.
double rest_sum(const float* e, const float* cs, const uint8_t* taken, const int64_t* id, int64_t K, int64_t V,
                uint8_t* hit) {
  for (int64_t i = 0; i < K; ++i) hit[id[i] / kChunk] = 1;
  double rest = 0.0;
  for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
    const int64_t c = j0 / kChunk;
    if (!hit[c]) {
      rest += cs[c];
      continue;
    }
    hit[c] = 0;
    float s = 0.0f;
    for (int64_t j = j0; j < std::min(V, j0 + kChunk); ++j) s += taken[j] ? 0.0f : e[j];
    rest += s;
  }
  return rest;
}

// Marks the ids in `taken`; false (and nothing left marked) on an out-of-range or repeated id.
bool mark_ids(const int64_t* id, int64_t K, int64_t V, uint8_t* taken) {
  int64_t i = 0;
  for (; i < K; ++i) {
    const int64_t v = id[i];
    if (v < 0 || v >= V || taken[v]) break;
    taken[v] = 1;
  }
  if (i == K) return true;
  for (int64_t j = 0; j < i; ++j) taken[id[j]] = 0;
  return false;
}

struct Config {
  fd::RowParams rp;
  bool bucket;
  int64_t V, K, ignore_index;
  float scale;  // of every row's loss and gradient
};

struct Softmax {  // of one row: log p_j = (x_j * a - max) - log_sum, p_j = e_j * inv_sum
  float max = 0.0f, log_sum = 0.0f, inv_sum = 0.0f;
  const float* e = nullptr;
};

// Per-thread buffers of the k (+1) categories.
struct Categories {
  std::vector<float> p, q, lp, lq, delta, g;
  explicit Categories(int64_t n) : p(n), q(n), lp(n), lq(n), delta(n), g(n) {}
};

template <typename S>
void topk_rows(const at::Tensor& student, const TeacherRows& teacher, const int64_t* labels, const Config& cf,
               at::Tensor& loss, at::Tensor* grad, std::atomic<bool>& bad_ids) {
  const int64_t N = student.size(0), V = cf.V, K = cf.K, ss = student.stride(0);
  const S* sp = student.data_ptr<S>();
  float* lossp = loss.data_ptr<float>();
  S* gp = grad ? grad->data_ptr<S>() : nullptr;
  const fd::RowParams& rp = cf.rp;
  const float it = rp.inv_t;
  const bool ce = rp.hard_weight != 0.0f && labels != nullptr;
  const bool full = cf.bucket || ce;  // reads the whole student row
  const bool own_z = ce && (!cf.bucket || rp.ce_needs_own_softmax);
  const bool has_rest = cf.bucket && K < V;  // k == V: every token is a top-k id, no rest bucket
  constexpr bool f32 = std::is_same_v<S, float>;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(full ? V : K, 1));

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> zb(full && !f32 ? V : 0), gb(gp != nullptr && !f32 ? V : 0);
    std::vector<float> e(cf.bucket ? V : 0), ez(own_z ? V : 0), er;  // er: rest around its own max (rare)
    std::vector<uint8_t> taken(V, 0), hit(full ? (V + kChunk - 1) / kChunk : 0, 0);
    std::vector<float> cs(hit.size());  // chunk sums of the exp terms
    std::vector<int64_t> id(K);
    std::vector<float> lpv(K), sI(K);
    Categories cat(K + 1);
    auto poison_row = [&](int64_t r, S* grow, bool marked) {  // NaN loss and gradient row
      lossp[r] = NAN;
      if (grow) std::fill(grow, grow + V, S(NAN));
      for (int64_t i = 0; marked && i < K; ++i) taken[id[i]] = 0;
    };
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = labels ? labels[r] : 0;
      S* grow = gp ? gp + r * V : nullptr;
      if (labels && label == cf.ignore_index) {  // ids of ignored rows are never read
        lossp[r] = 0.0f;
        if (grow) std::fill(grow, grow + V, S(0));
        continue;
      }
      teacher.indices(r, K, id.data());
      if (!mark_ids(id.data(), K, V, taken.data())) {
        bad_ids.store(true, std::memory_order_relaxed);
        poison_row(r, grow, false);
        continue;
      }
      teacher.logprobs(r, K, lpv.data());
      const S* srow = sp + r * ss;
      const float* z = full ? widen(srow, V, zb) : nullptr;
      // The NaN rule (fd_math.h) over what the row reads: lp and z at the ids here; the whole student
      // row, when read (bucket, hard label), by its exp sums below (NaN exactly for NaN or +inf in it).
      bool poisoned = false;
      for (int64_t i = 0; i < K; ++i) {
        sI[i] = (z ? z[id[i]] : static_cast<float>(srow[id[i]])) * it;
        poisoned |= fd::poisons_row(sI[i]) | fd::poisons_row(lpv[i]);
      }
      const float mz = full ? row_max(z, V) : 0.0f;
      // All -inf (or -inf and NaN, which the plain-compare max may skip): undefined softmax.
      if (poisoned || (full && mz == -INFINITY)) { poison_row(r, grow, true); continue; }

      Softmax sm;
      int64_t nc = K;
      const float* rest_e = nullptr;
      double rest = 0.0;
      if (cf.bucket) {
        // Categories: p_i = exp(lp_i), q_i from the full softmax of z / T; rest p = max(0, 1 - sum p_i).
        sm.max = mz * it;
        const double total = exp_chunks(z, V, it, sm.max, e.data(), cs.data());
        if (total != total) { poison_row(r, grow, true); continue; }  // NaN or +inf in the row
        sm.log_sum = logf((float)total);
        sm.inv_sum = (float)(1.0 / total);
        sm.e = e.data();
        double p_ids = 0.0;
        for (int64_t i = 0; i < K; ++i) {
          cat.lp[i] = lpv[i];
          cat.p[i] = std::exp(lpv[i]);
          p_ids += cat.p[i];
          cat.lq[i] = (sI[i] - sm.max) - sm.log_sum;
          cat.q[i] = e[id[i]] * sm.inv_sum;
          cat.delta[i] = lpv[i] - cat.lq[i];
        }
        if (has_rest) {
          float shift = sm.max;
          rest_e = e.data();
          rest = rest_sum(e.data(), cs.data(), taken.data(), id.data(), K, V, hit.data());
          if (rest < kTinyRest) {
            float mr = -INFINITY;  // the rest's max (rare path)
            for (int64_t j = 0; j < V; ++j) mr = taken[j] ? mr : std::max(mr, z[j] * it);
            shift = mr == -INFINITY ? 0.0f : mr;  // all rest -inf: q_rest = 0 (rest stays 0)
            er.resize(V);
            exp_chunks(z, V, it, shift, er.data(), cs.data());  // ids above the shift may be inf: excluded
            rest = rest_sum(er.data(), cs.data(), taken.data(), id.data(), K, V, hit.data());
            rest_e = er.data();
          }
          const double p_rest = std::max(0.0, 1.0 - p_ids);
          cat.p[K] = (float)p_rest;
          cat.lp[K] = p_rest > 0.0 ? (float)std::log(p_rest) : -INFINITY;
          cat.lq[K] = rest > 0.0 ? (float)(((double)shift - sm.max) + std::log(rest) - std::log(total)) : -INFINITY;
          cat.q[K] = std::exp(cat.lq[K]);
          cat.delta[K] = (cat.p[K] > 0.0f || cat.q[K] > 0.0f) ? cat.lp[K] - cat.lq[K] : 0.0f;
          nc = K + 1;
        }
      } else {
        // Both distributions renormalized over the k ids (softmax of lp, softmax of z_I / T).
        const float mt = *std::max_element(lpv.begin(), lpv.end()), ms = *std::max_element(sI.begin(), sI.end());
        double st = 0.0, sq = 0.0;
        for (int64_t i = 0; i < K; ++i) {
          st += std::exp(lpv[i] - mt);
          sq += std::exp(sI[i] - ms);
        }
        const float ls_t = (float)std::log(st), ls_q = (float)std::log(sq);
        for (int64_t i = 0; i < K; ++i) {
          cat.lp[i] = (lpv[i] - mt) - ls_t;
          cat.lq[i] = (sI[i] - ms) - ls_q;
          cat.p[i] = std::exp(cat.lp[i]);
          cat.q[i] = std::exp(cat.lq[i]);
          // From the two log-probs: exact near 0 (lp - s would subtract a logit that may be ~1e4).
          cat.delta[i] = cat.lp[i] - cat.lq[i];
        }
      }

      double D = 0.0, C = 0.0, P = 0.0;
      for (int64_t c = 0; c < nc; ++c) {
        float d, cc;
        fd::row_terms(rp, cat.p[c], cat.q[c], cat.lp[c], cat.lq[c], cat.delta[c], d, cc);
        D += d;
        C += cc;
        P += cat.p[c];
      }
      float row = rp.soft_coef * (float)D;
      Softmax smz;  // of the raw student logits, for the hard-label term
      if (ce) {
        if (own_z) {
          const double total = exp_chunks(z, V, 1.0f, mz, ez.data(), cs.data());
          if (total != total) { poison_row(r, grow, true); continue; }  // NaN or +inf in the row
          smz = {mz, logf((float)total), (float)(1.0 / total), ez.data()};
        } else {
          smz = sm;  // bucket tail at T = 1: the same softmax
        }
        row += rp.hard_weight * ((smz.max - z[label]) + smz.log_sum);
      }
      lossp[r] = row * cf.scale;

      if (grow) {
        float* g = f32 ? reinterpret_cast<float*>(grow) : gb.data();
        const float gc = rp.grad_coef * cf.scale, hc = rp.hard_weight * cf.scale;
        for (int64_t c = 0; c < nc; ++c) {
          cat.g[c] = fd::grad_s_any_mass(rp, cat.p[c], cat.q[c], cat.lp[c], cat.lq[c], cat.delta[c], (float)D,
                                         (float)C, (float)P);
        }
        // A rest entry j gets (its share of the rest, e_j / rest) x the rest category's gradient.
        const float ae = nc > K && rest > 0.0 ? (float)(gc * cat.g[K] / rest) : 0.0f;
        fill_grad(g, V, nc > K ? rest_e : nullptr, ae, ce ? smz.e : nullptr, hc * smz.inv_sum);
        for (int64_t i = 0; i < K; ++i) {
          g[id[i]] = gc * cat.g[i] + (ce ? hc * (smz.e[id[i]] * smz.inv_sum) : 0.0f);
        }
        if (ce) g[label] -= hc;
        if constexpr (!f32) {
          for (int64_t j = 0; j < V; ++j) grow[j] = static_cast<S>(g[j]);
        }
      }
      for (int64_t i = 0; i < K; ++i) taken[id[i]] = 0;
    }
  });
}

// Called after the parallel loop saw a bad id: finds the first one and raises naming it.
[[noreturn]] void raise_bad_ids(const TeacherRows& teacher, const int64_t* labels, int64_t ignore_index, int64_t N,
                                int64_t K, int64_t V) {
  std::vector<int64_t> id(K);
  std::vector<uint8_t> seen(V, 0);
  for (int64_t r = 0; r < N; ++r) {
    if (labels && labels[r] == ignore_index) continue;
    teacher.indices(r, K, id.data());
    for (int64_t i = 0; i < K; ++i) {
      const int64_t v = id[i];
      TORCH_CHECK_VALUE(v >= 0 && v < V, "teacher_topk_indices: id ", v, " in row ", r, " is outside [0, V = ", V,
                        ")");
      TORCH_CHECK_VALUE(!seen[v], "teacher_topk_indices: id ", v, " appears twice in row ", r);
      seen[v] = 1;
    }
    for (int64_t i = 0; i < K; ++i) seen[id[i]] = 0;
  }
  TORCH_CHECK_VALUE(false, "teacher_topk_indices: invalid ids");  // not reached
}

std::tuple<at::Tensor, at::Tensor> topk_distill_loss_cpu(
    const at::Tensor& student, const at::Tensor& logprobs, const at::Tensor& indices,
    const std::optional<at::Tensor>& labels, const at::Tensor& scale, int64_t tail, int64_t divergence,
    double temperature, double weight, double soft_weight, double hard_weight, bool scale_t2, int64_t ignore_index,
    bool compute_grad) {
  // The student, labels and options are checked as for distill_loss (the student stands in for the teacher).
  check_distill_inputs(student, student, labels, scale, divergence, temperature, weight, at::kCPU);
  TORCH_CHECK_VALUE(divergence != fd::MSE, "divergence: mse is not supported by topk_distill_loss");
  TORCH_CHECK_VALUE(tail == 0 || tail == 1, "tail: unknown code ", tail, " (0 renormalize, 1 bucket)");
  const int64_t N = student.size(0), V = student.size(1);
  TORCH_CHECK_VALUE(logprobs.dim() == 2 && logprobs.size(0) == N, "teacher_topk_logprobs: expected shape (", N,
                    ", k), got ", logprobs.sizes());
  const int64_t K = logprobs.size(1);
  TORCH_CHECK_VALUE(K >= 1 && K <= V, "teacher_topk_logprobs: k = ", K, " must be in [1, V = ", V, "]");
  const TeacherRows teacher = teacher_rows(logprobs, indices, student, "teacher_topk");
  at::Tensor lab_c;
  const int64_t* lab = cpu_labels(labels, V, hard_weight, ignore_index, lab_c);
  auto [loss, grad] = new_loss_and_grad(student, N, V, compute_grad);
  const Config cf{fd::make_row_params((int)divergence, temperature, weight, (float)soft_weight, (float)hard_weight,
                                     scale_t2, V),
                  tail == 1, V, K, ignore_index,
                  scale.to(at::kFloat).item<float>()};  // CPU tensor: no device sync
  std::atomic<bool> bad_ids{false};
  at::Tensor* gptr = compute_grad ? &grad : nullptr;

  for_kernel_float(student.scalar_type(),
                   [&](auto s) { topk_rows<decltype(s)>(student, teacher, lab, cf, loss, gptr, bad_ids); });
  if (bad_ids.load()) raise_bad_ids(teacher, lab, ignore_index, N, K, V);
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) { m.impl("topk_distill_loss_cpu", &topk_distill_loss_cpu); }

}  // namespace fastdistill
