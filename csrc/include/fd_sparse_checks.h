// Argument checks of the sparse ops (csrc/ops.cpp documents the formats), shared by the CPU kernels and
// the CUDA bindings. The Python layer validates user input first with friendlier messages; these guard
// direct calls of the ops. Shapes only: no index values are read (that would sync a device).
#pragma once

#include <ATen/ATen.h>

#include "fd_checks.h"

namespace fastdistill {

inline void check_sparse_float(const at::Tensor& t, const char* name, const at::Tensor& like, at::DeviceType dev) {
  TORCH_CHECK_TYPE(is_kernel_float(t.scalar_type()), name, ": dtype ", t.scalar_type(),
                   " not supported (float32, bfloat16, float16)");
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, ": dtype ", t.scalar_type(), " differs from x's ",
                   like.scalar_type());
  TORCH_CHECK_VALUE(t.device().type() == dev && t.device() == like.device(), name, ": expected device ",
                    like.device(), " (", dev, "), got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": must be contiguous");
}

inline void check_sparse_index(const at::Tensor& t, const char* name, int64_t numel, const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, ": expected int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && (numel < 0 || t.numel() == numel), name, ": expected shape (", numel,
                    ",), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, ": expected device ", like.device(), ", got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": must be contiguous");
}

inline void check_block_dims(int64_t bn, int64_t bk) {
  auto ok = [](int64_t b) { return b == 16 || b == 32 || b == 64; };
  TORCH_CHECK_VALUE(ok(bn) && ok(bk), "block size: expected bn, bk in {16, 32, 64}, got (", bn, ", ", bk, ")");
}

inline void check_bias(const std::optional<at::Tensor>& bias, int64_t N, const at::Tensor& x, at::DeviceType dev) {
  if (!bias.has_value()) return;
  check_sparse_float(*bias, "bias", x, dev);
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias: expected shape (", N, ",), got ", bias->sizes());
}

// x [M, K] -> y [M, N] through values [nnzb, bn, bk], crow [N/bn + 1], col [nnzb].
inline void check_bsr_fwd(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                          const at::Tensor& col, const std::optional<at::Tensor>& bias, int64_t N,
                          at::DeviceType dev) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D [M, K] tensor, got ", x.dim(), "-D");
  check_sparse_float(x, "x", x, dev);
  check_sparse_float(values, "values", x, dev);
  TORCH_CHECK_VALUE(values.dim() == 3, "values: expected [nnzb, bn, bk], got ", values.sizes());
  const int64_t bn = values.size(1), bk = values.size(2);
  check_block_dims(bn, bk);
  TORCH_CHECK_VALUE(N >= 0 && N % bn == 0, "N: ", N, " is not a multiple of bn = ", bn);
  TORCH_CHECK_VALUE(x.size(1) % bk == 0, "x: K = ", x.size(1), " is not a multiple of bk = ", bk);
  check_sparse_index(crow, "crow_indices", N / bn + 1, x);
  check_sparse_index(col, "col_indices", values.size(0), x);
  check_bias(bias, N, x, dev);
}

// dy [M, N] -> dx [M, K] through the CSC view ccol [K/bk + 1], row [nnzb], perm [nnzb].
inline void check_bsr_dx(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& ccol,
                         const at::Tensor& row, const at::Tensor& perm, int64_t K, at::DeviceType dev) {
  TORCH_CHECK_VALUE(dy.dim() == 2, "dy: expected a 2-D [M, N] tensor, got ", dy.dim(), "-D");
  check_sparse_float(dy, "dy", dy, dev);
  check_sparse_float(values, "values", dy, dev);
  TORCH_CHECK_VALUE(values.dim() == 3, "values: expected [nnzb, bn, bk], got ", values.sizes());
  const int64_t bn = values.size(1), bk = values.size(2);
  check_block_dims(bn, bk);
  TORCH_CHECK_VALUE(K >= 0 && K % bk == 0, "K: ", K, " is not a multiple of bk = ", bk);
  TORCH_CHECK_VALUE(dy.size(1) % bn == 0, "dy: N = ", dy.size(1), " is not a multiple of bn = ", bn);
  check_sparse_index(ccol, "ccol_indices", K / bk + 1, dy);
  check_sparse_index(row, "row_indices", values.size(0), dy);
  check_sparse_index(perm, "perm", values.size(0), dy);
}

inline void check_bsr_dw(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                         int64_t bn, int64_t bk, at::DeviceType dev) {
  TORCH_CHECK_VALUE(dy.dim() == 2 && x.dim() == 2 && dy.size(0) == x.size(0), "dy/x: expected [M, N] and [M, K], got ",
                    dy.sizes(), " and ", x.sizes());
  check_sparse_float(x, "x", x, dev);
  check_sparse_float(dy, "dy", x, dev);
  check_block_dims(bn, bk);
  TORCH_CHECK_VALUE(dy.size(1) % bn == 0 && x.size(1) % bk == 0, "dy/x: N = ", dy.size(1), ", K = ", x.size(1),
                    " are not multiples of the block size (", bn, ", ", bk, ")");
  check_sparse_index(crow, "crow_indices", dy.size(1) / bn + 1, x);
  check_sparse_index(col, "col_indices", -1, x);
}

// x [M, K] -> y [M, N] through the 2:4 values [N, K/2] and meta [N, (K/4 + 1)/2] uint8.
inline void check_semi_structured(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                  const std::optional<at::Tensor>& bias, at::DeviceType dev) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D [M, K] tensor, got ", x.dim(), "-D");
  check_sparse_float(x, "x", x, dev);
  check_sparse_float(values, "values", x, dev);
  const int64_t K = x.size(1);
  TORCH_CHECK_VALUE(K % 4 == 0, "x: K = ", K, " is not a multiple of 4 (2:4 groups)");
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(1) == K / 2, "values: expected [N, ", K / 2, "], got ",
                    values.sizes());
  const int64_t N = values.size(0);
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kByte, "meta: expected uint8, got ", meta.scalar_type());
  TORCH_CHECK_VALUE(meta.dim() == 2 && meta.size(0) == N && meta.size(1) == (K / 4 + 1) / 2, "meta: expected [", N,
                    ", ", (K / 4 + 1) / 2, "], got ", meta.sizes());
  TORCH_CHECK_VALUE(meta.device() == x.device() && meta.is_contiguous(), "meta: expected a contiguous tensor on ",
                    x.device());
  check_bias(bias, N, x, dev);
}

}  // namespace fastdistill
