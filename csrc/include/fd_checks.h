// Argument checks shared by the CPU kernels and the CUDA bindings (ATen side only; not for .cu files).
// The Python layer validates user input with friendlier messages; these guard direct calls of the ops.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastdistill {

inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Large fresh CPU buffers are first touched by the kernel; with 4 KiB pages that first touch (one
// page fault per page) cost more than the loss itself on the dev machine. Asking for transparent
// huge pages on the untouched range (as PyTorch's THP_MEM_ALLOC_ENABLE does) cuts the faults 512x.
// Advisory only: ignored where THP is off or the range is not page-aligned memory of our own.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (t.device().is_cpu() && last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

// Outputs start as NaN when FASTDISTILL_POISON=1 (the tests set it), so unwritten elements fail.
// With FASTDISTILL_POISON=1 floating outputs start as NaN and integer ones as their lowest value (-128
// for int8, which the int8 quantizers never produce: they clamp to [-127, 127]), so unwritten elements
// fail the tests.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const char* poison = std::getenv("FASTDISTILL_POISON");
  if (poison != nullptr && std::strcmp(poison, "1") == 0) {
    if (at::isFloatingType(options.dtype().toScalarType())) return at::full(sizes, NAN, options);
    TORCH_CHECK(options.dtype().toScalarType() == at::kChar, "new_output: poison value defined for int8 only");
    return at::full(sizes, -128, options);
  }
  at::Tensor out = at::empty(sizes, options);
  if (out.nbytes() >= (size_t(8) << 20)) advise_huge_pages(out);
  return out;
}

inline void check_distill_inputs(const at::Tensor& student, const at::Tensor& teacher,
                                 const std::optional<at::Tensor>& labels, const at::Tensor& scale,
                                 int64_t divergence, double temperature, double weight, at::DeviceType dev) {
  TORCH_CHECK_VALUE(student.dim() == 2, "student_logits: expected a 2-D (rows, V) tensor, got ", student.dim(), "-D");
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "teacher_logits: shape ", teacher.sizes(),
                    " does not match student_logits ", student.sizes());
  TORCH_CHECK_VALUE(student.size(1) > 0, "student_logits: vocabulary size must be >= 1");
  TORCH_CHECK_TYPE(is_kernel_float(student.scalar_type()), "student_logits: dtype ", student.scalar_type(),
                   " not supported (float32, bfloat16, float16)");
  TORCH_CHECK_TYPE(is_kernel_float(teacher.scalar_type()), "teacher_logits: dtype ", teacher.scalar_type(),
                   " not supported (float32, bfloat16, float16)");
  TORCH_CHECK_VALUE(student.size(1) == 1 || (student.stride(1) == 1 && teacher.stride(1) == 1),
                    "student_logits/teacher_logits: the vocabulary dimension must be contiguous");
  TORCH_CHECK_VALUE(student.device().type() == dev && teacher.device() == student.device(),
                    "student_logits/teacher_logits: expected both on ", dev, ", got ", student.device(), " and ",
                    teacher.device());
  if (labels.has_value()) {
    TORCH_CHECK_TYPE(labels->scalar_type() == at::kLong, "labels: expected int64, got ", labels->scalar_type());
    TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == student.size(0), "labels: expected shape (",
                      student.size(0), ",), got ", labels->sizes());
    TORCH_CHECK_VALUE(labels->device() == student.device(), "labels: expected device ", student.device(),
                      ", got ", labels->device());
  }
  TORCH_CHECK_VALUE(scale.numel() == 1 && scale.scalar_type() == at::kFloat && scale.device() == student.device(),
                    "scale: expected a one-element float32 tensor on ", student.device());
  TORCH_CHECK_VALUE(divergence >= 0 && divergence <= 6, "divergence: unknown code ", divergence);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature: must be finite and > 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(weight >= 0 && weight <= 1, "beta/skew: must be in [0, 1], got ", weight);
}

// CPU kernels: the labels as a contiguous int64 buffer (held by `holder`), nullptr without labels.
// With a hard-label term every label must be ignore_index or in [0, V): checked here, on the host.
inline const int64_t* cpu_labels(const std::optional<at::Tensor>& labels, int64_t V, double hard_weight,
                                 int64_t ignore_index, at::Tensor& holder) {
  if (!labels.has_value()) return nullptr;
  holder = labels->contiguous();
  const int64_t* lab = holder.data_ptr<int64_t>();
  if (hard_weight != 0.0) {
    for (int64_t r = 0; r < holder.numel(); ++r) {
      TORCH_CHECK_VALUE(lab[r] == ignore_index || (lab[r] >= 0 && lab[r] < V), "labels: value ", lab[r],
                        " at row ", r, " is outside [0, ", V, ") and is not ignore_index (", ignore_index, ")");
    }
  }
  return lab;
}

// The (row losses float32 [N], gradient [N, V] in the student's dtype or an empty tensor) outputs.
inline std::pair<at::Tensor, at::Tensor> new_loss_and_grad(const at::Tensor& student, int64_t N, int64_t V,
                                                           bool compute_grad) {
  at::Tensor loss = new_output({N}, student.options().dtype(at::kFloat));
  const std::vector<int64_t> grad_shape = compute_grad ? std::vector<int64_t>{N, V} : std::vector<int64_t>{0};
  return {loss, new_output(grad_shape, student.options())};
}

}  // namespace fastdistill
