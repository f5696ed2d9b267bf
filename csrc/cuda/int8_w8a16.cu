// CUDA kernels of fastdistill::int8_weight_only_linear_cuda (W8A16): out = x · dequant(w_int8)ᵀ (+ bias).
//
// bf16/fp16 x, K % 16 == 0, per-channel or group_size % 64 == 0 (the common cases): a tensor-core
// kernel (mma.sync m16n8k16, fp32 accumulation) computing outᵀ = W · xᵀ, so that the 16 weight rows
// of a warp tile are the MMA's M side and the tokens (8 per tile) its N side: at M = 1..16 (decode)
// the weight streams from memory once, in 16-byte loads, and nothing is padded to 16 tokens.
// The int8 weights go into the MMA as exact bf16/fp16 integers (converted with byte permutes, not the
// quarter-rate I2F), and the scale is applied to the fp32 result (per channel: once at the end; per
// group: to each 64-wide chunk's partial sum). The K order inside a 64-wide chunk is permuted so that
// each lane's 16 weight bytes and 16 x values feed its fragments directly (the same permutation on
// both operands leaves the dot product unchanged).
// Small M: 8 warps split K and their partial sums are added in a fixed order through shared memory;
// no atomics, bitwise deterministic. M > 16 runs the same register-tiled kernel with 32-token tiles and
// x fragments read through L1 (no shared-memory staging): correct, but on an H200 it measured 0.55x
// bf16 cuBLAS at M = 64 and 0.23x at M = 4096 (N = K = 8192), where a tiled smem pipeline is the fix.
// Everything else (fp32 x, K % 16 != 0, small groups, unaligned pointers): a plain smem-tiled fp32
// kernel that dequantizes w * scale per element as the schema in csrc/ops.cpp writes it.
// Torch-free: compiles with a bare `nvcc -c`.
#include <cuda_runtime.h>

#include "fd_cuda_int8.h"
#include "fd_cuda_int8_dev.cuh"

namespace fastdistill {
namespace {

using cuda_launch::DType;
using mma::from_f;
using mma::to_f;

// 4 int8 (natural byte order) -> {x2(e0, e1), x2(e2, e3)} in the MMA's 16-bit type, exactly.
template <typename T>
struct Dequant;

template <>
struct Dequant<__nv_bfloat16> {
  // s + 128 as the low mantissa byte of 2^23 gives the float 2^23 + 128 + s; subtracting yields s;
  // the top 16 bits of an integer-valued float with |s| <= 128 are its exact bf16.
  static __device__ __forceinline__ void run(uint32_t w, uint32_t& lo, uint32_t& hi) {
    const uint32_t u = w ^ 0x80808080u;
    const float f0 = __fsub_rn(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7650)), 8388736.0f);
    const float f1 = __fsub_rn(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7651)), 8388736.0f);
    const float f2 = __fsub_rn(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7652)), 8388736.0f);
    const float f3 = __fsub_rn(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7653)), 8388736.0f);
    lo = __byte_perm(__float_as_uint(f0), __float_as_uint(f1), 0x7632);
    hi = __byte_perm(__float_as_uint(f2), __float_as_uint(f3), 0x7632);
  }
};

template <>
struct Dequant<__half> {
  // 0x64uu is the half 1024 + u; subtracting 1152 (0x6480) gives s = u - 128 exactly.
  static __device__ __forceinline__ void run(uint32_t w, uint32_t& lo, uint32_t& hi) {
    const uint32_t u = w ^ 0x80808080u;
    const __half2 bias = __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480));
    const uint32_t l = __byte_perm(u, 0x64646464u, 0x5140), h = __byte_perm(u, 0x64646464u, 0x5342);
    const __half2 lh = __hsub2(*reinterpret_cast<const __half2*>(&l), bias);
    const __half2 hh = __hsub2(*reinterpret_cast<const __half2*>(&h), bias);
    lo = *reinterpret_cast<const uint32_t*>(&lh);
    hi = *reinterpret_cast<const uint32_t*>(&hh);
  }
};

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {  // i is a compile-time constant here
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ uint4 load16(const void* p, bool pred) {
  return pred ? __ldg(static_cast<const uint4*>(p)) : make_uint4(0u, 0u, 0u, 0u);
}

// Lane (g = lane / 4, t = lane % 4) of a warp loads, per 64-wide K chunk at kb, bytes kb + 16t .. +16 of
// weight rows g and g + 8 of each 16-row tile, and x[token g][kb + 16t .. +16] of each 8-token tile.
// MMA step s (of 4) uses weight bytes / x values 4s .. 4s + 3 of those 16: fragment columns 2t, 2t+1
// hold elements 4s, 4s+1 and columns 2t+8, 2t+9 hold 4s+2, 4s+3, for A (weights) and B (x) alike.
// Block: WN warps along N (R tiles of 16 rows each) x WK warps splitting the chunks; MT tiles of 8 tokens.
// Decode configs (WN == 1): at most 128 registers, two 256-thread blocks per SM, so that N = 8192
// (256 blocks) runs in one wave.
template <typename T, int R, int MT, int WN, int WK, int U, bool GROUPED>
__global__ void __launch_bounds__(32 * WN * WK, WN == 1 ? 2 : 1)
    w8a16_mma_kernel(const T* __restrict__ x, const int8_t* __restrict__ w, const float* __restrict__ w_scale,
                     int group_size, const void* __restrict__ bias, DType bias_dtype, T* __restrict__ out, int M,
                     int N, int K) {
  constexpr int BN = 16 * R * WN, BM = 8 * MT, NACC = R * MT * 4;
  __shared__ float red[WK > 1 ? (WK - 1) * WN * NACC * 32 : 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wn = warp % WN, wk = warp / WN, g = lane >> 2, t = lane & 3;
  const int n_base = blockIdx.x * BN + wn * 16 * R;
  const int nch = (K + 63) / 64, groups = GROUPED ? K / group_size : 1;

  const int8_t* wrow[R][2];
  int rown[R][2];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      rown[r][h] = n_base + 16 * r + 8 * h + g;
      wrow[r][h] = w + (int64_t)min(rown[r][h], N - 1) * K + 16 * t;  // clamped rows are never stored
    }

  for (int mb = blockIdx.y * BM; mb < M; mb += gridDim.y * BM) {
    const T* xrow[MT];
#pragma unroll
    for (int j = 0; j < MT; ++j) xrow[j] = x + (int64_t)min(mb + 8 * j + g, M - 1) * K + 16 * t;
    float acc[R][MT][4];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[r][j][e] = 0.0f;

    for (int c0 = wk; c0 < nch; c0 += WK * U) {
      uint4 wv[U][R][2], xv[U][MT][2];  // all loads of U chunks in flight before the first MMA
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int kb = (c0 + u * WK) * 64;
        const bool ok = kb + 16 * t < K;  // K % 16 == 0: a lane's 16 elements are all in or all out
#pragma unroll
        for (int r = 0; r < R; ++r) {
          wv[u][r][0] = load16(wrow[r][0] + kb, ok);
          wv[u][r][1] = load16(wrow[r][1] + kb, ok);
        }
#pragma unroll
        for (int j = 0; j < MT; ++j) {
          xv[u][j][0] = load16(xrow[j] + kb, ok);
          xv[u][j][1] = load16(xrow[j] + kb + 8, ok);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int kb = (c0 + u * WK) * 64;
        if (kb >= K) break;  // uniform across the warp
        float part[R][MT][4];
        if constexpr (GROUPED) {
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int j = 0; j < MT; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e) part[r][j][e] = 0.0f;
        }
#pragma unroll
        for (int s = 0; s < 4; ++s) {
#pragma unroll
          for (int r = 0; r < R; ++r) {
            uint32_t a[4];
            Dequant<T>::run(word(wv[u][r][0], s), a[0], a[2]);
            Dequant<T>::run(word(wv[u][r][1], s), a[1], a[3]);
#pragma unroll
            for (int j = 0; j < MT; ++j) {
              const uint4& xs = xv[u][j][s / 2];
              const uint32_t b[2] = {word(xs, 2 * (s % 2)), word(xs, 2 * (s % 2) + 1)};
              mma::mma16816<T>(GROUPED ? part[r][j] : acc[r][j], a, b);
            }
          }
        }
        if constexpr (GROUPED) {  // group_size % 64 == 0: the whole chunk is in group kb / group_size
          const int gi = kb / group_size;
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const float s0 = w_scale[(int64_t)min(rown[r][0], N - 1) * groups + gi];
            const float s1 = w_scale[(int64_t)min(rown[r][1], N - 1) * groups + gi];
#pragma unroll
            for (int j = 0; j < MT; ++j) {
              acc[r][j][0] = __fmaf_rn(part[r][j][0], s0, acc[r][j][0]);
              acc[r][j][1] = __fmaf_rn(part[r][j][1], s0, acc[r][j][1]);
              acc[r][j][2] = __fmaf_rn(part[r][j][2], s1, acc[r][j][2]);
              acc[r][j][3] = __fmaf_rn(part[r][j][3], s1, acc[r][j][3]);
            }
          }
        }
      }
    }

    if constexpr (WK > 1) {  // fixed-order sum of the K splits: warp wk = 0 adds 1, 2, ... in turn
      float* mine = red + (((wk - 1) * WN + wn) * NACC) * 32 + lane;
      if (wk > 0) {
#pragma unroll
        for (int e = 0; e < NACC; ++e) mine[e * 32] = (&acc[0][0][0])[e];
      }
      __syncthreads();
      if (wk == 0) {
        for (int o = 1; o < WK; ++o) {
          const float* theirs = red + (((o - 1) * WN + wn) * NACC) * 32 + lane;
#pragma unroll
          for (int e = 0; e < NACC; ++e) (&acc[0][0][0])[e] = __fadd_rn((&acc[0][0][0])[e], theirs[e * 32]);
        }
      }
      __syncthreads();  // red is reused by the next token block
    }
    if (wk != 0) continue;

    // C fragment: e = 0, 1 -> row g, tokens 2t, 2t+1; e = 2, 3 -> row g + 8, same tokens.
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = rown[r][h];
        if (n >= N) continue;
        const float sc = GROUPED ? 1.0f : w_scale[n];
        const float b = bias != nullptr ? int8_dev::load_as_float(bias, bias_dtype, n) : 0.0f;
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int m = mb + 8 * j + 2 * t + e;
            if (m >= M) continue;
            float v = GROUPED ? acc[r][j][2 * h + e] : __fmul_rn(acc[r][j][2 * h + e], sc);
            if (bias != nullptr) v = __fadd_rn(v, b);
            out[(int64_t)m * N + n] = from_f<T>(v);
          }
      }
  }
}

// Fallback: BM tokens x 64 channels per block, 32-wide K steps through shared memory, each thread
// 4 channels x BM/16 tokens; w * scale dequantized per element into shared memory.
constexpr int kSimtThreads = 256, kSimtBN = 64, kSimtBK = 32;

template <typename T, int BM>
__global__ void __launch_bounds__(kSimtThreads, 2)
    w8a16_simt_kernel(const T* __restrict__ x, const int8_t* __restrict__ w, const float* __restrict__ w_scale,
                      int group_size, const void* __restrict__ bias, DType bias_dtype, T* __restrict__ out, int M,
                      int N, int K) {
  constexpr int TM = BM / 16;
  __shared__ float xs[kSimtBK][BM + 1];
  __shared__ float wsm[kSimtBK][kSimtBN + 1];
  const int tid = threadIdx.x, tn = tid % 16, tm = tid / 16;
  const int n0 = blockIdx.x * kSimtBN, groups = group_size > 0 ? K / group_size : 1;
  for (int m0 = blockIdx.y * BM; m0 < M; m0 += gridDim.y * BM) {
    float acc[TM][4];
#pragma unroll
    for (int j = 0; j < TM; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][i] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += kSimtBK) {
      for (int i = tid; i < BM * kSimtBK; i += kSimtThreads) {
        const int m = m0 + i / kSimtBK, k = k0 + i % kSimtBK;
        xs[i % kSimtBK][i / kSimtBK] = (m < M && k < K) ? to_f(x[(int64_t)m * K + k]) : 0.0f;
      }
      for (int i = tid; i < kSimtBN * kSimtBK; i += kSimtThreads) {
        const int n = n0 + i / kSimtBK, k = k0 + i % kSimtBK;
        float v = 0.0f;
        if (n < N && k < K) {
          const float s = group_size > 0 ? w_scale[(int64_t)n * groups + k / group_size] : w_scale[n];
          v = __fmul_rn(__int2float_rn(w[(int64_t)n * K + k]), s);
        }
        wsm[i % kSimtBK][i / kSimtBK] = v;
      }
      __syncthreads();
      // Two-level sum (per 32-wide step, then across steps): the rounding error grows with
      // K / 32 + 32 instead of K, close to a blocked GEMM's.
      float part[TM][4];
#pragma unroll
      for (int j = 0; j < TM; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) part[j][i] = 0.0f;
#pragma unroll 8
      for (int k = 0; k < kSimtBK; ++k) {
        float wk[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) wk[i] = wsm[k][tn + 16 * i];
#pragma unroll
        for (int j = 0; j < TM; ++j) {
          const float xv = xs[k][tm + 16 * j];
#pragma unroll
          for (int i = 0; i < 4; ++i) part[j][i] = __fmaf_rn(xv, wk[i], part[j][i]);
        }
      }
#pragma unroll
      for (int j = 0; j < TM; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[j][i] = __fadd_rn(acc[j][i], part[j][i]);
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = n0 + tn + 16 * i;
      if (n >= N) continue;
      const float b = bias != nullptr ? int8_dev::load_as_float(bias, bias_dtype, n) : 0.0f;
#pragma unroll
      for (int j = 0; j < TM; ++j) {
        const int m = m0 + tm + 16 * j;
        if (m < M) out[(int64_t)m * N + n] = from_f<T>(bias != nullptr ? __fadd_rn(acc[j][i], b) : acc[j][i]);
      }
    }
  }
}

unsigned grid_y(int M, int BM) { return (unsigned)min((M + BM - 1) / BM, 65535); }

template <typename T, int R, int MT, int WN, int WK, int U>
int launch_mma(const void* x, const int8_t* w, const float* ws, int gs, const void* bias, DType bd, void* out, int M,
               int N, int K, cudaStream_t stream) {
  constexpr int BN = 16 * R * WN;
  const dim3 grid((unsigned)((N + BN - 1) / BN), grid_y(M, 8 * MT));
  const T* xt = static_cast<const T*>(x);
  T* o = static_cast<T*>(out);
  if (gs > 0) {  // the per-chunk partial sums need registers: one chunk in flight, no spills
    w8a16_mma_kernel<T, R, MT, WN, WK, 1, true><<<grid, 32 * WN * WK, 0, stream>>>(xt, w, ws, gs, bias, bd, o, M, N, K);
  } else {
    w8a16_mma_kernel<T, R, MT, WN, WK, U, false><<<grid, 32 * WN * WK, 0, stream>>>(xt, w, ws, gs, bias, bd, o, M, N, K);
  }
  return (int)cudaGetLastError();
}

template <typename T>
int launch_typed(const void* x, const int8_t* w, const float* ws, int gs, const void* bias, DType bd, void* out, int M,
                 int N, int K, bool use_mma, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    if (use_mma) {
      // Decode sizes: 8 warps split K over 32 weight rows (256 blocks at N = 8192, all resident).
      // Best of a sweep on an H200 (R 1/2/4, WK 4/8/16, WN 1/2, U 1/2/4), N = K = 8192 bf16:
      // 24.6 us at M = 1, 25.1 at M = 8, 28.2 at M = 16 per channel (2.7 / 2.7 / 2.4 TB/s of weights).
      if (M <= 8) return launch_mma<T, 2, 1, 1, 8, 2>(x, w, ws, gs, bias, bd, out, M, N, K, stream);
      if (M <= 16) return launch_mma<T, 2, 2, 1, 8, 2>(x, w, ws, gs, bias, bd, out, M, N, K, stream);
      return launch_mma<T, 2, 4, 2, 2, 1>(x, w, ws, gs, bias, bd, out, M, N, K, stream);
    }
  }
  const T* xt = static_cast<const T*>(x);
  T* o = static_cast<T*>(out);
  const unsigned gx = (unsigned)((N + kSimtBN - 1) / kSimtBN);
  if (M <= 16) {
    w8a16_simt_kernel<T, 16><<<dim3(gx, 1), kSimtThreads, 0, stream>>>(xt, w, ws, gs, bias, bd, o, M, N, K);
  } else {
    w8a16_simt_kernel<T, 64><<<dim3(gx, grid_y(M, 64)), kSimtThreads, 0, stream>>>(xt, w, ws, gs, bias, bd, o, M, N, K);
  }
  return (int)cudaGetLastError();
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

namespace cuda_launch {

int int8_weight_only_linear(const void* x, DType x_dtype, const int8_t* w, const float* w_scale, int64_t group_size,
                            const void* bias, DType bias_dtype, void* out, int64_t M, int64_t N, int64_t K,
                            cudaStream_t stream) {
  if (M == 0 || N == 0) return 0;
  if (M > 0x7fffffff || N > 0x7fffffff || K > 0x7fffffff || group_size < 0 ||
      (group_size > 0 && K % group_size != 0))
    return (int)cudaErrorInvalidValue;
  const bool use_mma = K % 16 == 0 && group_size % 64 == 0 && aligned16(x) && aligned16(w);
  const int m = (int)M, n = (int)N, k = (int)K, gs = (int)group_size;
  switch (x_dtype) {
    case F32:
      return launch_typed<float>(x, w, w_scale, gs, bias, bias_dtype, out, m, n, k, false, stream);
    case BF16:
      return launch_typed<__nv_bfloat16>(x, w, w_scale, gs, bias, bias_dtype, out, m, n, k, use_mma, stream);
    default:
      return launch_typed<__half>(x, w, w_scale, gs, bias, bias_dtype, out, m, n, k, use_mma, stream);
  }
}

}  // namespace cuda_launch
}  // namespace fastdistill
