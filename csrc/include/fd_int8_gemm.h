// The W8A8 CPU GEMM on u8 x s8 arithmetic (csrc/cpu/int8_gemm_u8s8.cpp), used by int8_linear_cpu (weight packed
// per call) and int8_linear_dynamic_cpu (weight packed once by int8_pack_w8a8_cpu).
//
// Packed layout kW8A8Layout (one for every ISA, so a packed weight moves between machines of one version):
//   panels of 16 output columns, K zero-padded to K4 = a multiple of 4 (N zero-padded to N16 = a multiple of 16):
//   byte [p * 16 * K4 + (k / 4) * 64 + j * 4 + k % 4] = w[16 p + j, k], then int32 colsum[N16] = sum_k w[n, k].
// Paths (all give the exact int32 sums, so the same bits after the shared epilogue):
//   scalar   portable int32 loops
//   avx2     vpmaddubsw(|a|, sign(w, a)) + vpmaddwd(., 1): a pair is <= 2 * 128 * 127 < 2^15, never saturates,
//            exact unless w holds -128 (-(-128) overflows); such weights (kW8A8HasM128, only from users' raw
//            int8) take the swapped form vpmaddubsw(|w|, sign(a, w)), exact unless a holds -128 too (then scalar)
//   vnni     vpdpbusd(a + 128, w) - 128 * colsum (no int16 step; exact for every int8, int32 wraps cancel)
//   vnni_scalar  the vnni arithmetic and blocking on scalar tiles: tests check the VNNI plumbing on any CPU
// FASTDISTILL_INT8_CPU_PATH = auto | scalar | avx2 | vnni | vnni_scalar (read per call) forces one path (tests).
// auto: vnni where the CPU has avx512_vnni or avx_vnni and a one-time worst-case self-check against scalar passes
// (else a warning and avx2), else avx2, else scalar. The tiles live in fd_int8_tiles.h.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastdistill {

constexpr uint32_t kW8A8Layout = 1;
constexpr uint32_t kW8A8HasM128 = 1;  // header flag: the weight holds -128
constexpr int64_t kW8A8Panel = 16;

inline int64_t w8a8_k4(int64_t K) { return (K + 3) / 4 * 4; }
inline int64_t w8a8_n16(int64_t N) { return (N + kW8A8Panel - 1) / kW8A8Panel * kW8A8Panel; }
inline int64_t w8a8_payload_bytes(int64_t N, int64_t K) {
  return w8a8_n16(N) * w8a8_k4(K) + w8a8_n16(N) * int64_t(sizeof(int32_t));
}

// Packs w [N, K] (row-major int8) into `payload` (w8a8_payload_bytes; padding written as zeros); returns the
// header flags.
uint32_t pack_w8a8_payload(const int8_t* w, int64_t N, int64_t K, uint8_t* payload);

// Rows of A for the GEMM: fill(m0, m1, a, lda, xs) writes rows m0..m1-1 of the int8 activations into
// a[(m - m0) * lda + k] (k < K; the driver zeroes the padding k in [K, lda)) and their scales into
// xs[m - m0]; it returns true if a row holds -128. Called from several threads on disjoint rows.
struct W8A8Rows {
  virtual ~W8A8Rows() = default;
  virtual bool fill(int64_t m0, int64_t m1, int8_t* a, int64_t lda, float* xs) const = 0;
};

// out[m, n] = ((float)sum_k a[m, k] w[n, k] * xs[m]) * ws[n] (+ bias[n]) in out_dtype, row-major [M, N].
void gemm_w8a8(const W8A8Rows& rows, int64_t M, int64_t N, int64_t K, const uint8_t* payload, uint32_t flags,
               const float* ws, const float* bias, void* out, at::ScalarType out_dtype);

}  // namespace fastdistill
