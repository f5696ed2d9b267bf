// CPU kernel of fastdistill::semi_structured_linear_cpu: y = x · Wᵀ (+ bias) over a 2:4 weight stored
// as values [N, K/2] + one meta byte per two groups (layout: csrc/ops.cpp). Reads half the weight bytes.
//
// Per weight row n and meta byte (two groups, 8 dense columns) the kernel rebuilds the 8 dense weights
// in one AVX2 register (a 256-entry table gives the lane permutation and zero mask of each byte), then
// multiplies them with 8 contiguous x elements of up to 8 rows of x at once (one accumulator per row;
// for 1-4 rows, 2-4 accumulator sets, so the FMA chains overlap). Rows n run in parallel (OpenMP).
// The fp32 sums run in a fixed order: bitwise reproducible on a given machine.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "fd_sparse_checks.h"

namespace fastdistill {
namespace {

// Per meta byte: for each of the 8 dense columns, the index of its value among the byte's 4 stored
// values and whether it is kept (else the column is 0).
struct ByteTable {
  alignas(32) std::array<std::array<int32_t, 8>, 256> perm;
  alignas(32) std::array<std::array<int32_t, 8>, 256> mask;
  ByteTable() {
    for (int b = 0; b < 256; ++b)
      for (int e = 0; e < 8; ++e) {
        const int h = e / 4, pos = e % 4, nib = (b >> (4 * h)) & 15, i0 = nib & 3, i1 = nib >> 2;
        perm[b][e] = pos == i1 ? 2 * h + 1 : 2 * h;
        mask[b][e] = (pos == i0 || pos == i1) ? -1 : 0;
      }
  }
};
const ByteTable& table() {
  static const ByteTable t;
  return t;
}

bool has_avx2_fma() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

// The 2:4 row n dotted with rows [m0, m0 + MB) of x (fp32, row stride K); one group (4 columns) at the
// tail when K/4 is odd. Returns the sums in out[0..MB).
template <typename T>
float to_f32(T v) {
  return static_cast<float>(v);
}

template <typename T>
void row_generic(const T* v, const uint8_t* meta, const float* x, int64_t K, int64_t MB, float* out) {
  for (int64_t m = 0; m < MB; ++m) {
    float s = 0.0f;
    for (int64_t g = 0; g < K / 4; ++g) {
      const int nib = (meta[g / 2] >> (4 * (g % 2))) & 15;
      s += to_f32(v[2 * g]) * x[m * K + 4 * g + (nib & 3)] + to_f32(v[2 * g + 1]) * x[m * K + 4 * g + (nib >> 2)];
    }
    out[m] = s;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename T>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256 load4(const T* v) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_castps128_ps256(_mm_loadu_ps(v));
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(v));
    return _mm256_castps128_ps256(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16)));
  } else {
    return _mm256_castps128_ps256(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(v))));
  }
}

// U accumulator sets over consecutive bytes (U * MB independent FMA chains).
template <typename T, int MB, int U>
__attribute__((target("avx2,fma,f16c"))) void row_avx2(const T* v, const uint8_t* meta, const float* x, int64_t K,
                                                       float* out) {
  const ByteTable& tb = table();
  const int64_t full = K / 8;  // bytes with two groups
  __m256 acc[U][MB];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MB; ++m) acc[u][m] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + U <= full; b += U) {
    for (int u = 0; u < U; ++u) {
      const int byte = meta[b + u];
      const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(tb.perm[byte].data()));
      const __m256 keep =
          _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(tb.mask[byte].data())));
      const __m256 w = _mm256_and_ps(_mm256_permutevar8x32_ps(load4(v + 4 * (b + u)), perm), keep);
      for (int m = 0; m < MB; ++m) acc[u][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + 8 * (b + u)), acc[u][m]);
    }
  }
  for (; b < full; ++b) {
    const int byte = meta[b];
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(tb.perm[byte].data()));
    const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(tb.mask[byte].data())));
    const __m256 w = _mm256_and_ps(_mm256_permutevar8x32_ps(load4(v + 4 * b), perm), keep);
    for (int m = 0; m < MB; ++m) acc[0][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + 8 * b), acc[0][m]);
  }
  for (int m = 0; m < MB; ++m) {
    __m256 s = acc[0][m];
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[u][m]);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, s);
    float t = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    if (K % 8) {  // a last lone group (K/4 odd): low nibble of the last byte
      const int64_t g = K / 4 - 1;
      const int nib = meta[g / 2] & 15;
      t += to_f32(v[2 * g]) * x[m * K + 4 * g + (nib & 3)] + to_f32(v[2 * g + 1]) * x[m * K + 4 * g + (nib >> 2)];
    }
    out[m] = t;
  }
}

template <typename T>
void row_dispatch(const T* v, const uint8_t* meta, const float* x, int64_t K, int64_t MB, float* out) {
  switch (MB) {
    case 1: return row_avx2<T, 1, 4>(v, meta, x, K, out);
    case 2: return row_avx2<T, 2, 4>(v, meta, x, K, out);
    case 3: return row_avx2<T, 3, 2>(v, meta, x, K, out);
    case 4: return row_avx2<T, 4, 2>(v, meta, x, K, out);
    case 5: return row_avx2<T, 5, 1>(v, meta, x, K, out);
    case 6: return row_avx2<T, 6, 1>(v, meta, x, K, out);
    case 7: return row_avx2<T, 7, 1>(v, meta, x, K, out);
    default: return row_avx2<T, 8, 1>(v, meta, x, K, out);
  }
}
#endif

constexpr int64_t kRowsPerPass = 8;  // rows of x sharing one rebuilt weight register

at::Tensor semi_structured_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                      const std::optional<at::Tensor>& bias) {
  check_semi_structured(x, values, meta, bias, at::kCPU);
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0), MB = (K / 4 + 1) / 2;
  at::Tensor y = new_output({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* xp = x32.data_ptr<float>();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  const uint8_t* mp = meta.data_ptr<uint8_t>();
  const bool simd = has_avx2_fma();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "semi_structured_linear_cpu", [&] {
    const scalar_t* vp = values.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      float out[kRowsPerPass];
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t m0 = 0; m0 < M; m0 += kRowsPerPass) {
          const int64_t rows = std::min(kRowsPerPass, M - m0);
#if defined(__x86_64__) && defined(__GNUC__)
          if (simd) row_dispatch(vp + n * (K / 2), mp + n * MB, xp + m0 * K, K, rows, out);
          else row_generic(vp + n * (K / 2), mp + n * MB, xp + m0 * K, K, rows, out);
#else
          row_generic(vp + n * (K / 2), mp + n * MB, xp + m0 * K, K, rows, out);
#endif
          for (int64_t i = 0; i < rows; ++i) yp[(m0 + i) * N + n] = static_cast<scalar_t>(out[i] + (bp ? bp[n] : 0.0f));
        }
      }
    });
  });
  return y;
}

// Backward helpers: one pass over the dense [N, K] each (the torch-op equivalents take ~10 passes).
void check_dense_meta(const at::Tensor& dense, const at::Tensor& meta, int64_t K) {
  TORCH_CHECK_VALUE(K % 4 == 0, "K: ", K, " is not a multiple of 4");
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kByte && meta.dim() == 2 && meta.size(1) == (K / 4 + 1) / 2 &&
                       meta.is_contiguous() && meta.device().is_cpu(),
                   "meta: expected a contiguous CPU uint8 [N, ", (K / 4 + 1) / 2, "] tensor");
  TORCH_CHECK_TYPE(is_kernel_float(dense.scalar_type()) && dense.is_contiguous() && dense.device().is_cpu() &&
                       dense.dim() == 2 && dense.size(0) == meta.size(0),
                   "values/dense: expected a contiguous CPU float32/bfloat16/float16 tensor with ", meta.size(0),
                   " rows");
}

at::Tensor semi_structured_to_dense_cpu(const at::Tensor& values, const at::Tensor& meta, int64_t K) {
  check_dense_meta(values, meta, K);
  TORCH_CHECK_VALUE(values.size(1) == K / 2, "values: expected [N, ", K / 2, "], got ", values.sizes());
  const int64_t N = values.size(0), MB = meta.size(1);
  at::Tensor out = at::zeros({N, K}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "semi_structured_to_dense", [&] {
    const scalar_t* v = values.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const uint8_t* mp = meta.data_ptr<uint8_t>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        for (int64_t g = 0; g < K / 4; ++g) {
          const int nib = (mp[n * MB + g / 2] >> (4 * (g % 2))) & 15;
          o[n * K + 4 * g + (nib & 3)] = v[n * (K / 2) + 2 * g];
          o[n * K + 4 * g + (nib >> 2)] = v[n * (K / 2) + 2 * g + 1];
        }
    });
  });
  return out;
}

at::Tensor semi_structured_gather_cpu(const at::Tensor& dense, const at::Tensor& meta) {
  const int64_t K = dense.size(-1);
  check_dense_meta(dense, meta, K);
  const int64_t N = dense.size(0), MB = meta.size(1);
  at::Tensor out = new_output({N, K / 2}, dense.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dense.scalar_type(), "semi_structured_gather", [&] {
    const scalar_t* d = dense.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const uint8_t* mp = meta.data_ptr<uint8_t>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        for (int64_t g = 0; g < K / 4; ++g) {
          const int nib = (mp[n * MB + g / 2] >> (4 * (g % 2))) & 15;
          o[n * (K / 2) + 2 * g] = d[n * K + 4 * g + (nib & 3)];
          o[n * (K / 2) + 2 * g + 1] = d[n * K + 4 * g + (nib >> 2)];
        }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("semi_structured_linear_cpu", &semi_structured_linear_cpu);
  m.impl("semi_structured_to_dense_cpu", &semi_structured_to_dense_cpu);
  m.impl("semi_structured_gather_cpu", &semi_structured_gather_cpu);
}

}  // namespace fastdistill
