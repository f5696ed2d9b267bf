// The one schema block of the extension, plus the Python module init.
// Kernels register their implementations next to their code (csrc/cpu/*.cpp, csrc/cuda/bindings.cpp).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import fastdistill._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastdistill, m) {
  // Fused distillation loss: per-row loss (float32, already multiplied by `scale`) and, when
  // compute_grad, d(sum of row losses)/d(student) in the student's dtype (else an empty tensor).
  // `divergence` uses the codes of csrc/include/fd_divergence.h; `weight` is beta (jsd) or skew.
  const char* distill =
      "(Tensor student, Tensor teacher, Tensor? labels, Tensor scale, int divergence, float temperature, "
      "float weight, float soft_weight, float hard_weight, bool scale_t2, int ignore_index, bool compute_grad) "
      "-> (Tensor, Tensor)";
  m.def((std::string("distill_loss_cpu") + distill).c_str());
  m.def((std::string("distill_loss_cuda") + distill).c_str());
  // Distillation from a teacher's top-k log-probabilities (already at temperature T) at token ids
  // (int32/int64); `tail` 0 renormalizes over the k ids, 1 adds a rest bucket. Same outputs as above.
  m.def(
      "topk_distill_loss_cpu(Tensor student, Tensor teacher_logprobs, Tensor teacher_indices, Tensor? labels, "
      "Tensor scale, int tail, int divergence, float temperature, float weight, float soft_weight, "
      "float hard_weight, bool scale_t2, int ignore_index, bool compute_grad) -> (Tensor, Tensor)");
}
