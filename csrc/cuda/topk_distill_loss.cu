// CUDA kernel of fastdistill::topk_distill_loss_cuda: the math of csrc/cpu/topk_distill_loss.cpp, one
// thread block per row. The k ids and log-probs are read from global memory on each pass over the k
// categories (cheap: k is small next to V). Only the bucket tail and the hard-label term sweep the
// student row. Bucket tail: a shared-memory bit per vocabulary entry marks the ids, so one sweep
// accumulates both the full softmax of s = z / T and the rest's own (max, sum): log q_rest is then exact
// even when the rest is a tiny fraction of the row (a +1e4 spike on an id), with no recomputation.
// Reductions: per-thread partials (double for sums), fixed butterflies: no atomics on values (the mask
// uses atomicOr, which is order-free), bitwise deterministic. Torch-free: compiles with a bare `nvcc -c`.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fd_cuda_topk.h"
#include "fd_divergence.h"

namespace fastdistill {
namespace {

using namespace sparse_teacher;
using cuda_launch::SparseTeacher;

struct Cat {  // one category: p, q, their logs and delta = lp - lq
  float p, q, lp, lq, delta;
};

// Row statistics of the categories. bucket: a0, a1 = max and log-sum of softmax(s) over V, inv_sum =
// 1 / its sum; renormalize: (a0, a1) those of the k log-probs, (b0, b1) those of the k gathered s.
struct Stats {
  float a0, a1, b0, b1, inv_sum;
};

__device__ __forceinline__ Cat id_category(bool bucket, const Stats& st, float s, float lpv) {
  Cat c;
  if (bucket) {
    c.lp = lpv;
    c.p = expf(lpv);
    c.lq = (s - st.a0) - st.a1;
    c.q = expf(s - st.a0) * st.inv_sum;
  } else {
    c.lp = (lpv - st.a0) - st.a1;
    c.lq = (s - st.b0) - st.b1;
    c.p = expf(c.lp);
    c.q = expf(c.lq);
  }
  c.delta = c.lp - c.lq;  // from the two log-probs: exact near 0 (lp - s would subtract a ~1e4 logit)
  return c;
}

__device__ __forceinline__ bool is_taken(const uint32_t* taken, int64_t j) { return (taken[j >> 5] >> (j & 31)) & 1u; }

template <typename S>
__global__ void __launch_bounds__(kThreads)
    topk_distill_loss_kernel(const S* __restrict__ student, int64_t ss, SparseTeacher t,
                             const int64_t* __restrict__ labels, const float* __restrict__ scale_ptr,
                             float* __restrict__ loss, S* __restrict__ grad, int64_t V, fd::RowParams rp, bool bucket,
                             int64_t ignore_index, bool ce) {
  extern __shared__ uint32_t taken[];  // bucket: bit j set when j is one of the row's ids
  __shared__ SoftmaxAcc sm_acc[kWarps];
  __shared__ double sm_sum[kWarps];
  const auto [row, z, g, label, tid] = block_row(student, ss, grad, V, labels);
  if (labels != nullptr && label == ignore_index) return zero_row(g, V, loss + row);  // ignored row: ids unread
  const int64_t K = t.K;
  const float it = rp.inv_t;
  const bool full = bucket || ce;  // reads the whole student row
  const bool own_z = ce && (!bucket || rp.ce_needs_own_softmax);
  const bool has_rest = bucket && K < V;  // k == V: no rest bucket

  // Pass over the ids: range, duplicates (bucket: the mask tells them), the NaN rule at the ids.
  if (bucket) {
    for (int64_t w = tid; w < (V + 31) / 32; w += kThreads) taken[w] = 0u;
    __syncthreads();
  }
  int bad = 0;
  for (int64_t i = tid; i < K; i += kThreads) {
    const int64_t id = load_id(t, row, i);
    if (id < 0 || id >= V) {  // a kernel cannot raise: NaN row (the cpu backend raises)
      bad = 1;
      continue;
    }
    if (bucket) {
      const uint32_t bit = 1u << (id & 31);
      bad |= (atomicOr(&taken[id >> 5], bit) & bit) != 0u;  // a repeated id: NaN row too
    }
    bad |= (int)fd::poisons_row(__fmul_rn(to_f(z[id]), it)) | (int)fd::poisons_row(load_lp(t, row, i));
  }
  if (__syncthreads_or(bad)) {  // also orders the mask's writes before the reads below
    poison_row(g, V, loss + row);
    return;
  }

  // Sweep of the student row: softmax(s) over V and over the rest (bucket), softmax(z) (hard label).
  SoftmaxAcc as{-INFINITY, 0.0}, ar{-INFINITY, 0.0}, az{-INFINITY, 0.0};
  if (full) {
    for (int64_t j = tid; j < V; j += kThreads) {
      const float zj = to_f(z[j]);
      bad |= (int)fd::poisons_row(zj);
      if (bucket) {
        const float x = __fmul_rn(zj, it);
        acc_add(as, x);
        if (!is_taken(taken, j)) acc_add(ar, x);
      }
      if (own_z) acc_add(az, zj);
    }
    if (__syncthreads_or(bad)) {  // NaN or +inf in the row
      poison_row(g, V, loss + row);
      return;
    }
    if (bucket) as = block_merge(as, sm_acc);
    if (has_rest) ar = block_merge(ar, sm_acc);
    az = own_z ? block_merge(az, sm_acc) : as;  // bucket at T = 1: the same softmax
    if ((bucket ? as.m : az.m) == -INFINITY) {  // all -inf: undefined softmax
      poison_row(g, V, loss + row);
      return;
    }
  }

  Stats st{};
  double P_ids = 0.0;
  if (bucket) {
    st.a0 = as.m;
    st.a1 = (float)log(as.s);
    st.inv_sum = (float)(1.0 / as.s);
    for (int64_t i = tid; i < K; i += kThreads) P_ids += (double)expf(load_lp(t, row, i));
    P_ids = block_sum(P_ids, sm_sum);
  } else {  // both distributions renormalized over the k ids
    float mt = -INFINITY, ms = -INFINITY;
    for (int64_t i = tid; i < K; i += kThreads) {
      mt = fmaxf(mt, load_lp(t, row, i));
      ms = fmaxf(ms, __fmul_rn(to_f(z[load_id(t, row, i)]), it));
    }
    mt = block_max(mt, sm_sum);
    ms = block_max(ms, sm_sum);
    double sum_t = 0.0, sum_q = 0.0;
    for (int64_t i = tid; i < K; i += kThreads) {
      sum_t += (double)expf(load_lp(t, row, i) - mt);
      sum_q += (double)expf(__fmul_rn(to_f(z[load_id(t, row, i)]), it) - ms);
    }
    st.a0 = mt;
    st.a1 = (float)log(block_sum(sum_t, sm_sum));
    st.b0 = ms;
    st.b1 = (float)log(block_sum(sum_q, sm_sum));
  }
  Cat rest{0.0f, 0.0f, -INFINITY, -INFINITY, 0.0f};
  if (has_rest) {  // p_rest clamped: fp16-rounded log-probs can sum slightly above 1
    const double p_rest = fmax(0.0, 1.0 - P_ids);
    rest.p = (float)p_rest;
    rest.lp = p_rest > 0.0 ? (float)log(p_rest) : -INFINITY;
    rest.lq = ar.m == -INFINITY ? -INFINITY : (float)((((double)ar.m - as.m) + log(ar.s)) - log(as.s));
    rest.q = expf(rest.lq);
    rest.delta = (rest.p > 0.0f || rest.q > 0.0f) ? rest.lp - rest.lq : 0.0f;
  }

  // D, C and P = sum p over the categories.
  double D = 0.0, C = 0.0, P = 0.0;
  for (int64_t i = tid; i < K; i += kThreads) {
    const Cat c = id_category(bucket, st, __fmul_rn(to_f(z[load_id(t, row, i)]), it), load_lp(t, row, i));
    float d, cc;
    fd::row_terms(rp, c.p, c.q, c.lp, c.lq, c.delta, d, cc);
    D += d;
    C += cc;
    P += c.p;
  }
  if (has_rest && tid == 0) {
    float d, cc;
    fd::row_terms(rp, rest.p, rest.q, rest.lp, rest.lq, rest.delta, d, cc);
    D += d;
    C += cc;
    P += rest.p;
  }
  D = block_sum(D, sm_sum);
  if (fd::needs_row_pass(rp.div)) C = block_sum(C, sm_sum);
  if (rp.div == fd::KL) P = block_sum(P, sm_sum);  // only kl's gradient uses P (grad_s_any_mass)

  const float scale = *scale_ptr;
  const float zls = ce ? (float)log(az.s) : 0.0f;  // log-sum of softmax(z), around az.m
  write_row_loss(loss + row, rp, D, ce, z, label, V, az.m, zls, scale);
  if (g == nullptr) return;

  // Gradient: every entry (its share of the rest bucket, or 0, plus the hard-label term), then, after a
  // barrier, the ids overwritten.
  const float Df = (float)D, Cf = (float)C, Pf = (float)P;
  const float gc = rp.grad_coef * scale, hc = rp.hard_weight * scale;
  float ae = 0.0f;  // rest entry j: ae * exp(s_j - ar.m) = gc * g_rest * (its share of the rest)
  if (has_rest && ar.m != -INFINITY) {
    ae = (float)(gc * fd::grad_s_any_mass(rp, rest.p, rest.q, rest.lp, rest.lq, rest.delta, Df, Cf, Pf) / ar.s);
  }
  for (int64_t j = tid; j < V; j += kThreads) {
    float gj = 0.0f;
    if (full) {
      const float zj = to_f(z[j]);
      if (ae != 0.0f && !is_taken(taken, j)) gj = ae * expf(__fmul_rn(zj, it) - ar.m);
      if (ce) gj += hard_grad(hc, zj, az.m, zls, j, label);
    }
    g[j] = from_f<S>(gj);
  }
  __syncthreads();  // the ids' entries below land after the sweep's
  for (int64_t i = tid; i < K; i += kThreads) {
    const int64_t id = load_id(t, row, i);
    const float zi = to_f(z[id]);
    const Cat c = id_category(bucket, st, __fmul_rn(zi, it), load_lp(t, row, i));
    float gi = gc * fd::grad_s_any_mass(rp, c.p, c.q, c.lp, c.lq, c.delta, Df, Cf, Pf);
    if (ce) gi += hard_grad(hc, zi, az.m, zls, id, label);
    g[id] = from_f<S>(gi);
  }
}

size_t mask_bytes(int64_t V) { return (size_t)((V + 31) / 32) * sizeof(uint32_t); }

template <typename S>
int launch_typed(const void* student, int64_t ss, const SparseTeacher& t, const int64_t* labels, const float* scale,
                 float* loss, void* grad, int64_t N, int64_t V, const fd::RowParams& rp, bool bucket,
                 int64_t ignore_index, bool ce, cudaStream_t stream) {
  const size_t smem = bucket ? mask_bytes(V) : 0;
  auto kernel = topk_distill_loss_kernel<S>;
  // Near or above the default 48 KiB (static + dynamic; V > 327680): opt in (a host-side attribute, no sync).
  if (smem > 40 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return (int)err;
  }
  kernel<<<(unsigned)N, kThreads, smem, stream>>>(static_cast<const S*>(student), ss, t, labels, scale, loss,
                                                  static_cast<S*>(grad), V, rp, bucket, ignore_index, ce);
  return (int)cudaGetLastError();
}

}  // namespace

namespace cuda_launch {

int64_t topk_bucket_max_vocab() {
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 0;
  cudaFuncAttributes attr{};  // the kernel's static shared memory (reduction scratch) comes off the limit
  if (cudaFuncGetAttributes(&attr, topk_distill_loss_kernel<float>) != cudaSuccess) return 0;
  return ((int64_t)optin - (int64_t)attr.sharedSizeBytes) / 4 * 32;
}

int topk_distill_loss(const void* student, int64_t student_stride, DType student_dtype, const SparseTeacher& teacher,
                      const int64_t* labels, const float* scale, float* loss, void* grad, int64_t N, int64_t V,
                      const fd::RowParams& rp, bool bucket, int64_t ignore_index, bool hard_label_term,
                      cudaStream_t stream) {
  if (N == 0) return 0;
  switch (student_dtype) {
    case F32:
      return launch_typed<float>(student, student_stride, teacher, labels, scale, loss, grad, N, V, rp, bucket,
                                 ignore_index, hard_label_term, stream);
    case BF16:
      return launch_typed<__nv_bfloat16>(student, student_stride, teacher, labels, scale, loss, grad, N, V, rp,
                                         bucket, ignore_index, hard_label_term, stream);
    default:
      return launch_typed<__half>(student, student_stride, teacher, labels, scale, loss, grad, N, V, rp, bucket,
                                  ignore_index, hard_label_term, stream);
  }
}

}  // namespace cuda_launch
}  // namespace fastdistill
