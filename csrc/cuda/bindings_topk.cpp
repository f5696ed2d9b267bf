// TORCH_LIBRARY_IMPL(fastdistill, CUDA) of the offline-target losses (topk_distill_loss_cuda,
// sampled_distill_loss_cuda): tensors -> the torch-free launchers of fd_cuda_topk.h, on the current stream.
// Ids are not range-checked here (that would need a host sync): a row with a bad id gets a NaN loss and
// gradient from the kernel; the Python layer's validate=True raises instead.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <string>

#include "fd_checks.h"
#include "fd_cuda_bindings.h"
#include "fd_cuda_topk.h"

namespace fastdistill {
namespace {

// Shapes, dtypes, strides and devices of the teacher's (N, k) log-probs and ids; `max_k` bounds k (V for
// top-k; none for draws with replacement). Returns the launcher's view of them.
cuda_launch::SparseTeacher check_teacher(const at::Tensor& student, const at::Tensor& logprobs,
                                         const at::Tensor& indices, const std::string& kind, int64_t max_k) {
  const std::string lp_name = "teacher_" + kind + "_logprobs", id_name = "teacher_" + kind + "_indices";
  const int64_t N = student.size(0);
  TORCH_CHECK_VALUE(logprobs.dim() == 2 && logprobs.size(0) == N, lp_name, ": expected shape (", N, ", k), got ",
                    logprobs.sizes());
  const int64_t K = logprobs.size(1);
  TORCH_CHECK_VALUE(K >= 1 && K <= max_k, lp_name, ": k = ", K, " must be in [1, ", max_k, "]");
  TORCH_CHECK_VALUE(indices.sizes() == logprobs.sizes(), id_name, ": shape ", indices.sizes(), " does not match ",
                    lp_name, " ", logprobs.sizes());
  TORCH_CHECK_TYPE(is_kernel_float(logprobs.scalar_type()), lp_name, ": dtype ", logprobs.scalar_type(),
                   " not supported (float32, bfloat16, float16)");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, id_name,
                   ": expected int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(K == 1 || (logprobs.stride(1) == 1 && indices.stride(1) == 1), lp_name, "/", id_name,
                    ": the k dimension must be contiguous");
  TORCH_CHECK_VALUE(logprobs.device() == student.device() && indices.device() == student.device(), lp_name, "/",
                    id_name, ": expected on ", student.device());
  return {logprobs.data_ptr(), logprobs.stride(0), launch_dtype(logprobs.scalar_type()),
          indices.data_ptr(),  indices.stride(0),  indices.scalar_type() == at::kLong,
          K};
}

struct Launch {
  at::Tensor loss, grad, labels;
};

Launch outputs(const at::Tensor& student, const std::optional<at::Tensor>& labels, bool compute_grad) {
  Launch out;
  if (labels.has_value()) out.labels = labels->contiguous();
  std::tie(out.loss, out.grad) = new_loss_and_grad(student, student.size(0), student.size(1), compute_grad);
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_distill_loss_cuda(
    const at::Tensor& student, const at::Tensor& logprobs, const at::Tensor& indices,
    const std::optional<at::Tensor>& labels, const at::Tensor& scale, int64_t tail, int64_t divergence,
    double temperature, double weight, double soft_weight, double hard_weight, bool scale_t2, int64_t ignore_index,
    bool compute_grad) {
  // The student, labels and options are checked as for distill_loss (the student stands in for the teacher).
  check_distill_inputs(student, student, labels, scale, divergence, temperature, weight, at::kCUDA);
  TORCH_CHECK_VALUE(divergence != fd::MSE, "divergence: mse is not supported by topk_distill_loss");
  TORCH_CHECK_VALUE(tail == 0 || tail == 1, "tail: unknown code ", tail, " (0 renormalize, 1 bucket)");
  const int64_t N = student.size(0), V = student.size(1);
  const cuda_launch::SparseTeacher teacher = check_teacher(student, logprobs, indices, "topk", V);
  const c10::cuda::CUDAGuard guard(student.device());
  if (tail == 1 && N > 0 && V > 300000) {  // below, the default 48 KiB of shared memory holds the mask
    const int64_t max_v = cuda_launch::topk_bucket_max_vocab();
    TORCH_CHECK_VALUE(V <= max_v, "student_logits: V = ", V, " is above the ", max_v,
                      " the cuda bucket tail handles on this GPU (a shared-memory bit per token); use "
                      "backend='triton' or tail='renormalize'");
  }
  Launch out = outputs(student, labels, compute_grad);
  const fd::RowParams rp = fd::make_row_params((int)divergence, temperature, weight, (float)soft_weight,
                                               (float)hard_weight, scale_t2, V);
  const int err = cuda_launch::topk_distill_loss(
      student.data_ptr(), student.stride(0), launch_dtype(student.scalar_type()), teacher,
      out.labels.defined() ? out.labels.data_ptr<int64_t>() : nullptr, scale.data_ptr<float>(),
      out.loss.data_ptr<float>(), compute_grad ? out.grad.data_ptr() : nullptr, N, V, rp, tail == 1, ignore_index,
      hard_weight != 0.0 && out.labels.defined(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "topk_distill_loss_cuda: kernel launch failed with CUDA error ", err);
  return {out.loss, out.grad};
}

std::tuple<at::Tensor, at::Tensor> sampled_distill_loss_cuda(
    const at::Tensor& student, const at::Tensor& logprobs, const at::Tensor& indices,
    const std::optional<at::Tensor>& labels, const at::Tensor& scale, double temperature, double soft_weight,
    double hard_weight, bool scale_t2, int64_t ignore_index, bool compute_grad) {
  check_distill_inputs(student, student, labels, scale, fd::KL, temperature, 0.5, at::kCUDA);
  const int64_t N = student.size(0), V = student.size(1);
  // Draws are with replacement: k may exceed V.
  const cuda_launch::SparseTeacher teacher =
      check_teacher(student, logprobs, indices, "sampled", std::numeric_limits<int64_t>::max());
  const c10::cuda::CUDAGuard guard(student.device());
  Launch out = outputs(student, labels, compute_grad);
  const fd::RowParams rp =
      fd::make_row_params(fd::KL, temperature, 0.5, (float)soft_weight, (float)hard_weight, scale_t2, V);
  const int err = cuda_launch::sampled_distill_loss(
      student.data_ptr(), student.stride(0), launch_dtype(student.scalar_type()), teacher,
      out.labels.defined() ? out.labels.data_ptr<int64_t>() : nullptr, scale.data_ptr<float>(),
      out.loss.data_ptr<float>(), compute_grad ? out.grad.data_ptr() : nullptr, N, V, rp, ignore_index,
      hard_weight != 0.0 && out.labels.defined(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "sampled_distill_loss_cuda: kernel launch failed with CUDA error ", err);
  return {out.loss, out.grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("topk_distill_loss_cuda", &topk_distill_loss_cuda);
  m.impl("sampled_distill_loss_cuda", &sampled_distill_loss_cuda);
}

}  // namespace fastdistill
