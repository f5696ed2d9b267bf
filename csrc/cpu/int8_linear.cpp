// CPU kernels of the int8 ops (schemas and exact formulas in csrc/ops.cpp):
//   quantize_per_token_cpu     absmax + quantize per row, the row read from memory once
//   int8_linear_epilogue_cpu   int32 accumulators -> scaled (+ bias) output, one pass
//   int8_linear_cpu            W8A8 matmul on the u8 x s8 GEMM of int8_gemm_u8s8.cpp (weight packed per call)
//   int8_pack_w8a8_cpu         the weight packed once into that GEMM's layout (fd_int8_gemm.h, fd_int8_pack.h)
//   int8_linear_dynamic_cpu    per-token quantization fused into the GEMM's packing of A + GEMM + epilogue
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
#include "fd_int8_gemm.h"
#include "fd_int8_pack.h"

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
FD_CLONES void row_quantize_portable(const float* x, int64_t K, float pre, float inv, int8_t* q) {
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) {
    float v = (kPre ? x[k] * pre : x[k]) * inv;
    v = v > 127.0f ? 127.0f : v;
    v = v < -127.0f ? -127.0f : v;
    q[k] = static_cast<int8_t>(static_cast<int32_t>(__builtin_nearbyintf(v)));
  }
}

#if FD_X86
// The same formula 8 values at a time: GCC leaves nearbyintf scalar in the loop above (it was half of a small
// layer's time). vcvtps2dq rounds by MXCSR (round to nearest even by default, as nearbyintf); |v| <= 127 after
// the clamp, so no conversion overflows; the two multiplies stay separate (no FMA).
template <bool kPre>
__attribute__((target("avx2"))) void row_quantize_avx2(const float* x, int64_t K, float pre, float inv, int8_t* q) {
  const __m256 vpre = _mm256_set1_ps(pre), vinv = _mm256_set1_ps(inv);
  const __m256 hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 v = _mm256_loadu_ps(x + k);
    if constexpr (kPre) v = _mm256_mul_ps(v, vpre);
    v = _mm256_max_ps(_mm256_min_ps(_mm256_mul_ps(v, vinv), hi), lo);
    const __m256i i = _mm256_cvtps_epi32(v);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(w, w));
  }
  row_quantize_portable<kPre>(x + k, K - k, pre, inv, q + k);
}
#endif

template <bool kPre>
FD_INLINE void row_quantize(const float* x, int64_t K, float pre, float inv, int8_t* q) {
#if FD_X86 && defined(__GNUC__)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return row_quantize_avx2<kPre>(x, K, pre, inv, q);
#endif
  row_quantize_portable<kPre>(x, K, pre, inv, q);
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

void check_scale(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == n && t.is_contiguous() &&
                        t.device().is_cpu(),
                    name, ": expected a contiguous float32 CPU tensor of shape (", n, ",), got ", t.scalar_type(), " ",
                    t.sizes());
}

void check_bias(const std::optional<at::Tensor>& bias, int64_t N) {
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->is_floating_point() && bias->dim() == 1 && bias->size(0) == N && bias->device().is_cpu(),
                      "bias: expected a floating-point CPU tensor of shape (", N, ",), got ", bias->scalar_type(),
                      " ", bias->sizes());
  }
}

void check_scales(const at::Tensor& x_scale, int64_t M, const at::Tensor& w_scale, int64_t N,
                  const std::optional<at::Tensor>& bias) {
  check_scale(x_scale, M, "x_scale");
  check_scale(w_scale, N, "w_scale");
  check_bias(bias, N);
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

// ---- W8A8 GEMM (csrc/cpu/int8_gemm_u8s8.cpp): rows of A copied from x_int8, or quantized from x on the fly ----

struct Int8Rows : W8A8Rows {
  const int8_t* x;
  const float* scale;
  int64_t K;
  bool fill(int64_t m0, int64_t m1, int8_t* a, int64_t lda, float* xs) const override {
    bool m128 = false;
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* row = x + m * K;
      std::memcpy(a + (m - m0) * lda, row, K);
      bool neg = false;
      for (int64_t k = 0; k < K; ++k) neg |= row[k] == -128;
      m128 |= neg;
      xs[m - m0] = scale[m];
    }
    return m128;
  }
};

// quantize_per_token's rows (of x, or of x * smooth rounded to T as torch's elementwise product does).
template <typename T>
struct QuantRows : W8A8Rows {
  const T* x;
  const T* smooth;  // smooth_inv in x's dtype, or nullptr
  int64_t K;
  bool fill(int64_t m0, int64_t m1, int8_t* a, int64_t lda, float* xs) const override {
    thread_local std::vector<float> buf;
    if (buf.size() < size_t(K)) buf.resize(K);
    for (int64_t m = m0; m < m1; ++m) {
      const T* row = x + m * K;
      const float* r;
      if (smooth != nullptr) {
        for (int64_t k = 0; k < K; ++k) buf[k] = to_f(static_cast<T>(to_f(row[k]) * to_f(smooth[k])));
        r = buf.data();
      } else {
        r = widen(row, K, buf);
      }
      xs[m - m0] = quantize_row(r, K, a + (m - m0) * lda);
    }
    return false;  // the quantizer never writes -128
  }
};

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w,
                           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                           at::ScalarType out_dtype) {
  check_int8_matrix(x, "x_int8");
  check_int8_matrix(w, "w_int8");
  TORCH_CHECK_VALUE(x.size(1) == w.size(1), "w_int8: expected shape (N, ", x.size(1), "), got ", w.sizes());
  check_out_dtype(out_dtype);
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  check_scales(x_scale, M, w_scale, N, bias);
  at::Tensor bias_c;
  const float* bp = bias_f32(bias, bias_c);
  at::Tensor out = new_output({M, N}, x.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  // packed per call (a pass over w, as the int16 widening of the old GEMM was)
  at::Tensor packed = at::empty({w8a8_payload_bytes(N, K)}, w.options().dtype(at::kByte));
  const uint32_t flags = pack_w8a8_payload(w.data_ptr<int8_t>(), N, K, packed.data_ptr<uint8_t>());
  Int8Rows rows;
  rows.x = x.data_ptr<int8_t>();
  rows.scale = x_scale.data_ptr<float>();
  rows.K = K;
  gemm_w8a8(rows, M, N, K, packed.data_ptr<uint8_t>(), flags, w_scale.data_ptr<float>(), bp, out.data_ptr(),
            out_dtype);
  return out;
}

at::Tensor int8_pack_w8a8_cpu(const at::Tensor& w) {
  check_int8_matrix(w, "w_int8");
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor packed = new_packed(PackKind::kW8A8, kW8A8Layout, N, K, w8a8_k4(K), 0, w8a8_payload_bytes(N, K));
  const uint32_t flags = pack_w8a8_payload(w.data_ptr<int8_t>(), N, K, packed_payload_mut(packed));
  PackHeader h;
  std::memcpy(&h, packed.data_ptr<uint8_t>(), sizeof h);
  h.flags = flags;
  std::memcpy(packed.data_ptr<uint8_t>(), &h, sizeof h);
  return packed;
}

at::Tensor int8_linear_dynamic_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& smooth_inv,
                                   at::ScalarType out_dtype) {
  check_rows(x, "x");
  TORCH_CHECK_TYPE(is_kernel_float(x.scalar_type()), "x: dtype ", x.scalar_type(),
                   " not supported (float32, bfloat16, float16)");
  check_out_dtype(out_dtype);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK_VALUE(w_scale.dim() == 1, "w_scale: expected shape (N,), got ", w_scale.sizes());
  const int64_t N = w_scale.size(0);
  const PackHeader h = check_packed(w_packed, PackKind::kW8A8, kW8A8Layout, N, K);
  TORCH_CHECK_VALUE(h.payload_bytes == w8a8_payload_bytes(N, K) && h.k_padded == w8a8_k4(K),
                    "w_packed: payload of ", h.payload_bytes, " bytes, layout ", kW8A8Layout, " needs ",
                    w8a8_payload_bytes(N, K), " for [", N, ", ", K, "] (corrupted header)");
  check_scale(w_scale, N, "w_scale");
  check_bias(bias, N);
  at::Tensor smooth_c;
  if (smooth_inv.has_value()) {
    TORCH_CHECK_VALUE(smooth_inv->scalar_type() == at::kFloat && smooth_inv->dim() == 1 &&
                          smooth_inv->size(0) == K && smooth_inv->device().is_cpu(),
                      "smooth_inv: expected a float32 CPU tensor of shape (", K, ",), got ",
                      smooth_inv->scalar_type(), " ", smooth_inv->sizes());
    smooth_c = smooth_inv->to(x.scalar_type()).contiguous();
  }
  at::Tensor bias_c;
  const float* bp = bias_f32(bias, bias_c);
  at::Tensor out = new_output({M, N}, x.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int8_linear_dynamic_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      QuantRows<scalar_t> rows;
      rows.x = x.data_ptr<scalar_t>();
      rows.smooth = smooth_c.defined() ? smooth_c.data_ptr<scalar_t>() : nullptr;
      rows.K = K;
      gemm_w8a8(rows, M, N, K, packed_payload(w_packed), h.flags, w_scale.data_ptr<float>(), bp, out.data_ptr(),
                out_dtype);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("quantize_per_token_cpu", &quantize_per_token_cpu);
  m.impl("int8_linear_epilogue_cpu", &int8_linear_epilogue_cpu);
  m.impl("int8_linear_cpu", &int8_linear_cpu);
  m.impl("int8_pack_w8a8_cpu", &int8_pack_w8a8_cpu);
  m.impl("int8_linear_dynamic_cpu", &int8_linear_dynamic_cpu);
}

}  // namespace fastdistill
