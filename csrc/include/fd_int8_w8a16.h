// W8A16 tiles on a packed int8 weight (issue 14; ops in csrc/cpu/int8_weight_only_packed.cpp).
// Layout kLayout: panels of 8 output channels, [ceil(N / 8)][K][8] int8 (channels past N are zero; panels
// panel_stride(K) bytes apart), so at one k
// an 8-byte load holds 8 channels' weights: widened to fp32 (vpmovsxbd + vcvtdq2ps), multiplied by the
// broadcast x[m, k] and added into 8 outputs at once: no horizontal sums, one FMA chain per output.
// Summation order, the same on every path (the scalar path uses std::fma, so AVX2 and scalar give the same bits):
//   acc_g = fma(x[m, k], w[n, k], acc_g) over k in group g in order; tot = fma(acc_g, w_scale[n, g], tot) over g;
//   out = tot + bias[n], then one rounding to x's dtype.
#pragma once

#include <cmath>
#include <cstdint>

#include "fd_cpu_isa.h"

#if FD_X86
#include <immintrin.h>
#endif

namespace fastdistill::w8a16 {

constexpr uint32_t kLayout = 1;
constexpr int64_t kPanel = 8;

inline int64_t panels(int64_t n) { return (n + kPanel - 1) / kPanel; }
// Bytes from one panel to the next: K * 8 rounded up to a cache line, plus one line, so that the panels a tile
// reads together start in different L1 sets (at K * 8 = 32 KiB they all hit one set: 2x slower at M = 1).
inline int64_t panel_stride(int64_t k) { return (k * kPanel + 63) / 64 * 64 + 64; }
inline int64_t payload_bytes(int64_t n, int64_t k) { return panels(n) * panel_stride(k); }

struct Problem {
  const float* x;    // rows of x in fp32 (the input itself or a widened / smoothed copy), row stride ldx
  int64_t ldx, K, N, G, gs;
  const int8_t* w;   // packed payload
  const float* ws;   // w_scale [N, G] (G = 1 per channel)
};

// Scales of the 8 channels of panel p at group g (0 past N).
FD_INLINE void panel_scales(const Problem& pb, int64_t p, int64_t g, float* s) {
  for (int64_t l = 0; l < kPanel; ++l) {
    const int64_t n = p * kPanel + l;
    s[l] = n < pb.N ? pb.ws[n * pb.G + g] : 0.0f;
  }
}

// Any CPU: MB rows of x times panel p -> res[i * 8 + l] (no bias).
template <int MB>
void tile_scalar(const Problem& pb, const float* x, int64_t p, float* res) {
  const int8_t* w = pb.w + p * panel_stride(pb.K);
  float s[kPanel];
  for (int i = 0; i < MB; ++i)
    for (int64_t l = 0; l < kPanel; ++l) res[i * kPanel + l] = 0.0f;
  for (int64_t g = 0; g < pb.G; ++g) {
    panel_scales(pb, p, g, s);
    for (int i = 0; i < MB; ++i) {
      const float* xr = x + i * pb.ldx;
      for (int64_t l = 0; l < kPanel; ++l) {
        float acc = 0.0f;
        for (int64_t k = g * pb.gs; k < (g + 1) * pb.gs; ++k)
          acc = std::fma(xr[k], static_cast<float>(w[k * kPanel + l]), acc);
        res[i * kPanel + l] = std::fma(acc, s[l], res[i * kPanel + l]);
      }
    }
  }
}

#if FD_X86
// AVX2: MB rows x NP panels -> res[i * NP * 8 + j * 8 + l]. MB * NP accumulators (>= 6 where MB allows) hide
// the FMA latency; each widened weight vector serves MB rows.
template <int MB, int NP>
__attribute__((target("avx2,fma"))) void tile_avx2(const Problem& pb, const float* x, int64_t p0, float* res) {
  const int64_t K = pb.K;
  const int8_t* w = pb.w + p0 * panel_stride(K);
  const int64_t ps = panel_stride(K);
  // The running totals over groups live in res (memory): only the accumulators stay in registers. The i / j loops
  // are unrolled early (pragmas) so that acc[][] becomes registers: else acc was stored to the stack every k.
  for (int i = 0; i < MB * NP * kPanel; ++i) res[i] = 0.0f;
  for (int64_t g = 0; g < pb.G; ++g) {
    __m256 acc[MB][NP];
    #pragma GCC unroll 16
    for (int i = 0; i < MB; ++i)
      #pragma GCC unroll 16
      for (int j = 0; j < NP; ++j) acc[i][j] = _mm256_setzero_ps();
    const int64_t k1 = (g + 1) * pb.gs;
    for (int64_t k = g * pb.gs; k < k1; ++k) {
      // One widened weight vector live at a time (MB * NP accumulators + MB broadcasts + 1 fit 16 registers).
      if constexpr (NP == 1) {
        const __m128i b8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k * kPanel));
        const __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b8));
        #pragma GCC unroll 16
        for (int i = 0; i < MB; ++i)
          acc[i][0] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + i * pb.ldx + k), wf, acc[i][0]);
      } else {
        __m256 xb[MB];
        #pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) xb[i] = _mm256_broadcast_ss(x + i * pb.ldx + k);
        #pragma GCC unroll 16
        for (int j = 0; j < NP; ++j) {
          const __m128i b8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + j * ps + k * kPanel));
          const __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b8));
          #pragma GCC unroll 16
          for (int i = 0; i < MB; ++i) acc[i][j] = _mm256_fmadd_ps(xb[i], wf, acc[i][j]);
        }
      }
    }
    #pragma GCC unroll 16
    for (int j = 0; j < NP; ++j) {
      alignas(32) float s[kPanel];
      panel_scales(pb, p0 + j, g, s);
      const __m256 sv = _mm256_load_ps(s);
      #pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) {
        float* r = res + (i * NP + j) * kPanel;
        _mm256_storeu_ps(r, _mm256_fmadd_ps(acc[i][j], sv, _mm256_loadu_ps(r)));
      }
    }
  }
}
#endif

// Panels per tile for MB rows: about 8 accumulators, at most 8 rows x 1 panel.
constexpr int panels_for(int mb) { return mb <= 1 ? 8 : mb == 2 ? 4 : mb <= 4 ? 2 : 1; }

}  // namespace fastdistill::w8a16
