// CPU kernels of the int8 ops (schemas and exact formulas in csrc/ops.cpp):
//   quantize_per_token_cpu     absmax + quantize per row, the row read from memory once
//   int8_linear_epilogue_cpu   int32 accumulators -> scaled (+ bias) output, one pass
//   int8_linear_cpu            W8A8 matmul: torch._int_mm where oneDNN has VNNI/AMX, else an AVX2
//                              int16-madd GEMM with the epilogue fused into its tiles (same bits)
// (W8A16: csrc/cpu/int8_weight_only_linear.cpp.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <vector>

#include "fd_checks.h"
#include "fd_cpu_isa.h"
#include "fd_int8_cpu.h"

#if FD_X86
#include <immintrin.h>
#endif

namespace fastdistill {
namespace {

FD_INLINE float to_f(float v) { return v; }
FD_INLINE float to_f(at::BFloat16 v) { return static_cast<float>(v); }
FD_INLINE float to_f(at::Half v) { return static_cast<float>(v); }

// Rows of x as float32: the row itself for contiguous float32, else widened into `buf`.
template <typename T>
FD_INLINE const float* widen(const T* row, int64_t K, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    for (int64_t k = 0; k < K; ++k) buf[k] = to_f(row[k]);
    return buf.data();
  }
}

// ---- quantize_per_token ----

// max |x| of a row as the bits of a float, compared as integers: for non-negative floats the integer order
// is the float order, and every NaN (0x7f800001..0x7fffffff once the sign is cleared) sorts above inf, so a
// row with a NaN gives a NaN (a float max reduction drops NaN).
FD_CLONES uint32_t row_absmax_bits(const float* x, int64_t K) {
  uint32_t a = 0;
#pragma omp simd reduction(max : a)
  for (int64_t k = 0; k < K; ++k) {
    uint32_t b;
    std::memcpy(&b, x + k, sizeof b);
    b &= 0x7fffffffu;
    a = b > a ? b : a;
  }
  return a;
}

// q = rint(clamp((x * pre) * inv, -127, 127)); nearbyintf rounds half to even (default rounding mode).
// pre is 1 (an exact no-op) except for tiny rows, where it is 2^64 (see quantize_row).
template <bool kPre>
FD_CLONES void row_quantize(const float* x, int64_t K, float pre, float inv, int8_t* q) {
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) {
    float v = (kPre ? x[k] * pre : x[k]) * inv;
    v = v > 127.0f ? 127.0f : v;
    v = v < -127.0f ? -127.0f : v;
    q[k] = static_cast<int8_t>(static_cast<int32_t>(__builtin_nearbyintf(v)));
  }
}

// One row by the rule in csrc/ops.cpp: NaN row -> scale NaN, inf row -> scale inf, zero row -> scale 0, all
// three with q = 0; a < 2^-64 -> x and a scaled by 2^64 first (127 / a overflows below ~3.7e-37).
FD_INLINE float quantize_row(const float* row, int64_t K, int8_t* q) {
  const uint32_t bits = row_absmax_bits(row, K);
  if (bits > 0x7f800000u) {
    std::memset(q, 0, K);
    return std::numeric_limits<float>::quiet_NaN();
  }
  float a;
  std::memcpy(&a, &bits, sizeof a);
  if (bits == 0 || bits == 0x7f800000u) {
    std::memset(q, 0, K);
    return a;  // 0 or inf
  }
  constexpr float kTiny = 0x1p-64f, kPre = 0x1p64f;
  if (a < kTiny) {
    row_quantize<true>(row, K, kPre, 127.0f / (a * kPre), q);
  } else {
    row_quantize<false>(row, K, 1.0f, 127.0f / a, q);
  }
  return a / 127.0f;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu(const at::Tensor& x) {
  check_rows(x, "x");
  TORCH_CHECK_TYPE(is_kernel_float(x.scalar_type()), "x: dtype ", x.scalar_type(),
                   " not supported (float32, bfloat16, float16)");
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = new_output({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = new_output({M}, x.options().dtype(at::kFloat));
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_per_token_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
        std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : K);
        for (int64_t m = b; m < e; ++m) sp[m] = quantize_row(widen(xp + m * K, K, buf), K, qp + m * K);
      });
    }
  });
  return {q, scale};
}

// ---- epilogue: t = ((float)acc * xs) * ws[n] (+ bias[n]), cast to the output dtype ----

template <typename O>
FD_INLINE void store(O* out, int64_t n, float t) {
  if constexpr (std::is_same_v<O, float>) {
    out[n] = t;
  } else {
    out[n] = static_cast<O>(t);  // c10's float -> bf16 / fp16 conversions round to nearest even
  }
}

template <typename O>
FD_CLONES void epilogue_row(const int32_t* acc, float xs, const float* ws, const float* bias, int64_t N, O* out) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) store(out, n, (static_cast<float>(acc[n]) * xs) * ws[n] + bias[n]);
  } else {
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) store(out, n, (static_cast<float>(acc[n]) * xs) * ws[n]);
  }
}

void check_scales(const at::Tensor& x_scale, int64_t M, const at::Tensor& w_scale, int64_t N,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x_scale.scalar_type() == at::kFloat && x_scale.dim() == 1 && x_scale.size(0) == M &&
                        x_scale.is_contiguous() && x_scale.device().is_cpu(),
                    "x_scale: expected a contiguous float32 CPU tensor of shape (", M, ",), got ",
                    x_scale.scalar_type(), " ", x_scale.sizes());
  TORCH_CHECK_VALUE(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 1 && w_scale.size(0) == N &&
                        w_scale.is_contiguous() && w_scale.device().is_cpu(),
                    "w_scale: expected a contiguous float32 CPU tensor of shape (", N, ",), got ",
                    w_scale.scalar_type(), " ", w_scale.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->is_floating_point() && bias->dim() == 1 && bias->size(0) == N && bias->device().is_cpu(),
                      "bias: expected a floating-point CPU tensor of shape (", N, ",), got ", bias->scalar_type(),
                      " ", bias->sizes());
  }
}

void check_out_dtype(at::ScalarType out_dtype) {
  TORCH_CHECK_TYPE(is_kernel_float(out_dtype), "out_dtype: ", out_dtype,
                   " not supported (float32, bfloat16, float16)");
}

at::Tensor int8_linear_epilogue_cpu(const at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& w_scale,
                                    const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  check_rows(acc, "acc");
  TORCH_CHECK_TYPE(acc.scalar_type() == at::kInt, "acc: expected int32, got ", acc.scalar_type());
  check_out_dtype(out_dtype);
  const int64_t M = acc.size(0), N = acc.size(1);
  check_scales(x_scale, M, w_scale, N, bias);
  at::Tensor bias_c;
  const float* bp = bias_f32(bias, bias_c);
  at::Tensor out = new_output({M, N}, acc.options().dtype(out_dtype));
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float *xs = x_scale.data_ptr<float>(), *ws = w_scale.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "int8_linear_epilogue_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t b, int64_t e) {
        for (int64_t m = b; m < e; ++m) epilogue_row(ap + m * N, xs[m], ws, bp, N, op + m * N);
      });
    }
  });
  return out;
}

// ---- W8A8 GEMM without VNNI: int8 widened to int16, _mm256_madd_epi16 (exact: |pair sum| <= 2^15 fits
// int32, and int32 sums are exact for K < 2^16 as with any int32 accumulator). Tiles of TM rows of x by
// TN rows of w; K is zero-padded to a multiple of 16 so the tiles have no K tail. ----

constexpr int64_t kNB = 32;  // rows of w per task (its int16 copy, kNB x K16, stays in L2)

#if FD_X86
template <int TM, int TN>
__attribute__((target("avx2"))) void madd_tile(const int16_t* x, const int16_t* w, int64_t K16, int32_t* acc) {
  __m256i a[TM][TN];
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) a[i][j] = _mm256_setzero_si256();
  for (int64_t k = 0; k < K16; k += 16) {
    __m256i wv[TN];
    for (int j = 0; j < TN; ++j) wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * K16 + k));
    for (int i = 0; i < TM; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * K16 + k));
      for (int j = 0; j < TN; ++j) a[i][j] = _mm256_add_epi32(a[i][j], _mm256_madd_epi16(xv, wv[j]));
    }
  }
  for (int i = 0; i < TM; ++i) {
    for (int j = 0; j < TN; ++j) {
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a[i][j]), _mm256_extracti128_si256(a[i][j], 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
      acc[i * 4 + j] = _mm_cvtsi128_si32(s);
    }
  }
}

#endif

// Portable tile for CPUs without AVX2 and other architectures (same exact int32 sums).
template <int TM, int TN>
void scalar_tile(const int16_t* x, const int16_t* w, int64_t K16, int32_t* acc) {
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) {
      int32_t s = 0;
      for (int64_t k = 0; k < K16; ++k) s += int32_t(x[i * K16 + k]) * int32_t(w[j * K16 + k]);
      acc[i * 4 + j] = s;
    }
}

template <int TM>
void tile_tm(bool avx2, int tn, const int16_t* x, const int16_t* w, int64_t K16, int32_t* acc) {
#if FD_X86
  if (avx2) {
    switch (tn) {
      case 4: return madd_tile<TM, 4>(x, w, K16, acc);
      case 3: return madd_tile<TM, 3>(x, w, K16, acc);
      case 2: return madd_tile<TM, 2>(x, w, K16, acc);
      default: return madd_tile<TM, 1>(x, w, K16, acc);
    }
  }
#endif
  switch (tn) {
    case 4: return scalar_tile<TM, 4>(x, w, K16, acc);
    case 3: return scalar_tile<TM, 3>(x, w, K16, acc);
    case 2: return scalar_tile<TM, 2>(x, w, K16, acc);
    default: return scalar_tile<TM, 1>(x, w, K16, acc);
  }
}

bool has_avx2() {
#if FD_X86 && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
#else
  return false;
#endif
}

void widen_i8(const int8_t* src, int64_t K, int64_t K16, int16_t* dst) {
  for (int64_t k = 0; k < K; ++k) dst[k] = src[k];
  for (int64_t k = K; k < K16; ++k) dst[k] = 0;
}

template <typename O>
void madd_gemm(const at::Tensor& x, const float* xs, const at::Tensor& w, const float* ws, const float* bp,
               O* out) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), K16 = (K + 15) / 16 * 16;
  const bool avx2 = has_avx2();
  std::vector<int16_t> x16(M * K16);
  const int8_t *xp = x.data_ptr<int8_t>(), *wp = w.data_ptr<int8_t>();
  at::parallel_for(0, M, 64, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) widen_i8(xp + m * K, K, K16, x16.data() + m * K16);
  });
  parallel_tasks((N + kNB - 1) / kNB, [&](auto take, int64_t blocks) {
    std::vector<int16_t> w16(kNB * K16);
    int32_t acc[2 * 4];
    for (int64_t blk; (blk = take()) < blocks;) {
      const int64_t n0 = blk * kNB, nb = std::min(kNB, N - n0);
      for (int64_t j = 0; j < nb; ++j) widen_i8(wp + (n0 + j) * K, K, K16, w16.data() + j * K16);
      for (int64_t m = 0; m < M; m += 2) {
        const int tm = int(std::min<int64_t>(2, M - m));
        for (int64_t j = 0; j < nb; j += 4) {
          const int tn = int(std::min<int64_t>(4, nb - j));
          if (tm == 2) {
            tile_tm<2>(avx2, tn, x16.data() + m * K16, w16.data() + j * K16, K16, acc);
          } else {
            tile_tm<1>(avx2, tn, x16.data() + m * K16, w16.data() + j * K16, K16, acc);
          }
          for (int i = 0; i < tm; ++i)
            for (int c = 0; c < tn; ++c) {
              const int64_t n = n0 + j + c;
              float t = (static_cast<float>(acc[i * 4 + c]) * xs[m + i]) * ws[n];
              if (bp != nullptr) t = t + bp[n];
              store(out + (m + i) * N, n, t);
            }
        }
      }
    }
  });
}

// oneDNN's int8 GEMM is fast only with VNNI or AMX; without them (AVX2-only CPUs) torch._int_mm on CPU
// ran ~25x slower than an fp32 matmul on the dev machine, so the madd GEMM above takes over.
// Elsewhere (aarch64) the portable tiles run: their int32 sums are exact, so the bits are the same.
bool onednn_int8_fast() {
#if FD_X86 && defined(__GNUC__)
  static const bool fast = __builtin_cpu_supports("avx512vnni") || __builtin_cpu_supports("avxvnni") ||
                           __builtin_cpu_supports("amx-int8");
  return fast;
#else
  return false;
#endif
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w,
                           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                           at::ScalarType out_dtype) {
  check_int8_matrix(x, "x_int8");
  check_int8_matrix(w, "w_int8");
  TORCH_CHECK_VALUE(x.size(1) == w.size(1), "w_int8: expected shape (N, ", x.size(1), "), got ", w.sizes());
  check_out_dtype(out_dtype);
  const int64_t M = x.size(0), N = w.size(0);
  check_scales(x_scale, M, w_scale, N, bias);
  if (onednn_int8_fast() && M > 0 && N > 0 && x.size(1) > 0) {
    return int8_linear_epilogue_cpu(at::_int_mm(x, w.t()), x_scale, w_scale, bias, out_dtype);
  }
  at::Tensor bias_c;
  const float* bp = bias_f32(bias, bias_c);
  at::Tensor out = new_output({M, N}, x.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "int8_linear_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      madd_gemm<scalar_t>(x, x_scale.data_ptr<float>(), w, w_scale.data_ptr<float>(), bp, out.data_ptr<scalar_t>());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("quantize_per_token_cpu", &quantize_per_token_cpu);
  m.impl("int8_linear_epilogue_cpu", &int8_linear_epilogue_cpu);
  m.impl("int8_linear_cpu", &int8_linear_cpu);
}

}  // namespace fastdistill
