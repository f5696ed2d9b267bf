// CUDA kernels of fastdistill::semi_structured_linear_cuda (2:4 layout: csrc/ops.cpp), for small M
// (decode-like, memory-bound: M <= kSemiStructuredMaxM). Only the compressed values + meta are read:
// half the weight bytes plus 1/8 for the metadata.
//
// bf16/fp16: mma.m16n8k16 with the 2:4 weight decompressed in registers. A warp owns 16 weight rows
// (two n-tiles of 8) and walks K in 64-column steps; in a step lane (g, t) loads, for its rows g and
// g + 8, the 16 contiguous columns 16t..16t+15 (4 groups: one 16-byte load of 8 values, 2 bytes of meta).
// The MMA's reduction index is permuted (any order sums the same terms): in sub-step j, lane t's
// k-slots (2t, 2t+1, 2t+8, 2t+9) are the 4 columns of its group j, so each group expands with two byte
// permutes into exactly the B fragment (b0 = columns 0-1, b1 = columns 2-3) and the matching x
// columns are one 8-byte load per row (a0|a2 for row g, a1|a3 for row g + 8). x is tiny and read
// through L1. The CTA's 8 warps are 2 row groups x 4 K-splits (steps interleaved so the warps share
// x in L1); the 4 partial sums are added in a fixed order through shared memory: deterministic.
// float32: a warp per weight row, lanes over groups, a fixed butterfly reduction.
// Larger M: the bindings decompress (semi_structured_decompress) and run a dense GEMM.
#include <cuda_runtime.h>

#include "fd_cuda_mma.h"
#include "fd_cuda_sparse.h"

namespace fastdistill {
namespace {

constexpr int kKSplit = 4;                     // warps per row group, each a quarter of the K steps
constexpr int kRowGroups = 2;                  // row groups (16 rows each) per CTA
constexpr int kWarps = kKSplit * kRowGroups;   // 8
constexpr int kRows = 16 * kRowGroups;         // weight rows per CTA
constexpr int kUnroll = 2;                     // K steps per load batch (double-buffered in registers)

// Byte-permute selectors expanding a group's (v0, v1) word into its 4 columns, by 4-bit meta nibble:
// low 16 bits -> columns 0-1, high 16 bits -> columns 2-3. Selector 4 picks a zero byte.
__device__ __forceinline__ uint32_t group_selectors(int nib) {
  const int i0 = nib & 3, i1 = nib >> 2;
  uint32_t sel = 0;
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const uint32_t s = p == i0 ? 0x10u : (p == i1 ? 0x32u : 0x44u);
    sel |= s << (8 * p);
  }
  return sel;
}

// One lane's weight data for one K step: the (v0, v1) word of each of its 4 groups and their 4 nibbles.
template <int NT>
struct Chunk {
  uint32_t w[NT][4];
  uint32_t nib[NT];
};

// Streaming loads of the weight (read once: no L1 allocation, so x stays in L1). asm volatile keeps
// them in program order, ahead of the MMAs that follow; zeros when !pred.
__device__ __forceinline__ void load_stream16(uint32_t (&r)[4], const void* p, bool pred) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n"
      " mov.b32 %3, 0;\n @p ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
      : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
      : "l"(p), "r"((int)pred));
}
__device__ __forceinline__ uint32_t load_stream2(const void* p, bool pred) {
  unsigned short v;
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n mov.b16 %0, 0;\n @p ld.global.nc.L1::no_allocate.u16 %0, [%1];\n}\n"
      : "=h"(v)
      : "l"(p), "r"((int)pred));
  return v;
}

template <typename T, int MT, bool VEC>
__global__ void __launch_bounds__(kWarps * 32)
    semi_mma_kernel(const T* __restrict__ x, const T* __restrict__ values, const uint8_t* __restrict__ meta,
                    const T* __restrict__ bias, T* __restrict__ y, int64_t M, int64_t N, int64_t K) {
  constexpr int NT = 2;
  __shared__ uint32_t sel_tab[16];
  __shared__ float red[kWarps][MT * NT * 4][32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int ks = warp % kKSplit, rg = warp / kKSplit;
  const int g = lane >> 2, t = lane & 3;
  if (tid < 16) sel_tab[tid] = group_selectors(tid);
  __syncthreads();

  const int64_t half_k = K / 2, meta_row = (K / 4 + 1) / 2, groups = K / 4;
  const int64_t nsteps = (K + 63) / 64;
  const int64_t n_base = (int64_t)blockIdx.x * kRows + rg * 16;
  int64_t rows[NT];
  bool row_ok[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    rows[nt] = n_base + nt * 8 + g;
    row_ok[nt] = rows[nt] < N;
  }
  const int64_t xr0 = g, xr1 = g + 8;  // x rows of m-tile 0 for a0|a2 and a1|a3

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.0f;

  // Weight chunks of kUnroll steps; the next batch is loaded (ordered asm loads) before the current
  // batch's MMAs, so a warp always has 2 x kUnroll x NT 16-byte loads in flight.
  Chunk<NT> cur[kUnroll], nxt[kUnroll];
  auto load = [&](int64_t s0, Chunk<NT>(&c)[kUnroll]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t s = s0 + (int64_t)u * kKSplit, g0 = s * 16 + 4 * t;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const T* vrow = values + rows[nt] * half_k;
        const uint8_t* mrow = meta + rows[nt] * meta_row;
        if (VEC) {  // K % 16 == 0: the 4 groups are all in range or all out
          const bool ok = row_ok[nt] && s < nsteps && g0 < groups;
          load_stream16(c[u].w[nt], vrow + 2 * g0, ok);
          c[u].nib[nt] = load_stream2(mrow + g0 / 2, ok);
        } else {
          c[u].nib[nt] = 0;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int64_t gj = g0 + j;
            const bool ok = row_ok[nt] && s < nsteps && gj < groups;
            c[u].w[nt][j] = ok ? __ldg(reinterpret_cast<const uint32_t*>(vrow + 2 * gj)) : 0u;
            const uint32_t b = ok ? __ldg(mrow + gj / 2) : 0u;
            c[u].nib[nt] |= ((b >> (4 * (gj & 1))) & 15u) << (4 * j);
          }
        }
      }
    }
  };
  auto compute = [&](int64_t s0, const Chunk<NT>(&c)[kUnroll]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t s = s0 + (int64_t)u * kKSplit;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t gj = s * 16 + 4 * t + j;
        const bool col_ok = s < nsteps && gj < groups;
        uint32_t bf[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint32_t sel = sel_tab[(c[u].nib[nt] >> (4 * j)) & 15u];
          bf[nt][0] = __byte_perm(c[u].w[nt][j], 0u, sel & 0xffffu);
          bf[nt][1] = __byte_perm(c[u].w[nt][j], 0u, sel >> 16);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int64_t m0 = mt * 16 + xr0, m1 = mt * 16 + xr1;
          uint2 lo = make_uint2(0, 0), hi = make_uint2(0, 0);
          if (col_ok && m0 < M) lo = __ldg(reinterpret_cast<const uint2*>(x + m0 * K + 4 * gj));
          if (col_ok && m1 < M) hi = __ldg(reinterpret_cast<const uint2*>(x + m1 * K + 4 * gj));
          const uint32_t af[4] = {lo.x, hi.x, lo.y, hi.y};
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma::mma16816<T>(acc[mt][nt], af, bf[nt]);
        }
      }
    }
  };

  constexpr int64_t kStride = kKSplit * kUnroll;
  if (ks < nsteps) load(ks, cur);
  for (int64_t s0 = ks; s0 < nsteps; s0 += kStride) {
    if (s0 + kStride < nsteps) load(s0 + kStride, nxt);
    compute(s0, cur);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) cur[u] = nxt[u];
  }

  // Fixed-order sum of the K-split partials: ks = 0 + 1 + 2 + 3.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int v = 0; v < 4; ++v) red[warp][(mt * NT + nt) * 4 + v][lane] = acc[mt][nt][v];
  __syncthreads();
  if (ks != 0) return;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        float sum = acc[mt][nt][v];
#pragma unroll
        for (int k = 1; k < kKSplit; ++k) sum += red[warp + k][(mt * NT + nt) * 4 + v][lane];
        const int64_t m = mt * 16 + g + 8 * (v >> 1);
        const int64_t n = n_base + nt * 8 + 2 * t + (v & 1);
        if (m < M && n < N) y[m * N + n] = mma::from_f<T>(sum + (bias != nullptr ? mma::to_f(bias[n]) : 0.0f));
      }
    }
}

// float32: one warp per weight row; lanes take groups g = lane, lane + 32, ...; 16 rows of x per pass.
__global__ void __launch_bounds__(256)
    semi_f32_kernel(const float* __restrict__ x, const float* __restrict__ values, const uint8_t* __restrict__ meta,
                    const float* __restrict__ bias, float* __restrict__ y, int64_t M, int64_t N, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t n = (int64_t)blockIdx.x * 8 + (threadIdx.x >> 5);
  if (n >= N) return;
  const int64_t groups = K / 4, meta_row = (K / 4 + 1) / 2;
  const float* vrow = values + n * (K / 2);
  const uint8_t* mrow = meta + n * meta_row;
  const float b = bias != nullptr ? bias[n] : 0.0f;
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    float acc[16] = {};
    for (int64_t gi = lane; gi < groups; gi += 32) {
      const float2 v = *reinterpret_cast<const float2*>(vrow + 2 * gi);
      const int nib = (mrow[gi / 2] >> (4 * (gi & 1))) & 15;
      const int64_t c0 = 4 * gi + (nib & 3), c1 = 4 * gi + (nib >> 2);
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        if (m0 + i < M) {
          const float* xr = x + (m0 + i) * K;
          acc[i] = __fmaf_rn(v.y, xr[c1], __fmaf_rn(v.x, xr[c0], acc[i]));
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      float s = acc[i];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (lane == 0 && m0 + i < M) y[(m0 + i) * N + n] = s + b;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256)
    semi_decompress_kernel(const T* __restrict__ values, const uint8_t* __restrict__ meta, T* __restrict__ w,
                           int64_t N, int64_t K) {
  const int64_t groups = K / 4, meta_row = (K / 4 + 1) / 2, total = N * groups;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = e / groups, gi = e % groups;
    const int nib = (meta[n * meta_row + gi / 2] >> (4 * (gi & 1))) & 15;
    const T v0 = values[n * (K / 2) + 2 * gi], v1 = values[n * (K / 2) + 2 * gi + 1];
    T* out = w + n * K + 4 * gi;
#pragma unroll
    for (int p = 0; p < 4; ++p) out[p] = p == (nib & 3) ? v0 : (p == (nib >> 2) ? v1 : mma::from_f<T>(0.0f));
  }
}

template <typename T, bool VEC>
int launch_mma_m(const void* x, const void* values, const uint8_t* meta, const void* bias, void* y, int64_t M,
                 int64_t N, int64_t K, cudaStream_t stream) {
  const dim3 grid((unsigned)((N + kRows - 1) / kRows));
  const T *xp = static_cast<const T*>(x), *vp = static_cast<const T*>(values), *bp = static_cast<const T*>(bias);
  T* yp = static_cast<T*>(y);
  if (M <= 16) semi_mma_kernel<T, 1, VEC><<<grid, kWarps * 32, 0, stream>>>(xp, vp, meta, bp, yp, M, N, K);
  else if (M <= 32) semi_mma_kernel<T, 2, VEC><<<grid, kWarps * 32, 0, stream>>>(xp, vp, meta, bp, yp, M, N, K);
  else semi_mma_kernel<T, 4, VEC><<<grid, kWarps * 32, 0, stream>>>(xp, vp, meta, bp, yp, M, N, K);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_mma(const void* x, const void* values, const uint8_t* meta, const void* bias, void* y, int64_t M,
               int64_t N, int64_t K, cudaStream_t stream) {
  if (K % 16 == 0) return launch_mma_m<T, true>(x, values, meta, bias, y, M, N, K, stream);
  return launch_mma_m<T, false>(x, values, meta, bias, y, M, N, K, stream);
}

}  // namespace

namespace cuda_launch {

int semi_structured_linear(const void* x, const void* values, const uint8_t* meta, const void* bias, void* y,
                           int64_t M, int64_t N, int64_t K, DType dtype, cudaStream_t stream) {
  if (M == 0 || N == 0) return 0;
  if (M > kSemiStructuredMaxM || K % 4 != 0) return (int)cudaErrorInvalidValue;
  if (dtype == F32) {
    semi_f32_kernel<<<(unsigned)((N + 7) / 8), 256, 0, stream>>>(
        static_cast<const float*>(x), static_cast<const float*>(values), meta, static_cast<const float*>(bias),
        static_cast<float*>(y), M, N, K);
    return (int)cudaGetLastError();
  }
  if (dtype == BF16) return launch_mma<__nv_bfloat16>(x, values, meta, bias, y, M, N, K, stream);
  return launch_mma<__half>(x, values, meta, bias, y, M, N, K, stream);
}

int semi_structured_decompress(const void* values, const uint8_t* meta, void* w, int64_t N, int64_t K, DType dtype,
                               cudaStream_t stream) {
  const int64_t total = N * (K / 4);
  if (total == 0) return 0;
  const unsigned blocks = (unsigned)(total / 256 + 1 < 65536 ? total / 256 + 1 : 65536);
  if (dtype == F32)
    semi_decompress_kernel<float><<<blocks, 256, 0, stream>>>(static_cast<const float*>(values), meta,
                                                              static_cast<float*>(w), N, K);
  else if (dtype == BF16)
    semi_decompress_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(values), meta, static_cast<__nv_bfloat16*>(w), N, K);
  else
    semi_decompress_kernel<__half><<<blocks, 256, 0, stream>>>(static_cast<const __half*>(values), meta,
                                                               static_cast<__half*>(w), N, K);
  return (int)cudaGetLastError();
}

}  // namespace cuda_launch
}  // namespace fastdistill
