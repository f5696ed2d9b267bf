// TORCH_LIBRARY_IMPL(fastdistill, CUDA) for the sparse ops (schemas and layouts: csrc/ops.cpp):
// argument checks, then the torch-free launchers of block_sparse_linear{,_dw}.cu / semi_structured_linear.cu
// on the current stream. Index contents (column ranges, sorted rows) are trusted: checking them would
// need a host sync; fastdistill/sparse/formats.py builds them.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "fd_checks.h"
#include "fd_cuda_bindings.h"
#include "fd_sparse_checks.h"
#include "fd_cuda_sparse.h"

namespace fastdistill {
namespace {

// M tiles go on the grid's y dimension (at most 65535 tiles of 64 rows at the smallest).
constexpr int64_t kMaxRows = int64_t(65535) * 64;

// M rows per CTA of the bf16/fp16 fwd/dx kernels: FASTDISTILL_BSR_TILE_M=256 selects the 256-row tile
// for 64-wide blocks (benchmarks/bench_sparse_cuda_kernels.py measures both), default 128.
int bsr_tile_m() {
  const char* v = std::getenv("FASTDISTILL_BSR_TILE_M");
  return v != nullptr && std::strcmp(v, "256") == 0 ? 256 : 128;
}

// The kernels use 16-byte loads (cp.async, uint4): a contiguous view at an odd offset is copied.
at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone(at::MemoryFormat::Contiguous);
}

void check_launch(int err, const char* op) { TORCH_CHECK(err == 0, op, ": kernel launch failed with CUDA error ", err); }

at::Tensor block_sparse_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                                        const at::Tensor& col, const std::optional<at::Tensor>& bias, int64_t N) {
  const char* op = "block_sparse_linear_fwd_cuda";
  check_bsr_fwd(x, values, crow, col, bias, N, at::kCUDA);
  const int64_t M = x.size(0), K = x.size(1), bn = values.size(1), bk = values.size(2);
  TORCH_CHECK_VALUE(M <= kMaxRows, op, ": x has ", M, " rows, more than the ", kMaxRows, " supported");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xa = aligned16(x), va = aligned16(values);
  at::Tensor y = new_output({M, N}, x.options());
  check_launch(cuda_launch::block_sparse_linear_fwd(
                   xa.data_ptr(), va.data_ptr(), crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(),
                   bias.has_value() ? bias->data_ptr() : nullptr, y.data_ptr(), M, N, K, (int)bn, (int)bk,
                   bsr_tile_m(), launch_dtype(x.scalar_type()), c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return y;
}

at::Tensor block_sparse_linear_dx_cuda(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& ccol,
                                       const at::Tensor& row, const at::Tensor& perm, int64_t K) {
  const char* op = "block_sparse_linear_dx_cuda";
  check_bsr_dx(dy, values, ccol, row, perm, K, at::kCUDA);
  const int64_t M = dy.size(0), N = dy.size(1), bn = values.size(1), bk = values.size(2);
  TORCH_CHECK_VALUE(M <= kMaxRows, op, ": dy has ", M, " rows, more than the ", kMaxRows, " supported");
  const c10::cuda::CUDAGuard guard(dy.device());
  const at::Tensor dya = aligned16(dy), va = aligned16(values);
  at::Tensor dx = new_output({M, K}, dy.options());
  check_launch(cuda_launch::block_sparse_linear_dx(
                   dya.data_ptr(), va.data_ptr(), ccol.data_ptr<int32_t>(), row.data_ptr<int32_t>(),
                   perm.data_ptr<int32_t>(), dx.data_ptr(), M, N, K, (int)bn, (int)bk, bsr_tile_m(),
                   launch_dtype(dy.scalar_type()), c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return dx;
}

at::Tensor block_sparse_linear_dw_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow,
                                       const at::Tensor& col, int64_t bn, int64_t bk) {
  const char* op = "block_sparse_linear_dw_cuda";
  check_bsr_dw(dy, x, crow, col, bn, bk, at::kCUDA);
  const int64_t M = x.size(0), K = x.size(1), N = dy.size(1), nnzb = col.numel();
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dya = aligned16(dy), xa = aligned16(x);
  at::Tensor dvalues = new_output({nnzb, bn, bk}, x.options());
  check_launch(cuda_launch::block_sparse_linear_dw(dya.data_ptr(), xa.data_ptr(), crow.data_ptr<int32_t>(),
                                                   col.data_ptr<int32_t>(), dvalues.data_ptr(), M, N, K, nnzb,
                                                   (int)bn, (int)bk, launch_dtype(x.scalar_type()),
                                                   c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return dvalues;
}

at::Tensor semi_structured_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                       const std::optional<at::Tensor>& bias) {
  const char* op = "semi_structured_linear_cuda";
  check_semi_structured(x, values, meta, bias, at::kCUDA);
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cuda_launch::DType dtype = launch_dtype(x.scalar_type());
  if (M > cuda_launch::kSemiStructuredMaxM) {
    // Compute-bound sizes: expand to dense once and use cuBLAS (fp32 accumulation, one rounding).
    at::Tensor w = at::empty({N, K}, x.options());
    check_launch(cuda_launch::semi_structured_decompress(aligned16(values).data_ptr(), meta.data_ptr<uint8_t>(),
                                                         w.data_ptr(), N, K, dtype, stream),
                 op);
    return bias.has_value() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  }
  const at::Tensor xa = aligned16(x), va = aligned16(values);
  at::Tensor y = new_output({M, N}, x.options());
  check_launch(cuda_launch::semi_structured_linear(xa.data_ptr(), va.data_ptr(), meta.data_ptr<uint8_t>(),
                                                   bias.has_value() ? bias->data_ptr() : nullptr, y.data_ptr(), M, N,
                                                   K, dtype, stream),
               op);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("block_sparse_linear_fwd_cuda", &block_sparse_linear_fwd_cuda);
  m.impl("block_sparse_linear_dx_cuda", &block_sparse_linear_dx_cuda);
  m.impl("block_sparse_linear_dw_cuda", &block_sparse_linear_dw_cuda);
  m.impl("semi_structured_linear_cuda", &semi_structured_linear_cuda);
}

}  // namespace fastdistill
