// Launchers of the sparse CUDA kernels (block_sparse_linear{,_dw}.cu, semi_structured_linear.cu): plain
// pointers and sizes, shared by bindings_sparse.cpp (ATen side) and the torch-free .cu files.
// Layouts and arithmetic: the sparse comment block of csrc/ops.cpp. Every tensor is contiguous,
// 16-byte aligned (the bindings guarantee it), index arrays are int32. Each launcher returns a
// cudaError_t as int (0 on success) and launches nothing when the output is empty.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "fd_cuda_launch.h"

namespace fastdistill {
namespace cuda_launch {

// y [M, N] = x [M, K] · Wᵀ (+ bias [N] or null), W in BSR (values [nnzb, bn, bk], crow, col).
// tile_m: M rows per CTA of the bf16/fp16 kernels, 128 or 256 (256 only for 64-wide output tiles; a
// tuning knob the benchmark sweeps, any other value means 128).
int block_sparse_linear_fwd(const void* x, const void* values, const int32_t* crow, const int32_t* col,
                            const void* bias, void* y, int64_t M, int64_t N, int64_t K, int bn, int bk, int tile_m,
                            DType dtype, cudaStream_t stream);

// dx [M, K] = dy [M, N] · W, over the CSC view (ccol, row, perm) of the same blocks.
int block_sparse_linear_dx(const void* dy, const void* values, const int32_t* ccol, const int32_t* row,
                           const int32_t* perm, void* dx, int64_t M, int64_t N, int64_t K, int bn, int bk,
                           int tile_m, DType dtype, cudaStream_t stream);

// dvalues [nnzb, bn, bk]: dvalues[p] = dy[:, rows of p]ᵀ · x[:, cols of p] over all M, one CTA per block.
int block_sparse_linear_dw(const void* dy, const void* x, const int32_t* crow, const int32_t* col, void* dvalues,
                           int64_t M, int64_t N, int64_t K, int64_t nnzb, int bn, int bk, DType dtype,
                           cudaStream_t stream);

// Largest M the streaming 2:4 kernel takes; larger M goes to decompress + dense GEMM (bindings).
constexpr int64_t kSemiStructuredMaxM = 64;

// y [M, N] = x [M, K] · Wᵀ (+ bias) from values [N, K/2] + meta [N, (K/4+1)/2] (2:4), M <= kSemiStructuredMaxM.
int semi_structured_linear(const void* x, const void* values, const uint8_t* meta, const void* bias, void* y,
                           int64_t M, int64_t N, int64_t K, DType dtype, cudaStream_t stream);

// w [N, K] (dense, zeros at the pruned positions) from values + meta: the large-M path.
int semi_structured_decompress(const void* values, const uint8_t* meta, void* w, int64_t N, int64_t K, DType dtype,
                               cudaStream_t stream);

}  // namespace cuda_launch
}  // namespace fastdistill
