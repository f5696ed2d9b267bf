// CUDA kernel of fastdistill::sampled_distill_loss_cuda (RS-KD, estimator "counts"), one thread block
// per row. With draws x_1..x_k, lp_j = log p_T(x_j), q = softmax(z / T) over the full V and
// coef = soft_coef:
//   row  = coef * mean_j (lp_j - log q(x_j)) + hard_weight * CE(z, label)
//   grad = coef / T * (q - p_hat) + the hard-label term,  p_hat(x) = #{j : x_j = x} / k.
// One sweep for the softmax statistics, a pass over the draws for the loss, a gradient sweep writing
// every entry, then (after a barrier) the drawn entries rewritten in fp32 with their counts: a repeated
// id is written by each of its draws with the same bits, so duplicates need no atomics and the result
// is deterministic. Counts: binary search when the row's ids are sorted (as the sampler stores them),
// else a scan over the k draws. Torch-free: compiles with a bare `nvcc -c`.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fd_cuda_topk.h"
#include "fd_divergence.h"

namespace fastdistill {
namespace {

using namespace sparse_teacher;
using cuda_launch::SparseTeacher;

// #{j : x_j == id} over the row's k draws.
__device__ int64_t count_draws(const SparseTeacher& t, int64_t row, int64_t id, bool sorted) {
  const int64_t K = t.K;
  if (!sorted) {
    int64_t n = 0;
    for (int64_t j = 0; j < K; ++j) n += load_id(t, row, j) == id;
    return n;
  }
  int64_t lo = 0, hi = K;  // first draw >= id
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (load_id(t, row, mid) < id) lo = mid + 1;
    else hi = mid;
  }
  int64_t end = lo, top = K;  // first draw > id
  while (end < top) {
    const int64_t mid = (end + top) / 2;
    if (load_id(t, row, mid) <= id) end = mid + 1;
    else top = mid;
  }
  return end - lo;
}

// Min 1 block per SM: without it nvcc 13's ptxas aims at 3 blocks/SM on sm_86/89 (40 registers) and spills.
template <typename S>
__global__ void __launch_bounds__(kThreads, 1)
    sampled_distill_loss_kernel(const S* __restrict__ student, int64_t ss, SparseTeacher t,
                                const int64_t* __restrict__ labels, const float* __restrict__ scale_ptr,
                                float* __restrict__ loss, S* __restrict__ grad, int64_t V, fd::RowParams rp,
                                int64_t ignore_index, bool ce) {
  __shared__ SoftmaxAcc sm_acc[kWarps];
  __shared__ double sm_sum[kWarps];
  const auto [row, z, g, label, tid] = block_row(student, ss, grad, V, labels);
  if (labels != nullptr && label == ignore_index) return zero_row(g, V, loss + row);  // its draws are never read
  const int64_t K = t.K;
  const float it = rp.inv_t;
  const bool own_z = ce && rp.ce_needs_own_softmax;

  // The NaN rule: an id outside [0, V), NaN/+inf or -inf (a drawn token has probability > 0) in the
  // log-probs, NaN/+inf in the student row.
  int bad = 0, unsorted = 0;
  for (int64_t i = tid; i < K; i += kThreads) {
    const int64_t id = load_id(t, row, i);
    const float lpv = load_lp(t, row, i);
    bad |= (int)(id < 0 || id >= V) | (int)fd::poisons_row(lpv) | (int)(lpv == -INFINITY);
    if (i > 0) unsorted |= (int)(load_id(t, row, i - 1) > id);
  }
  SoftmaxAcc as{-INFINITY, 0.0}, az{-INFINITY, 0.0};
  for (int64_t j = tid; j < V; j += kThreads) {
    const float zj = to_f(z[j]);
    bad |= (int)fd::poisons_row(zj);
    acc_add(as, __fmul_rn(zj, it));
    if (own_z) acc_add(az, zj);
  }
  if (__syncthreads_or(bad)) {
    poison_row(g, V, loss + row);
    return;
  }
  const bool sorted = !__syncthreads_or(unsorted);
  as = block_merge(as, sm_acc);
  az = own_z ? block_merge(az, sm_acc) : as;  // T = 1: the same softmax
  if (as.m == -INFINITY) {  // all -inf: undefined softmax
    poison_row(g, V, loss + row);
    return;
  }
  const float ls = (float)log(as.s), zls = (float)log(az.s);

  double D = 0.0;  // sum_j (lp_j - log q(x_j))
  for (int64_t i = tid; i < K; i += kThreads) {
    const float lq = (__fmul_rn(to_f(z[load_id(t, row, i)]), it) - as.m) - ls;
    D += (double)(load_lp(t, row, i) - lq);
  }
  D = block_sum(D, sm_sum) / (double)K;

  const float scale = *scale_ptr;
  write_row_loss(loss + row, rp, D, ce, z, label, V, az.m, zls, scale);
  if (g == nullptr) return;

  const float gc = rp.grad_coef * scale, hc = rp.hard_weight * scale, inv_k = (float)(1.0 / (double)K);
  for (int64_t j = tid; j < V; j += kThreads) {
    const float zj = to_f(z[j]);
    float gj = gc * expf((__fmul_rn(zj, it) - as.m) - ls);
    if (ce) gj += hard_grad(hc, zj, az.m, zls, j, label);
    g[j] = from_f<S>(gj);
  }
  __syncthreads();  // the drawn entries below land after the sweep's
  for (int64_t i = tid; i < K; i += kThreads) {
    const int64_t id = load_id(t, row, i);
    const float zi = to_f(z[id]);
    const float p_hat = (float)count_draws(t, row, id, sorted) * inv_k;
    float gi = gc * (expf((__fmul_rn(zi, it) - as.m) - ls) - p_hat);
    if (ce) gi += hard_grad(hc, zi, az.m, zls, id, label);
    g[id] = from_f<S>(gi);
  }
}

template <typename S>
int launch_typed(const void* student, int64_t ss, const SparseTeacher& t, const int64_t* labels, const float* scale,
                 float* loss, void* grad, int64_t N, int64_t V, const fd::RowParams& rp, int64_t ignore_index,
                 bool ce, cudaStream_t stream) {
  sampled_distill_loss_kernel<S><<<(unsigned)N, kThreads, 0, stream>>>(
      static_cast<const S*>(student), ss, t, labels, scale, loss, static_cast<S*>(grad), V, rp, ignore_index, ce);
  return (int)cudaGetLastError();
}

}  // namespace

namespace cuda_launch {

int sampled_distill_loss(const void* student, int64_t student_stride, DType student_dtype,
                         const SparseTeacher& teacher, const int64_t* labels, const float* scale, float* loss,
                         void* grad, int64_t N, int64_t V, const fd::RowParams& rp, int64_t ignore_index,
                         bool hard_label_term, cudaStream_t stream) {
  if (N == 0) return 0;
  switch (student_dtype) {
    case F32:
      return launch_typed<float>(student, student_stride, teacher, labels, scale, loss, grad, N, V, rp,
                                 ignore_index, hard_label_term, stream);
    case BF16:
      return launch_typed<__nv_bfloat16>(student, student_stride, teacher, labels, scale, loss, grad, N, V, rp,
                                         ignore_index, hard_label_term, stream);
    default:
      return launch_typed<__half>(student, student_stride, teacher, labels, scale, loss, grad, N, V, rp,
                                  ignore_index, hard_label_term, stream);
  }
}

}  // namespace cuda_launch
}  // namespace fastdistill
