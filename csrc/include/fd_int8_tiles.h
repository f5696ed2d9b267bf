// Tiles of the W8A8 CPU GEMM (driver: csrc/cpu/int8_gemm_u8s8.cpp; layout and exactness: fd_int8_gemm.h).
#pragma once

#include <cstdint>
#include <cstring>

#include "fd_cpu_isa.h"
#include "fd_int8_gemm.h"

#if FD_X86
#include <immintrin.h>
#endif

namespace fastdistill {
namespace {

constexpr int kLdc = 32;  // row stride of a tile's int32 results (up to two panels)

// c[i * kLdc + j] (+)= sum_k a[i, k] w[j, k] over kc (a multiple of 4) values of k, for rows i < mr and the np
// panels at wp, wp + pstride (16 columns each); accumulate: add to c, else overwrite it.
// as: signed rows, au: their u8 form (|a| for avx2, a + 128 for vnni: the epilogue subtracts 128 * colsum).
using TileFn = void (*)(int mr, const int8_t* as, const uint8_t* au, int64_t lda, const int8_t* wp, int64_t pstride,
                        int64_t kc, bool accumulate, int32_t* c);

void scalar_tile(int mr, const int8_t* as, const uint8_t*, int64_t lda, const int8_t* wp, int64_t, int64_t kc,
                 bool accumulate, int32_t* c) {
  for (int i = 0; i < mr; ++i) {
    int32_t s[kW8A8Panel] = {};
    const int8_t* a = as + i * lda;
    for (int64_t k = 0; k < kc; k += 4)
      for (int j = 0; j < kW8A8Panel; ++j)
        for (int b = 0; b < 4; ++b) s[j] += int32_t(a[k + b]) * int32_t(wp[k * 16 + j * 4 + b]);
    for (int j = 0; j < kW8A8Panel; ++j) c[i * kLdc + j] = (accumulate ? c[i * kLdc + j] : 0) + s[j];
  }
}

#if FD_X86
#define FD_AVX2 __attribute__((target("avx2")))
FD_AVX2 FD_INLINE __m256i bcast4(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
FD_AVX2 FD_INLINE __m256i ld(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
FD_AVX2 FD_INLINE void st(int32_t* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }

// kSwap = false: vpmaddubsw(|a|, sign(w, a)); true: vpmaddubsw(|w|, sign(a, w)). Pairs stay below 2^15.
// MR <= 3 rows x NP <= 2 panels (3 x 2 measured ~25% faster than 4 x 1 on the dev CPU). Accumulators are named
// variables (an array of them made GCC spill inside the loop).
template <int MR, int NP, bool kSwap>
FD_AVX2 void avx2_tile(int, const int8_t* as, const uint8_t* au, int64_t lda, const int8_t* wp, int64_t pstride,
                       int64_t kc, bool accumulate, int32_t* c) {
  const __m256i z = _mm256_setzero_si256(), ones = _mm256_set1_epi16(1);
  __m256i c00 = z, c01 = z, c02 = z, c03 = z, c10 = z, c11 = z, c12 = z, c13 = z, c20 = z, c21 = z, c22 = z, c23 = z;
  const int8_t *a0 = as, *a1 = as + lda, *a2 = as + 2 * lda;
  const uint8_t *u0 = au, *u1 = au + lda, *u2 = au + 2 * lda;
  for (int64_t k = 0; k < kc; k += 4) {
#define FD_ROW(A, U, X0, X1)                                                      \
  {                                                                               \
    const __m256i s = bcast4(A + k);                                              \
    __m256i p0, p1;                                                               \
    if constexpr (kSwap) {                                                        \
      p0 = _mm256_maddubs_epi16(_mm256_abs_epi8(w0), _mm256_sign_epi8(s, w0));    \
      p1 = _mm256_maddubs_epi16(_mm256_abs_epi8(w1), _mm256_sign_epi8(s, w1));    \
    } else {                                                                      \
      const __m256i u = bcast4(U + k);                                            \
      p0 = _mm256_maddubs_epi16(u, _mm256_sign_epi8(w0, s));                      \
      p1 = _mm256_maddubs_epi16(u, _mm256_sign_epi8(w1, s));                      \
    }                                                                             \
    X0 = _mm256_add_epi32(X0, _mm256_madd_epi16(p0, ones));                       \
    X1 = _mm256_add_epi32(X1, _mm256_madd_epi16(p1, ones));                       \
  }
    {
      if constexpr (MR == 1) _mm_prefetch(reinterpret_cast<const char*>(wp + k * 16 + 1024), _MM_HINT_T0);  // GEMV
      const __m256i w0 = ld(wp + k * 16), w1 = ld(wp + k * 16 + 32);
      FD_ROW(a0, u0, c00, c01)
      if constexpr (MR > 1) FD_ROW(a1, u1, c10, c11)
      if constexpr (MR > 2) FD_ROW(a2, u2, c20, c21)
    }
    if constexpr (NP > 1) {
      const int8_t* wq = wp + pstride;
      if constexpr (MR == 1) _mm_prefetch(reinterpret_cast<const char*>(wq + k * 16 + 1024), _MM_HINT_T0);
      const __m256i w0 = ld(wq + k * 16), w1 = ld(wq + k * 16 + 32);
      FD_ROW(a0, u0, c02, c03)
      if constexpr (MR > 1) FD_ROW(a1, u1, c12, c13)
      if constexpr (MR > 2) FD_ROW(a2, u2, c22, c23)
    }
#undef FD_ROW
  }
  const __m256i r[3][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}};
  for (int i = 0; i < MR; ++i)
    for (int h = 0; h < 2 * NP; ++h) {
      int32_t* o = c + i * kLdc + h * 8;
      st(o, accumulate ? _mm256_add_epi32(ld(o), r[i][h]) : r[i][h]);
    }
}

// VNNI tiles: vpdpbusd(a + 128, w), no int16 step (int32 wraps cancel with the colsum correction).
template <int MR>
__attribute__((target("avx2,avxvnni"))) void vnni256_tile(int, const int8_t*, const uint8_t* au, int64_t lda,
                                                           const int8_t* wp, int64_t, int64_t kc, bool accumulate,
                                                           int32_t* c) {
  __m256i acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  for (int64_t k = 0; k < kc; k += 4) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + k * 16));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + k * 16 + 32));
    for (int i = 0; i < MR; ++i) {
      int32_t v;
      std::memcpy(&v, au + i * lda + k, 4);
      const __m256i u = _mm256_set1_epi32(v);
      acc[i][0] = _mm256_dpbusd_avx_epi32(acc[i][0], u, w0);
      acc[i][1] = _mm256_dpbusd_avx_epi32(acc[i][1], u, w1);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int h = 0; h < 2; ++h) {
      __m256i* o = reinterpret_cast<__m256i*>(c + i * kLdc + h * 8);
      _mm256_storeu_si256(o, accumulate ? _mm256_add_epi32(_mm256_loadu_si256(o), acc[i][h]) : acc[i][h]);
    }
}

template <int MR, int NP>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void vnni512_tile(int, const int8_t*, const uint8_t* au,
                                                                         int64_t lda, const int8_t* wp, int64_t pstride,
                                                                         int64_t kc, bool accumulate, int32_t* c) {
  __m512i acc[MR][NP];
  for (int i = 0; i < MR; ++i)
    for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_setzero_si512();
  for (int64_t k = 0; k < kc; k += 4) {
    __m512i w[NP];
    for (int p = 0; p < NP; ++p) w[p] = _mm512_loadu_si512(wp + p * pstride + k * 16);
    for (int i = 0; i < MR; ++i) {
      int32_t v;
      std::memcpy(&v, au + i * lda + k, 4);
      const __m512i u = _mm512_set1_epi32(v);
      for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_dpbusd_epi32(acc[i][p], u, w[p]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int p = 0; p < NP; ++p) {
      int32_t* o = c + i * kLdc + p * 16;
      _mm512_storeu_si512(o, accumulate ? _mm512_add_epi32(_mm512_loadu_si512(o), acc[i][p]) : acc[i][p]);
    }
}
#endif

// The VNNI arithmetic on scalar loops: sum (a + 128) w in wrapping uint32 (the epilogue subtracts 128 colsum).
template <int NP>
void shift_tile(int mr, const int8_t*, const uint8_t* au, int64_t lda, const int8_t* wp, int64_t pstride, int64_t kc,
                bool accumulate, int32_t* c) {
  for (int i = 0; i < mr; ++i)
    for (int p = 0; p < NP; ++p) {
      uint32_t s[kW8A8Panel] = {};
      const uint8_t* u = au + i * lda;
      const int8_t* w = wp + p * pstride;
      for (int64_t k = 0; k < kc; k += 4)
        for (int j = 0; j < kW8A8Panel; ++j)
          for (int b = 0; b < 4; ++b) s[j] += uint32_t(int32_t(u[k + b]) * int32_t(w[k * 16 + j * 4 + b]));
      int32_t* o = c + i * kLdc + p * kW8A8Panel;
      for (int j = 0; j < kW8A8Panel; ++j) o[j] = int32_t((accumulate ? uint32_t(o[j]) : 0u) + s[j]);
    }
}

}  // namespace
}  // namespace fastdistill

