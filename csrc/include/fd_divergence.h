// Per-element math of the distillation divergences, shared by the CPU and CUDA kernels.
//
// Notation (per row): p = softmax(teacher / T), q = softmax(student / T), lp = log p, lq = log q,
// delta = lp - lq.
// A row is processed in up to three sweeps over the vocabulary:
//   1. softmax statistics (max, sum of exp) of student/T, teacher/T and, for the hard-label term
//      at T != 1, the raw student logits;
//   2. (divergences whose gradient needs a row constant) D = sum d_k and C = sum c_k;
//   3. the gradient w.r.t. the temperature-scaled student logits s = z / T, and D for KL/MSE.
// The Triton kernel (fastdistill/kernels/distill_loss.py) implements the same formulas.
#pragma once

#include "fd_math.h"

namespace fd {

// Codes shared with fastdistill/ops/distill_loss.py (DIVERGENCE_CODES).
enum Divergence : int {
  KL = 0,
  REVERSE_KL = 1,
  JSD = 2,
  TVD = 3,
  SKEW_KL = 4,
  SKEW_REVERSE_KL = 5,
  MSE = 6,
};

FD_HD bool needs_row_pass(int div) { return div != KL && div != MSE; }

// Everything a row needs besides its data; built once on the host.
struct RowParams {
  int div;
  float inv_t;       // 1 / temperature
  float w;           // beta (jsd) or skew (skew_*)
  float w1m;         // 1 - w, rounded once from double (1 - (float)w loses digits near w = 1)
  float log_w;       // log(w), -inf at w == 0
  float log_1mw;     // log(1 - w), -inf at w == 1
  float soft_coef;   // soft_weight * T^2 (scale_t2) — multiplies D in the row loss
  float grad_coef;   // d(row loss)/d(raw student) per unit dD/ds: soft_coef / T, or 2 * soft_weight / V (mse)
  float inv_v;       // 1 / V (mse)
  float hard_weight;
  bool ce_needs_own_softmax;  // hard-label term at T != 1 needs softmax(raw student)
};

inline RowParams make_row_params(int div, double temperature, double w, float soft_weight, float hard_weight,
                                 bool scale_t2, int64_t vocab) {
  RowParams p;
  p.div = div;
  p.inv_t = (float)(1.0 / temperature);
  p.w = (float)w;
  p.w1m = (float)(1.0 - w);
  p.log_w = (float)log(w);
  p.log_1mw = (float)log1p(-w);
  p.inv_v = 1.0f / (float)vocab;
  if (div == MSE) {
    p.soft_coef = soft_weight;
    p.grad_coef = 2.0f * soft_weight * p.inv_v;
  } else {
    p.soft_coef = (float)(scale_t2 ? soft_weight * temperature * temperature : soft_weight);
    p.grad_coef = (float)(p.soft_coef / temperature);
  }
  p.hard_weight = hard_weight;
  p.ce_needs_own_softmax = hard_weight != 0.0f && temperature != 1.0;
  return p;
}

// log(e^(a + log_wa) + e^(b + log_wb)); -inf when both terms vanish (never NaN).
FD_HD float log_mix(float a, float log_wa, float b, float log_wb) {
  float x = a + log_wa, y = b + log_wb;
  float mx = max_f32(x, y);
  if (mx == -INFINITY) return -INFINITY;
  return mx + log1p_unit(exp_f32(min_f32(x, y) - mx));
}

// delta = log p - log q of one element from whichever of its two equal forms rounds less:
// raw - kd, with raw = (teacher - student) / T and kd the row constant (exact where the logits agree
// far below both maxes, where lp - lq would subtract two large log-probabilities), or lp - lq (exact
// near a max: where one model spikes to 1e4 and the other does not, raw - kd loses ~1e-3). Each
// form's rounding error scales with the magnitude of its operands. NaN and infinities come out as
// from either form.
FD_HD float log_ratio(float lp, float lq, float raw, float kd) {
  return fabsf(raw) + fabsf(kd) <= fabsf(lp) + fabsf(lq) ? raw - kd : lp - lq;
}

// log(m / p) and log(m / q) for the mixture m each divergence compares against, from
// delta = log(p / q) (log_ratio): jsd and skew_kl m = w p + (1-w) q, skew_reverse_kl m = (1-w) p + w q.
// The exponent stays <= 0 on either side of delta = 0, and an infinite delta (one model has -inf
// there) still gives the finite ratio on the other side.
FD_HD void log_m_ratios(const RowParams& rp, float delta, float& lmp, float& lmq) {
  const bool srkl = rp.div == SKEW_REVERSE_KL;
  const float lwp = srkl ? rp.log_1mw : rp.log_w, lwq = srkl ? rp.log_w : rp.log_1mw;
  const bool pos = delta > 0.0f;
  const float L = log_mix(pos ? 0.0f : delta, lwp, pos ? -delta : 0.0f, lwq);
  lmp = pos ? L : L - delta;
  lmq = pos ? L + delta : L;
}

FD_HD float sign_f(float x) { return (float)((x > 0.0f) - (x < 0.0f)); }

// Per element: p, q and their logs lp, lq, delta = lp - lq (see log_m_ratios). Callers pass p and q
// because the CPU kernel keeps them from sweep 1 instead of recomputing exp(lp), exp(lq).
// Sweep 2: contributions d_k (to the divergence D) and c_k (to the row constant C).
FD_HD void row_terms(const RowParams& rp, float p, float q, float lp, float lq, float delta, float& d, float& c) {
  switch (rp.div) {
    case KL:  // lp - lq rather than delta: exactly 0 where p == q (e.g. V = 1), like the reference
      d = p > 0.0f ? p * (lp - lq) : 0.0f;
      c = 0.0f;
      break;
    case REVERSE_KL:
      d = q > 0.0f ? q * (lq - lp) : 0.0f;
      c = 0.0f;
      break;
    case JSD: {
      float lmp, lmq;
      log_m_ratios(rp, delta, lmp, lmq);
      float kq = q > 0.0f ? -q * lmq : 0.0f;  // q log(q / m)
      d = (p > 0.0f ? -rp.w * p * lmp : 0.0f) + rp.w1m * kq;
      c = kq;
      break;
    }
    case TVD:
      d = 0.5f * fabsf(p - q);
      c = 0.5f * q * sign_f(q - p);
      break;
    case SKEW_KL: {
      float lmp, lmq;
      log_m_ratios(rp, delta, lmp, lmq);
      d = p > 0.0f ? -p * lmp : 0.0f;
      c = p > 0.0f ? exp_f32(lq - lmp) : 0.0f;  // p q / m
      break;
    }
    case SKEW_REVERSE_KL: {
      float lmp, lmq;
      log_m_ratios(rp, delta, lmp, lmq);
      d = q > 0.0f ? -q * lmq : 0.0f;
      c = q > 0.0f ? exp_f32(lq - lmq) : 0.0f;  // q^2 / m
      break;
    }
    default:
      d = 0.0f;
      c = 0.0f;
  }
}

// Sweep 3: d D / d s_k (s = student / T), given the row's D and C from sweep 2.
FD_HD float grad_s(const RowParams& rp, float p, float q, float lp, float lq, float delta, float D, float C) {
  float lmp = 0.0f, lmq = 0.0f;
  if (rp.div == JSD || rp.div == SKEW_KL || rp.div == SKEW_REVERSE_KL) log_m_ratios(rp, delta, lmp, lmq);
  switch (rp.div) {
    case KL:
      return q - p;
    case REVERSE_KL:
      return q > 0.0f ? q * ((lq - lp) - D) : 0.0f;
    case JSD:
      return q > 0.0f ? -rp.w1m * q * (lmq + C) : 0.0f;
    case TVD:
      return q * (0.5f * sign_f(q - p) - C);
    case SKEW_KL: {
      float r = p > 0.0f ? exp_f32(lq - lmp) : 0.0f;
      return -rp.w1m * (r - q * C);
    }
    case SKEW_REVERSE_KL: {
      if (!(q > 0.0f)) return 0.0f;
      return -q * lmq - rp.w * exp_f32(lq - lmq) - q * (D - rp.w * C);
    }
    default:
      return 0.0f;
  }
}

// grad_s for a teacher whose probabilities may not sum to exactly 1 (topk_distill_loss, bucket tail:
// rounded log-probs), P = sum p. Only kl's formula assumed P = 1 (q P - p in general); the others
// hold for any p because they use the row constants D and C instead.
FD_HD float grad_s_any_mass(const RowParams& rp, float p, float q, float lp, float lq, float delta, float D, float C,
                            float P) {
  return rp.div == KL ? q * P - p : grad_s(rp, p, q, lp, lq, delta, D, C);
}

}  // namespace fd
