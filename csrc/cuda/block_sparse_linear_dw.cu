// CUDA kernels of fastdistill::block_sparse_linear_dw_cuda (layouts: csrc/ops.cpp): the weight gradient
// of the stored blocks only (the pattern is kept). One CTA per stored block p computes
// dvalues[p] = dy[:, rows of p]ᵀ · x[:, cols of p] over all M: bf16/fp16 through a 4-stage cp.async
// pipeline of 64-row slices and mma.m16n8k16 (both operands read transposed with ldmatrix.trans),
// float32 through a shared-memory tiled FMA kernel. M is summed in a fixed order (no split, no
// atomics): bitwise deterministic. Torch-free.
#include <cuda_runtime.h>

#include "fd_cuda_mma.h"
#include "fd_cuda_sparse.h"

namespace fastdistill {
namespace {

using mma::cp_async16;
using mma::ldmatrix_x4_trans;

constexpr int kMK = 64;     // M rows per pipeline stage
constexpr int kStages = 4;  // cp.async pipeline depth
constexpr int kPad = 8;     // 16 bytes of padding per shared-memory row: ldmatrix without bank conflicts

// The block row of stored block p: the last r with crow[r] <= p (crow[0] = 0 <= p < crow[nbr]).
__device__ __forceinline__ int block_row_of(const int32_t* __restrict__ crow, int nbr, int p) {
  int lo = 0, hi = nbr;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (crow[mid] <= p) lo = mid;
    else hi = mid;
  }
  return lo;
}

// dw: warps over the BN x BK output block (1, 2 or 4 warps, each at least 16 x 16).
template <int BN, int BK>
struct DwWarps {
  static constexpr int WM = BN >= 32 ? 2 : 1, WN = BK >= 32 ? 2 : 1, NW = WM * WN;
  static constexpr int TM = BN / WM, TN = BK / WN, MT = TM / 16, NT = TN / 8;
  static constexpr int DS = BN + kPad, XS = BK + kPad, SE = kMK * (DS + XS);  // stage: dy [kMK][BN], x [kMK][BK]
};

template <typename T, int BN, int BK>
__global__ void __launch_bounds__(DwWarps<BN, BK>::NW * 32)
    bsr_dw_mma_kernel(const T* __restrict__ dy, const T* __restrict__ x, const int32_t* __restrict__ crow, int nbr,
                      const int32_t* __restrict__ col, T* __restrict__ dvalues, int64_t M, int64_t N, int64_t K) {
  using W = DwWarps<BN, BK>;
  constexpr int NTHR = W::NW * 32;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int p = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / W::WN, wn = warp % W::WN;
  const T* dyb = dy + (int64_t)block_row_of(crow, nbr, p) * BN;
  const T* xb = x + (int64_t)col[p] * BK;
  const int nst = (int)((M + kMK - 1) / kMK);

  auto load_stage = [&](int s, int stage) {
    T* Ds = smem + stage * W::SE;
    T* Xs = Ds + kMK * W::DS;
    const int64_t ms = (int64_t)s * kMK;
    for (int e = tid; e < kMK * (BN / 8); e += NTHR) {
      const int r = e / (BN / 8), ch = e % (BN / 8);
      const bool ok = ms + r < M;
      cp_async16(Ds + r * W::DS + ch * 8, dyb + (ok ? ms + r : 0) * N + ch * 8, ok);
    }
    for (int e = tid; e < kMK * (BK / 8); e += NTHR) {
      const int r = e / (BK / 8), ch = e % (BK / 8);
      const bool ok = ms + r < M;
      cp_async16(Xs + r * W::XS + ch * 8, xb + (ok ? ms + r : 0) * K + ch * 8, ok);
    }
  };

  float acc[W::MT][W::NT][4];
#pragma unroll
  for (int i = 0; i < W::MT; ++i)
#pragma unroll
    for (int j = 0; j < W::NT; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.0f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nst) load_stage(s, s);
    mma::cp_async_commit();
  }
  for (int s = 0; s < nst; ++s) {
    mma::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (s + kStages - 1 < nst) load_stage(s + kStages - 1, (s + kStages - 1) % kStages);
    mma::cp_async_commit();
    const T* Ds = smem + (s % kStages) * W::SE;
    const T* Xs = Ds + kMK * W::DS;
#pragma unroll
    for (int kk = 0; kk < kMK; kk += 16) {
      uint32_t af[W::MT][4], bf[W::NT][2];
      const int mi = lane >> 3;
#pragma unroll
      for (int mt = 0; mt < W::MT; ++mt)  // A[i][m] = dy[m][i]: transposed loads
        ldmatrix_x4_trans(af[mt], Ds + (kk + (lane & 7) + (mi >> 1) * 8) * W::DS + wm * W::TM + mt * 16 + (mi & 1) * 8);
#pragma unroll
      for (int np = 0; np < W::NT / 2; ++np) {  // B[m][j] = x[m][j], stored [m][j]: transposed loads
        uint32_t r[4];
        ldmatrix_x4_trans(r, Xs + (kk + (lane & 7) + ((lane >> 3) & 1) * 8) * W::XS + wn * W::TN + np * 16 +
                                 (lane >> 4) * 8);
        bf[2 * np][0] = r[0];
        bf[2 * np][1] = r[1];
        bf[2 * np + 1][0] = r[2];
        bf[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < W::MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < W::NT; ++nt) mma::mma16816<T>(acc[mt][nt], af[mt], bf[nt]);
    }
  }
  mma::cp_async_wait<0>();

  T* out = dvalues + (int64_t)p * BN * BK;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < W::MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < W::NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = wm * W::TM + mt * 16 + g + 8 * h, j = wn * W::TN + nt * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(out + i * BK + j) = mma::pack2<T>(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
      }
}

// float32 dw: thread (ty, tx) owns dvalues[p][ty + 16a][tx + 16b]; M in 32-row steps.
__global__ void __launch_bounds__(256)
    bsr_dw_f32_kernel(const float* __restrict__ dy, const float* __restrict__ x, const int32_t* __restrict__ crow,
                      int nbr, const int32_t* __restrict__ col, float* __restrict__ dvalues, int64_t M, int64_t N,
                      int64_t K, int BN, int BK) {
  __shared__ float Ds[32][64];
  __shared__ float Xs[32][64];
  const int p = blockIdx.x, tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const float* dyb = dy + (int64_t)block_row_of(crow, nbr, p) * BN;
  const float* xb = x + (int64_t)col[p] * BK;
  float acc[4][4] = {};
  for (int64_t ms = 0; ms < M; ms += 32) {
    __syncthreads();
    for (int e = tid; e < 32 * BN; e += 256) {
      const int r = e / BN, i = e % BN;
      Ds[r][i] = ms + r < M ? dyb[(ms + r) * N + i] : 0.0f;
    }
    for (int e = tid; e < 32 * BK; e += 256) {
      const int r = e / BK, j = e % BK;
      Xs[r][j] = ms + r < M ? xb[(ms + r) * K + j] : 0.0f;
    }
    __syncthreads();
    for (int m = 0; m < 32; ++m) {
      float dv[4], xv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) dv[i] = Ds[m][(ty + 16 * i) & 63];
#pragma unroll
      for (int j = 0; j < 4; ++j) xv[j] = Xs[m][(tx + 16 * j) & 63];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = __fmaf_rn(dv[i], xv[j], acc[i][j]);
    }
  }
  float* out = dvalues + (int64_t)p * BN * BK;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (ty + 16 * i < BN && tx + 16 * j < BK) out[(ty + 16 * i) * BK + tx + 16 * j] = acc[i][j];
}

template <typename T, int BN, int BK>
int launch_dw(const void* dy, const void* x, const int32_t* crow, int nbr, const int32_t* col, void* dvalues,
              int64_t M, int64_t N, int64_t K, int64_t nnzb, cudaStream_t stream) {
  using W = DwWarps<BN, BK>;
  const auto kernel = bsr_dw_mma_kernel<T, BN, BK>;
  const int smem = kStages * W::SE * (int)sizeof(T);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return (int)err;
  kernel<<<(unsigned)nnzb, W::NW * 32, smem, stream>>>(static_cast<const T*>(dy), static_cast<const T*>(x), crow, nbr,
                                                       col, static_cast<T*>(dvalues), M, N, K);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_dw_sizes(const void* dy, const void* x, const int32_t* crow, int nbr, const int32_t* col, void* dvalues,
                    int64_t M, int64_t N, int64_t K, int64_t nnzb, int bn, int bk, cudaStream_t stream) {
#define FD_DW(BN, BK) \
  if (bn == BN && bk == BK) return launch_dw<T, BN, BK>(dy, x, crow, nbr, col, dvalues, M, N, K, nnzb, stream)
  FD_DW(16, 16);
  FD_DW(16, 32);
  FD_DW(16, 64);
  FD_DW(32, 16);
  FD_DW(32, 32);
  FD_DW(32, 64);
  FD_DW(64, 16);
  FD_DW(64, 32);
  FD_DW(64, 64);
#undef FD_DW
  return (int)cudaErrorInvalidValue;
}

}  // namespace

namespace cuda_launch {

int block_sparse_linear_dw(const void* dy, const void* x, const int32_t* crow, const int32_t* col, void* dvalues,
                           int64_t M, int64_t N, int64_t K, int64_t nnzb, int bn, int bk, DType dtype,
                           cudaStream_t stream) {
  if (nnzb == 0) return 0;
  const int nbr = (int)(N / bn);
  if (dtype == F32) {
    if (bn > 64 || bk > 64) return (int)cudaErrorInvalidValue;
    bsr_dw_f32_kernel<<<(unsigned)nnzb, 256, 0, stream>>>(static_cast<const float*>(dy), static_cast<const float*>(x),
                                                          crow, nbr, col, static_cast<float*>(dvalues), M, N, K, bn,
                                                          bk);
    return (int)cudaGetLastError();
  }
  if (dtype == BF16) return launch_dw_sizes<__nv_bfloat16>(dy, x, crow, nbr, col, dvalues, M, N, K, nnzb, bn, bk, stream);
  return launch_dw_sizes<__half>(dy, x, crow, nbr, col, dvalues, M, N, K, nnzb, bn, bk, stream);
}

}  // namespace cuda_launch
}  // namespace fastdistill
