// The one schema block of the extension, plus the Python module init.
// Kernels register their implementations next to their code (csrc/cpu/*.cpp, csrc/cuda/bindings_*.cpp).
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
  m.def(
      "topk_distill_loss_cuda(Tensor student, Tensor teacher_logprobs, Tensor teacher_indices, Tensor? labels, "
      "Tensor scale, int tail, int divergence, float temperature, float weight, float soft_weight, "
      "float hard_weight, bool scale_t2, int ignore_index, bool compute_grad) -> (Tensor, Tensor)");
  // Distillation from k token ids drawn (with replacement, duplicates kept) from the teacher's
  // distribution at temperature T, with the teacher's log-probabilities at those ids (RS-KD, the
  // "counts" estimator: p_hat = the draws' empirical frequencies). Forward KL only. Same outputs as above.
  const char* sampled =
      "(Tensor student, Tensor teacher_logprobs, Tensor teacher_indices, Tensor? labels, Tensor scale, "
      "float temperature, float soft_weight, float hard_weight, bool scale_t2, int ignore_index, "
      "bool compute_grad) -> (Tensor, Tensor)";
  m.def((std::string("sampled_distill_loss_cpu") + sampled).c_str());
  m.def((std::string("sampled_distill_loss_cuda") + sampled).c_str());
  // ---- sparse (issue 4). Formats: fastdistill/sparse/formats.py. Shared rules for every op below: ----
  //   (argument checks for the kernels/bindings of these ops: csrc/include/fd_sparse_checks.h)
  //   * x / dy / values / bias: float32, bfloat16 or float16, all the SAME dtype (the weight is stored in the
  //     activation dtype); outputs are new contiguous tensors in x.dtype (dy.dtype for dx), poisoned by
  //     new_output; accumulation in float32 in any FIXED order (deterministic, no atomics), one rounding to the
  //     output dtype at the end (no FMA contraction requirement: matched to the reference within the tolerance
  //     table, not bitwise). Every tensor argument is contiguous (the Python layer makes it so); index tensors
  //     are int32. bias is None or [N] in x.dtype, added in float32 before the single rounding. M == 0 allowed.
  //   * BSR weight W [N, K] with blocks [bn, bk] (bn, bk in {16, 32, 64}; N % bn == 0, K % bk == 0):
  //       values [nnzb, bn, bk]: values[p, i, j] = W[r*bn + i, c*bk + j] for the p-th stored block (r, c);
  //       crow_indices [N/bn + 1] int32: blocks of block row r are p in [crow[r], crow[r+1]), crow[0] = 0;
  //       col_indices [nnzb] int32: c of block p, strictly increasing within a block row;
  //     and the transposed (CSC) view, built once at conversion time, for dx without atomics:
  //       ccol_indices [K/bk + 1] int32: blocks of block column c are q in [ccol[c], ccol[c+1]);
  //       row_indices [nnzb] int32: r of the q-th block in column order (strictly increasing within a column);
  //       perm [nnzb] int32: values index of the q-th block in column order (values[perm[q]]).
  //     nnzb may be 0 (all-zero weight): fwd gives bias (or 0), dx gives 0, dw gives an empty [0, bn, bk].
  //     bn, bk are values.size(1), values.size(2) (the dw op takes them as arguments).
  // block_sparse_linear_fwd: x [M, K], bias [N] or None -> y [M, N]: y[m, r*bn+i] = bias + sum over the blocks
  //   p of row r and j < bk of x[m, col[p]*bk + j] * values[p, i, j]. Only stored blocks are read.
  // block_sparse_linear_dx: dy [M, N] -> dx [M, K] = dy · W: dx[m, c*bk+j] = sum over q in column c and
  //   i < bn of dy[m, row[q]*bn + i] * values[perm[q], i, j]. Zero block columns give exact 0.
  // block_sparse_linear_dw: dy [M, N], x [M, K] (same dtype) -> dvalues [nnzb, bn, bk] in x.dtype:
  //   dvalues[p, i, j] = sum_m dy[m, r*bn+i] * x[m, col[p]*bk+j] for every stored block p (the pattern is kept),
  //   where r is the block row of p (from crow_indices). M == 0 gives zeros.
  // ---- 2:4 semi-structured weight W [N, K], K % 4 == 0 (the Python layer rejects other K; no padding):
  //   values [N, K/2] (x.dtype): for group g (columns 4g..4g+3) of row n, values[n, 2g] and values[n, 2g+1]
  //     are W[n, 4g + i0] and W[n, 4g + i1] with i0 < i1 (kept positions; a group with fewer than two
  //     nonzeros still stores two positions, holding zeros);
  //   meta [N, (K/4 + 1) / 2] uint8: group g of row n is the 4-bit nibble (meta[n, g/2] >> (4 * (g % 2))) & 15,
  //     i0 = nibble & 3, i1 = nibble >> 2 (bits 0-1 and 2-3); when K/4 is odd the last byte's high nibble is 0.
  //   semi_structured_linear: x [M, K], bias [N] or None -> y [M, N] = x · Wᵀ (+ bias), reading only the
  //   compressed values + meta (half the weight bytes). Backward is done in Python (dense dx = dy · W from the
  //   decompressed weight, dW = dyᵀ x gathered at the kept positions, PyTorch's straight-through rule).
  // CPU helpers of the 2:4 backward (on CUDA the Python layer uses torch ops for these):
  //   semi_structured_to_dense_cpu: values [N, K/2], meta -> W [N, K] in values.dtype (zeros elsewhere).
  //   semi_structured_gather_cpu: dense [N, K] (e.g. dyᵀ·x), meta -> [N, K/2] in dense.dtype: the elements at
  //   the kept positions, in the values layout. Both exact (copies only).
  m.def("semi_structured_to_dense_cpu(Tensor values, Tensor meta, int K) -> Tensor");
  m.def("semi_structured_gather_cpu(Tensor dense, Tensor meta) -> Tensor");
  for (const char* b : {"cpu", "cuda"}) {
    m.def((std::string("block_sparse_linear_fwd_") + b +
           "(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, Tensor? bias, int N) -> Tensor")
              .c_str());
    m.def((std::string("block_sparse_linear_dx_") + b +
           "(Tensor dy, Tensor values, Tensor ccol_indices, Tensor row_indices, Tensor perm, int K) -> Tensor")
              .c_str());
    m.def((std::string("block_sparse_linear_dw_") + b +
           "(Tensor dy, Tensor x, Tensor crow_indices, Tensor col_indices, int bn, int bk) -> Tensor").c_str());
    m.def((std::string("semi_structured_linear_") + b + "(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor")
              .c_str());
  }
  // ---- int8 (issue 5). All tensors contiguous; every backend gives the SAME BITS for the first two ops. ----
  // quantize_per_token: x [M, K] float32/bfloat16/float16 -> (q [M, K] int8, scale [M] float32), symmetric.
  //   Per row, in float32 (x converted to float32 exactly): a = max_k |x[m, k]|, NaN if the row has a NaN.
  //   scale[m] = a / 127.0f (IEEE round-to-nearest); NaN rows: scale = the quiet NaN 0x7fc00000, inf rows: inf.
  //   Rows with a == 0 (and K == 0), a == inf or a NaN: q = 0. Else p = (a < 2^-64 ? 2^64 : 1) (127 / a overflows
  //   below ~3.7e-37; scaling by 2^64 is exact), inv = 127.0f / (a * p),
  //   q[m, k] = (int8) rint_half_even(clamp((x[m, k] * p) * inv, -127.0f, 127.0f)) (fp32 multiplies, NO x / scale).
  // int8_linear_epilogue: acc [M, N] int32 (torch._int_mm of q_x [M, K] and w_int8^T), x_scale [M] float32,
  //   w_scale [N] float32, bias [N] in any float dtype or None -> out [M, N] in out_dtype (f32/bf16/f16), one pass:
  //   t = ((float)acc[m, n] * x_scale[m]) * w_scale[n]; then, with bias only, t = t + (float)bias[n];
  //   out = round-to-nearest-even cast of t. Each op is one fp32 rounding: no FMA contraction (nvcc --fmad=false,
  //   -ffp-contract=off), int32 -> float32 round-to-nearest.
  // int8_weight_only_linear: x [M, K] float32/bfloat16/float16, w_int8 [N, K] int8, w_scale float32 of shape [N]
  //   (group_size == 0, per output channel) or [N, K / group_size] (group_size > 0 dividing K), bias [N] any float
  //   dtype or None -> out [M, N] in x.dtype: out = sum_k x[m, k] * w[n, k] (+ bias[n]), w[n, k] = (float)
  //   w_int8[n, k] * w_scale[n, k / group_size] (per channel: w_scale[n]), dequantized inside the kernel, fp32
  //   accumulation in any fixed order (deterministic; matched to the reference within the tolerance table,
  //   not bitwise); backends may round the dequantized weight to x.dtype for tensor-core MMAs.
  for (const char* b : {"cpu", "cuda"}) {
    m.def((std::string("quantize_per_token_") + b + "(Tensor x) -> (Tensor, Tensor)").c_str());
    m.def((std::string("int8_linear_epilogue_") + b +
           "(Tensor acc, Tensor x_scale, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor").c_str());
    m.def((std::string("int8_weight_only_linear_") + b +
           "(Tensor x, Tensor w_int8, Tensor w_scale, Tensor? bias, int group_size) -> Tensor").c_str());
  }
  // CPU only: the whole W8A8 matmul, x_int8 [M, K] x w_int8 [N, K] -> exact int32 sums, then the epilogue above
  // (same bits as torch._int_mm + int8_linear_epilogue_cpu); its own int16-madd GEMM where oneDNN has no VNNI/AMX.
  m.def("int8_linear_cpu(Tensor x_int8, Tensor x_scale, Tensor w_int8, Tensor w_scale, Tensor? bias, "
        "ScalarType out_dtype) -> Tensor");
  // ---- packed CPU weights (issue 14; header and checks in csrc/include/fd_int8_pack.h). Forward-only inference
  // kernels (Int8Linear owns autograd); the packed uint8 tensor is built once per weight, never saved. ----
  // int8_pack_w8a8_cpu: w_int8 [N, K] -> w_packed in int8_linear_dynamic_cpu's tile layout.
  // int8_linear_dynamic_cpu: x [M, K] float32/bf16/fp16, optional smooth_inv [K] float32 (rounded to x.dtype first,
  //   as smooth_inv.to(x.dtype) does) -> out [M, N] out_dtype:
  //   SAME BITS as quantize_per_token_cpu(xs) then int8_linear_cpu(q, scale, w_int8, w_scale, bias, out_dtype) with
  //   xs = x without smooth_inv, else (x * smooth_inv.to(x.dtype)) rounded to x.dtype (torch's elementwise product).
  // int8_pack_w8a16_cpu: w_int8 [N, K], group_size (0 = per channel, else dividing K) -> w_packed.
  // int8_weight_only_linear_packed_cpu: x [M, K], w_packed, w_scale ([N] or [N, K / group_size]), bias, smooth_inv
  //   as above -> int8_weight_only_linear's result (fp32 accumulation, tolerance-table parity, deterministic).
  m.def("int8_pack_w8a8_cpu(Tensor w_int8) -> Tensor");
  m.def("int8_linear_dynamic_cpu(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias, Tensor? smooth_inv, "
        "ScalarType out_dtype) -> Tensor");
  m.def("int8_pack_w8a16_cpu(Tensor w_int8, int group_size) -> Tensor");
  m.def("int8_weight_only_linear_packed_cpu(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias, "
        "Tensor? smooth_inv) -> Tensor");
}
