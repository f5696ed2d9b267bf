// CUDA kernel of fastdistill::distill_loss_cuda: one thread block per row, three sweeps over the
// vocabulary (softmax statistics; D and C when the divergence needs them; gradient), with the
// per-element math shared with the CPU kernel (csrc/include/fd_divergence.h).
// Reductions: per-thread partials (double for sums), then a fixed butterfly + shared-memory tree:
// no atomics, bitwise deterministic. Torch-free: compiles with a bare `nvcc -c`.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fd_cuda_block.cuh"
#include "fd_cuda_launch.h"
#include "fd_divergence.h"

namespace fastdistill {
namespace {

using namespace cuda_block;  // kThreads, SoftmaxAcc, the block reductions, poison_row / zero_row

struct Offset {
  float max, log_sum;  // log p = (x * a - max) - log_sum
};

__device__ __forceinline__ Offset offset_of(const SoftmaxAcc& a) {
  return Offset{a.m, a.m == -INFINITY ? 0.0f : (float)log(a.s)};
}

template <typename S, typename T>
__global__ void __launch_bounds__(kThreads)
    distill_loss_kernel(const S* __restrict__ student, int64_t ss, const T* __restrict__ teacher, int64_t ts,
                        const int64_t* __restrict__ labels, const float* __restrict__ scale_ptr,
                        float* __restrict__ loss, S* __restrict__ grad, int64_t V, fd::RowParams rp,
                        int64_t ignore_index, bool ce) {
  __shared__ SoftmaxAcc sm_acc[kWarps];
  __shared__ double sm_sum[kWarps];
  const int64_t row = blockIdx.x;
  const S* z = student + row * ss;
  const T* y = teacher + row * ts;
  S* g = grad != nullptr ? grad + row * V : nullptr;
  const int tid = threadIdx.x;
  const int64_t label = labels != nullptr ? labels[row] : -1;

  if (labels != nullptr && label == ignore_index) {  // uniform per block
    zero_row(g, V, loss + row);
    return;
  }
  const float scale = *scale_ptr, it = rp.inv_t;
  const bool mse = rp.div == fd::MSE;
  const bool ce_own = ce && (rp.ce_needs_own_softmax || mse);

  // Sweep 1: softmax statistics. The NaN rule (fd_math.h): NaN or +inf in the row gives a NaN loss and
  // gradient row; the flag is checked here, or in sweep 3 for mse (which reads the teacher only there).
  SoftmaxAcc as{-INFINITY, 0.0}, at{-INFINITY, 0.0}, az{-INFINITY, 0.0};
  int poisoned = 0;
  for (int64_t k = tid; k < V; k += kThreads) {
    const float zk = to_f(z[k]), yk = to_f(y[k]);
    if (!mse) {
      acc_add(as, __fmul_rn(zk, it));
      acc_add(at, __fmul_rn(yk, it));
      poisoned |= (int)fd::poisons_row(zk) | (int)fd::poisons_row(yk);
    }
    if (ce_own) acc_add(az, zk);
  }
  if (!mse && __syncthreads_or(poisoned)) {  // uniform per block
    poison_row(g, V, loss + row);
    return;
  }
  if (!mse) {
    as = block_merge(as, sm_acc);
    at = block_merge(at, sm_acc);
  }
  az = ce_own ? block_merge(az, sm_acc) : as;
  const Offset os = offset_of(as), ot = offset_of(at), oz = offset_of(az);
  const float kd = (float)(((double)ot.max - os.max) + ((double)ot.log_sum - os.log_sum));

  // Sweep 2: D and C for divergences whose gradient needs them.
  double D = 0.0, C = 0.0;
  if (fd::needs_row_pass(rp.div)) {
    for (int64_t k = tid; k < V; k += kThreads) {
      const float zk = to_f(z[k]), yk = to_f(y[k]);
      const float lp = (__fmul_rn(yk, it) - ot.max) - ot.log_sum, lq = (__fmul_rn(zk, it) - os.max) - os.log_sum;
      float d, c;
      fd::row_terms(rp, expf(lp), expf(lq), lp, lq, fd::log_ratio(lp, lq, (yk - zk) * it, kd), d, c);
      D += d;
      C += c;
    }
    D = block_sum(D, sm_sum);
    C = block_sum(C, sm_sum);
  }

  // Sweep 3: gradient, and D for kl / mse.
  if (g != nullptr || rp.div == fd::KL || mse) {
    const float Df = (float)D, Cf = (float)C;
    const float gc = rp.grad_coef * scale, hc = rp.hard_weight * scale;
    double Dk = 0.0;
    for (int64_t k = tid; k < V; k += kThreads) {
      const float zk = to_f(z[k]), yk = to_f(y[k]);
      float gk;
      if (mse) {
        poisoned |= (int)fd::poisons_row(zk) | (int)fd::poisons_row(yk);
        const float diff = zk - yk;
        Dk += diff * diff;
        gk = gc * diff;
      } else {
        const float lp = (__fmul_rn(yk, it) - ot.max) - ot.log_sum, lq = (__fmul_rn(zk, it) - os.max) - os.log_sum;
        const float p = expf(lp), q = expf(lq), delta = fd::log_ratio(lp, lq, (yk - zk) * it, kd);
        if (rp.div == fd::KL) {
          float d, c;
          fd::row_terms(rp, p, q, lp, lq, delta, d, c);
          Dk += d;
        }
        gk = g != nullptr ? gc * fd::grad_s(rp, p, q, lp, lq, delta, Df, Cf) : 0.0f;
      }
      if (ce) gk += hc * (expf((zk - oz.max) - oz.log_sum) - (k == label ? 1.0f : 0.0f));
      if (g != nullptr) g[k] = from_f<S>(gk);
    }
    if (mse && __syncthreads_or(poisoned)) {  // the barrier also orders the stores above before NaN's
      poison_row(g, V, loss + row);
      return;
    }
    if (rp.div == fd::KL || mse) {
      Dk = block_sum(Dk, sm_sum);
      D = mse ? Dk * rp.inv_v : Dk;
    }
  }

  if (tid == 0) {
    float row_loss = rp.soft_coef * (float)D;
    if (ce) {
      // An out-of-range label yields NaN (a kernel cannot raise); the CPU backend raises instead.
      const float zl = (label >= 0 && label < V) ? to_f(z[label]) : NAN;
      row_loss += rp.hard_weight * ((oz.max - zl) + oz.log_sum);
    }
    loss[row] = row_loss * scale;
  }
}

template <typename S, typename T>
int launch_typed(const void* student, int64_t ss, const void* teacher, int64_t ts, const int64_t* labels,
                 const float* scale, float* loss, void* grad, int64_t N, int64_t V, const fd::RowParams& rp,
                 int64_t ignore_index, bool ce, cudaStream_t stream) {
  distill_loss_kernel<S, T><<<(unsigned)N, kThreads, 0, stream>>>(
      static_cast<const S*>(student), ss, static_cast<const T*>(teacher), ts, labels, scale, loss,
      static_cast<S*>(grad), V, rp, ignore_index, ce);
  return (int)cudaGetLastError();
}

template <typename S>
int launch_teacher(cuda_launch::DType td, const void* student, int64_t ss, const void* teacher, int64_t ts,
                   const int64_t* labels, const float* scale, float* loss, void* grad, int64_t N, int64_t V,
                   const fd::RowParams& rp, int64_t ignore_index, bool ce, cudaStream_t stream) {
  switch (td) {
    case cuda_launch::F32:
      return launch_typed<S, float>(student, ss, teacher, ts, labels, scale, loss, grad, N, V, rp, ignore_index,
                                    ce, stream);
    case cuda_launch::BF16:
      return launch_typed<S, __nv_bfloat16>(student, ss, teacher, ts, labels, scale, loss, grad, N, V, rp,
                                            ignore_index, ce, stream);
    default:
      return launch_typed<S, __half>(student, ss, teacher, ts, labels, scale, loss, grad, N, V, rp, ignore_index,
                                     ce, stream);
  }
}

}  // namespace

namespace cuda_launch {

int distill_loss(const void* student, int64_t student_stride, DType student_dtype, const void* teacher,
                 int64_t teacher_stride, DType teacher_dtype, const int64_t* labels, const float* scale,
                 float* loss, void* grad, int64_t N, int64_t V, const fd::RowParams& rp, int64_t ignore_index,
                 bool hard_label_term, cudaStream_t stream) {
  if (N == 0) return 0;
  switch (student_dtype) {
    case F32:
      return launch_teacher<float>(teacher_dtype, student, student_stride, teacher, teacher_stride, labels, scale,
                                   loss, grad, N, V, rp, ignore_index, hard_label_term, stream);
    case BF16:
      return launch_teacher<__nv_bfloat16>(teacher_dtype, student, student_stride, teacher, teacher_stride, labels,
                                           scale, loss, grad, N, V, rp, ignore_index, hard_label_term, stream);
    default:
      return launch_teacher<__half>(teacher_dtype, student, student_stride, teacher, teacher_stride, labels, scale,
                                    loss, grad, N, V, rp, ignore_index, hard_label_term, stream);
  }
}

}  // namespace cuda_launch
}  // namespace fastdistill
