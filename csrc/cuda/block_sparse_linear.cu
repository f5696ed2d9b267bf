// CUDA kernels of fastdistill::block_sparse_linear_{fwd,dx}_cuda (layouts: csrc/ops.cpp; dw lives in
// block_sparse_linear_dw.cu). Only the stored blocks are read and multiplied.
//   fwd / dx: one CTA per (M tile of 128 rows, or 256 with tile_m = 256 and 64-wide blocks; output block
//     row / block column); it loops over that row's (column's, through the CSC view) stored blocks: the
//     activation tile [tile, kb] and the weight block go to shared memory through a 4-stage cp.async
//     pipeline (3 stages where the GPU's shared memory is short: launch_wide), then mma.m16n8k16
//     (bf16/fp16) with float32 accumulators; bias and the single rounding in the epilogue. The grid's fast
//     dimension is the block row, so the CTAs in flight share one M tile of the activations in L2.
//   float32: the same loops with a shared-memory tiled FMA kernel (no TF32: exact fp32 products).
// Every sum runs in a fixed order (no atomics, no split-K): bitwise deterministic. Torch-free.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>

#include "fd_cuda_mma.h"
#include "fd_cuda_sparse.h"

namespace fastdistill {
namespace {

using mma::cp_async16;
using mma::ldmatrix_x4;
using mma::ldmatrix_x4_trans;

// cp.async pipeline depth: 4, or 3 where 4 stages of a 64-wide tile do not fit the GPU's shared memory
// (sm_86/sm_89/sm_120 allow 99 KB per CTA: 128 x 64 x 64 bf16 needs 108 KB with 4 stages, 81 KB with 3).
constexpr int kStages = 4;
constexpr int kPad = 8;  // 16 bytes of padding per shared-memory row: ldmatrix without bank conflicts

// Warps over a BM x BNO output tile: 4 warps for BM = 128 (2 CTAs per SM fit in shared memory), 8 for
// BM = 256 (BNO = 64 only: half the weight-block reloads per FLOP, one CTA per SM); warp tiles are
// 64 x 32 (BNO = 64), 32 x 32 or 32 x 16.
template <int BNO, int BM>
struct TileWarps {
  static constexpr int NW = BM / 32, WM = BNO == 64 ? NW / 2 : NW, WN = NW / WM;
  static constexpr int TM = BM / WM, TN = BNO / WN, MT = TM / 16, NT = TN / 8;
  static_assert(TN % 16 == 0, "ldmatrix.x4 loads two n-tiles of B");
};

// Elements of one fwd/dx pipeline stage: the activation tile [bm][kb + pad] and the weight block,
// [bno][kb + pad] (fwd, rows = output features) or [kb][bno + pad] (dx, rows = reduction index).
__host__ __device__ constexpr int stage_elems(int bno, int kb, bool dx, int bm) {
  return bm * (kb + kPad) + (dx ? kb * (bno + kPad) : bno * (kb + kPad));
}

__device__ __forceinline__ int log2_small(int v) { return v == 16 ? 1 : v == 32 ? 2 : 3; }  // of v / 8

// out[m, blk*BNO + n] = bias + sum over the stored blocks q in [ptr[blk], ptr[blk+1]) of
//   a[m, idx[q]*KB + k] * B_q[k][n], where B_q[k][n] = block[n][k] (fwd) or block[k][n] (dx).
template <typename T, int BNO, int BM, bool DX, int STAGES>
__global__ void __launch_bounds__(BM)
    bsr_mma_kernel(const T* __restrict__ a, int64_t lda, const T* __restrict__ values,
                   const int32_t* __restrict__ ptr, const int32_t* __restrict__ idx, const int32_t* __restrict__ perm,
                   const T* __restrict__ bias, T* __restrict__ out, int64_t ldo, int64_t M, int KB) {
  using W = TileWarps<BNO, BM>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int blk = blockIdx.x;
  const int64_t m0 = (int64_t)blockIdx.y * BM;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / W::WN, wn = warp % W::WN;
  const int beg = ptr[blk], nblk = ptr[blk + 1] - beg;
  const int as = KB + kPad, bs = DX ? BNO + kPad : KB + kPad;
  const int selems = stage_elems(BNO, KB, DX, BM);
  const int ash = log2_small(KB);                 // 16-byte chunks per activation row: 1 << ash
  const int bsh = DX ? log2_small(BNO) : ash;     // ... per weight-block row
  const int brows = DX ? KB : BNO;

  auto load_stage = [&](int j, int stage) {
    T* As = smem + stage * selems;
    T* Bs = As + BM * as;
    const int q = beg + j;
    const int64_t acol = (int64_t)idx[q] * KB;
    const int p = DX ? perm[q] : q;
    for (int e = tid; e < (BM << ash); e += BM) {
      const int r = e >> ash, ch = e & ((1 << ash) - 1);
      const bool ok = m0 + r < M;
      cp_async16(As + r * as + ch * 8, a + (ok ? m0 + r : 0) * lda + acol + ch * 8, ok);
    }
    const T* src = values + (int64_t)p * BNO * KB;
    for (int e = tid; e < (brows << bsh); e += BM) {
      const int r = e >> bsh, ch = e & ((1 << bsh) - 1);
      cp_async16(Bs + r * bs + ch * 8, src + (r << bsh) * 8 + ch * 8, true);
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
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nblk) load_stage(s, s);
    mma::cp_async_commit();
  }
  for (int j = 0; j < nblk; ++j) {
    mma::cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage j landed for every thread; stage j - 1 is free for the prefetch
    if (j + STAGES - 1 < nblk) load_stage(j + STAGES - 1, (j + STAGES - 1) % STAGES);
    mma::cp_async_commit();
    const T* As = smem + (j % STAGES) * selems;
    const T* Bs = As + BM * as;
    for (int kk = 0; kk < KB; kk += 16) {
      uint32_t af[W::MT][4], bf[W::NT][2];
#pragma unroll
      for (int mt = 0; mt < W::MT; ++mt)
        ldmatrix_x4(af[mt], As + (wm * W::TM + mt * 16 + (lane & 15)) * as + kk + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < W::NT / 2; ++np) {
        uint32_t r[4];
        const int n0 = wn * W::TN + np * 16;
        if (DX)
          ldmatrix_x4_trans(r, Bs + (kk + (lane & 7) + ((lane >> 3) & 1) * 8) * bs + n0 + (lane >> 4) * 8);
        else
          ldmatrix_x4(r, Bs + (n0 + (lane & 7) + (lane >> 4) * 8) * bs + kk + ((lane >> 3) & 1) * 8);
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

  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < W::NT; ++nt) {
    const int64_t col = (int64_t)blk * BNO + wn * W::TN + nt * 8 + 2 * t;
    const float b0 = bias != nullptr ? mma::to_f(bias[col]) : 0.0f;
    const float b1 = bias != nullptr ? mma::to_f(bias[col + 1]) : 0.0f;
#pragma unroll
    for (int mt = 0; mt < W::MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m0 + wm * W::TM + mt * 16 + g + 8 * h;
        if (m < M)
          *reinterpret_cast<uint32_t*>(out + m * ldo + col) =
              mma::pack2<T>(acc[mt][nt][2 * h] + b0, acc[mt][nt][2 * h + 1] + b1);
      }
  }
}

// float32 fwd/dx: a 64 x BNO tile per CTA, 256 threads, thread (ty, tx) owns rows ty + 16i and
// columns tx + 16j; exact fp32 FMAs in a fixed order.
template <bool DX>
__global__ void __launch_bounds__(256)
    bsr_f32_kernel(const float* __restrict__ a, int64_t lda, const float* __restrict__ values,
                   const int32_t* __restrict__ ptr, const int32_t* __restrict__ idx, const int32_t* __restrict__ perm,
                   const float* __restrict__ bias, float* __restrict__ out, int64_t ldo, int64_t M, int BNO, int KB) {
  __shared__ float As[64][65];  // [m][k]
  __shared__ float Bs[64][65];  // [k][n]
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int blk = blockIdx.x;
  const int64_t m0 = (int64_t)blockIdx.y * 64;
  float acc[4][4] = {};
  for (int q = ptr[blk]; q < ptr[blk + 1]; ++q) {
    const int64_t acol = (int64_t)idx[q] * KB;
    const float* block = values + (int64_t)(DX ? perm[q] : q) * BNO * KB;
    __syncthreads();  // the previous block's tiles are no longer read
    for (int e = tid; e < 64 * KB; e += 256) {
      const int r = e / KB, k = e % KB;
      As[r][k] = m0 + r < M ? a[(m0 + r) * lda + acol + k] : 0.0f;
    }
    for (int e = tid; e < BNO * KB; e += 256) {
      if (DX) Bs[e / BNO][e % BNO] = block[e];  // block [k][n]
      else Bs[e % KB][e / KB] = block[e];       // block [n][k]
    }
    __syncthreads();
    for (int k = 0; k < KB; ++k) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = As[ty + 16 * i][k];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = Bs[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = __fmaf_rn(av[i], bv[j], acc[i][j]);
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (16 * j >= BNO) break;
    const int64_t col = (int64_t)blk * BNO + tx + 16 * j;
    const float b = bias != nullptr ? bias[col] : 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (m0 + ty + 16 * i < M) out[(m0 + ty + 16 * i) * ldo + col] = acc[i][j] + b;
  }
}

// ---- launchers ----

constexpr int64_t kMaxGridY = 65535;

// Largest dynamic shared memory per CTA on the current GPU (opt-in limit; FASTDISTILL_BSR_MAX_SMEM lowers it,
// so that a GPU with more memory runs the kernels an sm_86/sm_89 GPU would get).
int max_smem_per_block() {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return 0;
  if (const char* cap = std::getenv("FASTDISTILL_BSR_MAX_SMEM")) bytes = std::min(bytes, std::atoi(cap));
  return bytes;
}

template <typename T, int BNO, int BM, bool DX, int STAGES>
int smem_bytes(int KB) {
  return STAGES * stage_elems(BNO, KB, DX, BM) * (int)sizeof(T);
}

template <typename T, int BNO, int BM, bool DX, int STAGES>
int launch_mma(const void* a, int64_t lda, const void* values, const int32_t* ptr, const int32_t* idx,
               const int32_t* perm, const void* bias, void* out, int64_t ldo, int64_t M, int64_t nout, int KB,
               cudaStream_t stream) {
  const auto kernel = bsr_mma_kernel<T, BNO, BM, DX, STAGES>;
  const int smem = smem_bytes<T, BNO, BM, DX, STAGES>(KB);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return (int)err;
  if ((M + BM - 1) / BM > kMaxGridY) return (int)cudaErrorInvalidConfiguration;
  const dim3 grid((unsigned)nout, (unsigned)((M + BM - 1) / BM));
  kernel<<<grid, BM, smem, stream>>>(static_cast<const T*>(a), lda, static_cast<const T*>(values), ptr, idx, perm,
                                      static_cast<const T*>(bias), static_cast<T*>(out), ldo, M, KB);
  return (int)cudaGetLastError();
}

// 64-wide blocks: the 256-row tile when asked for and it fits, else 128 rows with 4 stages, else 3.
template <typename T, bool DX>
int launch_wide(const void* a, int64_t lda, const void* values, const int32_t* ptr, const int32_t* idx,
                const int32_t* perm, const void* bias, void* out, int64_t ldo, int64_t M, int64_t nout, int KB,
                int tile_m, cudaStream_t stream) {
  const int limit = max_smem_per_block();
#define FD_BSR_LAUNCH(BM, S) \
  launch_mma<T, 64, BM, DX, S>(a, lda, values, ptr, idx, perm, bias, out, ldo, M, nout, KB, stream)
  if (tile_m == 256 && smem_bytes<T, 64, 256, DX, kStages>(KB) <= limit) return FD_BSR_LAUNCH(256, kStages);
  if (smem_bytes<T, 64, 128, DX, kStages>(KB) <= limit) return FD_BSR_LAUNCH(128, kStages);
  return FD_BSR_LAUNCH(128, kStages - 1);
#undef FD_BSR_LAUNCH
}

template <bool DX>
int launch_tiles(const void* a, int64_t lda, const void* values, const int32_t* ptr, const int32_t* idx,
                 const int32_t* perm, const void* bias, void* out, int64_t ldo, int64_t M, int64_t nout, int BNO,
                 int KB, int tile_m, cuda_launch::DType dtype, cudaStream_t stream) {
  if (M == 0 || nout == 0) return 0;
  if ((BNO != 16 && BNO != 32 && BNO != 64) || (KB != 16 && KB != 32 && KB != 64)) return (int)cudaErrorInvalidValue;
  if (dtype == cuda_launch::F32) {
    if ((M + 63) / 64 > kMaxGridY) return (int)cudaErrorInvalidConfiguration;
    const dim3 grid((unsigned)nout, (unsigned)((M + 63) / 64));
    bsr_f32_kernel<DX><<<grid, 256, 0, stream>>>(static_cast<const float*>(a), lda, static_cast<const float*>(values),
                                                 ptr, idx, perm, static_cast<const float*>(bias),
                                                 static_cast<float*>(out), ldo, M, BNO, KB);
    return (int)cudaGetLastError();
  }
  // 16- and 32-wide tiles need at most 92 KB with 4 stages: they fit every sm_80+ GPU (99 KB or more).
#define FD_BSR_LAUNCH(T, B) \
  launch_mma<T, B, 128, DX, kStages>(a, lda, values, ptr, idx, perm, bias, out, ldo, M, nout, KB, stream)
#define FD_BSR_WIDE(T) launch_wide<T, DX>(a, lda, values, ptr, idx, perm, bias, out, ldo, M, nout, KB, tile_m, stream)
  if (dtype == cuda_launch::BF16) {
    if (BNO == 16) return FD_BSR_LAUNCH(__nv_bfloat16, 16);
    if (BNO == 32) return FD_BSR_LAUNCH(__nv_bfloat16, 32);
    return FD_BSR_WIDE(__nv_bfloat16);
  }
  if (BNO == 16) return FD_BSR_LAUNCH(__half, 16);
  if (BNO == 32) return FD_BSR_LAUNCH(__half, 32);
  return FD_BSR_WIDE(__half);
#undef FD_BSR_LAUNCH
#undef FD_BSR_WIDE
}

}  // namespace

namespace cuda_launch {

int block_sparse_linear_fwd(const void* x, const void* values, const int32_t* crow, const int32_t* col,
                            const void* bias, void* y, int64_t M, int64_t N, int64_t K, int bn, int bk, int tile_m,
                            DType dtype, cudaStream_t stream) {
  return launch_tiles<false>(x, K, values, crow, col, nullptr, bias, y, N, M, N / bn, bn, bk, tile_m, dtype, stream);
}

int block_sparse_linear_dx(const void* dy, const void* values, const int32_t* ccol, const int32_t* row,
                           const int32_t* perm, void* dx, int64_t M, int64_t N, int64_t K, int bn, int bk,
                           int tile_m, DType dtype, cudaStream_t stream) {
  return launch_tiles<true>(dy, N, values, ccol, row, perm, nullptr, dx, K, M, K / bk, bk, bn, tile_m, dtype, stream);
}

}  // namespace cuda_launch
}  // namespace fastdistill
