// TORCH_LIBRARY_IMPL(fastdistill, CUDA): tensors -> the torch-free launchers, on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fd_checks.h"
#include "fd_cuda_launch.h"
#include "fd_cuda_bindings.h"

namespace fastdistill {
namespace {

std::tuple<at::Tensor, at::Tensor> distill_loss_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                     const std::optional<at::Tensor>& labels,
                                                     const at::Tensor& scale, int64_t divergence,
                                                     double temperature, double weight, double soft_weight,
                                                     double hard_weight, bool scale_t2, int64_t ignore_index,
                                                     bool compute_grad) {
  check_distill_inputs(student, teacher, labels, scale, divergence, temperature, weight, at::kCUDA);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t N = student.size(0), V = student.size(1);
  at::Tensor lab;
  if (labels.has_value()) lab = labels->contiguous();
  at::Tensor loss = new_output({N}, student.options().dtype(at::kFloat));
  const std::vector<int64_t> grad_shape = compute_grad ? std::vector<int64_t>{N, V} : std::vector<int64_t>{0};
  at::Tensor grad = new_output(grad_shape, student.options());
  const fd::RowParams rp = fd::make_row_params((int)divergence, temperature, weight, (float)soft_weight,
                                               (float)hard_weight, scale_t2, V);
  const int err = cuda_launch::distill_loss(
      student.data_ptr(), student.stride(0), launch_dtype(student.scalar_type()), teacher.data_ptr(),
      teacher.stride(0), launch_dtype(teacher.scalar_type()), lab.defined() ? lab.data_ptr<int64_t>() : nullptr,
      scale.data_ptr<float>(), loss.data_ptr<float>(), compute_grad ? grad.data_ptr() : nullptr, N, V, rp,
      ignore_index, hard_weight != 0.0 && lab.defined(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "distill_loss_cuda: kernel launch failed with CUDA error ", err);
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) { m.impl("distill_loss_cuda", &distill_loss_cuda); }

}  // namespace fastdistill
