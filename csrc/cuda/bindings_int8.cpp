// TORCH_LIBRARY_IMPL(fastdistill, CUDA) for the int8 ops (schemas and arithmetic: csrc/ops.cpp):
// argument checks, device guard, poisoned outputs, then the torch-free launchers of
// csrc/cuda/int8_linear.cu and int8_w8a16.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fd_checks.h"
#include "fd_cuda_bindings.h"
#include "fd_cuda_int8.h"

namespace fastdistill {
namespace {

void check_on(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == like.device(), name, ": expected a tensor on ", like.device(),
                    ", got ", t.device());
}

void check_float_vector(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, ": expected float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, ": expected shape (", n, ",), got ", t.sizes());
  check_on(t, name, like);
}

// The bias as a contiguous float32/bfloat16/float16 vector of N (other float dtypes -> float32,
// the same value the kernels' (float) cast gives).
at::Tensor bias_operand(const std::optional<at::Tensor>& bias, int64_t N, const at::Tensor& like) {
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()), "bias: expected a floating dtype, got ",
                   bias->scalar_type());
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias: expected shape (", N, ",), got ", bias->sizes());
  check_on(*bias, "bias", like);
  at::Tensor b = is_kernel_float(bias->scalar_type()) ? *bias : bias->to(at::kFloat);
  return b.contiguous();
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D (M, K) tensor, got ", x.dim(), "-D");
  TORCH_CHECK_TYPE(is_kernel_float(x.scalar_type()), "x: dtype ", x.scalar_type(),
                   " not supported (float32, bfloat16, float16)");
  TORCH_CHECK_VALUE(x.is_cuda(), "x: expected a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  at::Tensor q = new_output({M, K}, xc.options().dtype(at::kChar));
  at::Tensor scale = new_output({M}, xc.options().dtype(at::kFloat));
  const int err = cuda_launch::quantize_per_token(xc.data_ptr(), launch_dtype(xc.scalar_type()),
                                                  q.data_ptr<int8_t>(), scale.data_ptr<float>(), M, K,
                                                  c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "quantize_per_token_cuda: kernel launch failed with CUDA error ", err);
  return {q, scale};
}

at::Tensor int8_linear_epilogue_cuda(const at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& w_scale,
                                     const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  TORCH_CHECK_VALUE(acc.dim() == 2, "acc: expected a 2-D (M, N) tensor, got ", acc.dim(), "-D");
  TORCH_CHECK_TYPE(acc.scalar_type() == at::kInt, "acc: expected int32, got ", acc.scalar_type());
  TORCH_CHECK_VALUE(acc.is_cuda(), "acc: expected a CUDA tensor, got ", acc.device());
  TORCH_CHECK_TYPE(is_kernel_float(out_dtype), "out_dtype: ", out_dtype, " not supported (float32, bfloat16, float16)");
  const int64_t M = acc.size(0), N = acc.size(1);
  check_float_vector(x_scale, "x_scale", M, acc);
  check_float_vector(w_scale, "w_scale", N, acc);
  const c10::cuda::CUDAGuard guard(acc.device());
  const at::Tensor a = acc.contiguous(), xs = x_scale.contiguous(), ws = w_scale.contiguous();
  const at::Tensor b = bias_operand(bias, N, acc);
  at::Tensor out = new_output({M, N}, acc.options().dtype(out_dtype));
  const int err = cuda_launch::int8_linear_epilogue(
      a.data_ptr<int32_t>(), xs.data_ptr<float>(), ws.data_ptr<float>(), b.defined() ? b.data_ptr() : nullptr,
      b.defined() ? launch_dtype(b.scalar_type()) : cuda_launch::F32, out.data_ptr(), launch_dtype(out_dtype),
      M, N, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "int8_linear_epilogue_cuda: kernel launch failed with CUDA error ", err);
  return out;
}

at::Tensor int8_weight_only_linear_cuda(const at::Tensor& x, const at::Tensor& w_int8, const at::Tensor& w_scale,
                                        const std::optional<at::Tensor>& bias, int64_t group_size) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D (M, K) tensor, got ", x.dim(), "-D");
  TORCH_CHECK_TYPE(is_kernel_float(x.scalar_type()), "x: dtype ", x.scalar_type(),
                   " not supported (float32, bfloat16, float16)");
  TORCH_CHECK_VALUE(x.is_cuda(), "x: expected a CUDA tensor, got ", x.device());
  TORCH_CHECK_TYPE(w_int8.scalar_type() == at::kChar, "w_int8: expected int8, got ", w_int8.scalar_type());
  TORCH_CHECK_VALUE(w_int8.dim() == 2 && w_int8.size(1) == x.size(1), "w_int8: expected shape (N, ", x.size(1),
                    "), got ", w_int8.sizes());
  check_on(w_int8, "w_int8", x);
  const int64_t M = x.size(0), N = w_int8.size(0), K = x.size(1);
  TORCH_CHECK_VALUE(group_size >= 0, "group_size: must be >= 0 (0 = per output channel), got ", group_size);
  TORCH_CHECK_VALUE(group_size == 0 || K % group_size == 0, "group_size: ", group_size, " does not divide K = ", K);
  TORCH_CHECK_TYPE(w_scale.scalar_type() == at::kFloat, "w_scale: expected float32, got ", w_scale.scalar_type());
  if (group_size == 0) {
    TORCH_CHECK_VALUE(w_scale.dim() == 1 && w_scale.size(0) == N, "w_scale: expected shape (", N,
                      ",) for per-channel scales (group_size 0), got ", w_scale.sizes());
  } else {
    TORCH_CHECK_VALUE(w_scale.dim() == 2 && w_scale.size(0) == N && w_scale.size(1) == K / group_size,
                      "w_scale: expected shape (", N, ", ", K / group_size, ") for group_size ", group_size, ", got ",
                      w_scale.sizes());
  }
  check_on(w_scale, "w_scale", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), wc = w_int8.contiguous(), sc = w_scale.contiguous();
  const at::Tensor b = bias_operand(bias, N, x);
  at::Tensor out = new_output({M, N}, xc.options());
  const int err = cuda_launch::int8_weight_only_linear(
      xc.data_ptr(), launch_dtype(xc.scalar_type()), wc.data_ptr<int8_t>(), sc.data_ptr<float>(), group_size,
      b.defined() ? b.data_ptr() : nullptr, b.defined() ? launch_dtype(b.scalar_type()) : cuda_launch::F32,
      out.data_ptr(), M, N, K, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "int8_weight_only_linear_cuda: kernel launch failed with CUDA error ", err);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("quantize_per_token_cuda", &quantize_per_token_cuda);
  m.impl("int8_linear_epilogue_cuda", &int8_linear_epilogue_cuda);
  m.impl("int8_weight_only_linear_cuda", &int8_weight_only_linear_cuda);
}

}  // namespace fastdistill
