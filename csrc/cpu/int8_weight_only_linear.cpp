// CPU kernel of fastdistill::int8_weight_only_linear_cpu (W8A16; schema and contract in csrc/ops.cpp):
// M <= 16: the int8 weight is widened to fp32 in registers (never materialized), read once per 8 rows of x;
// larger M: 256-channel blocks of the weight are dequantized into one buffer and multiplied by BLAS.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fd_checks.h"
#include "fd_cpu_isa.h"
#include "fd_int8_cpu.h"

#if FD_X86
#include <immintrin.h>
#endif

namespace fastdistill {
namespace {

// ---- W8A16: out[m, n] = sum_g w_scale[n, g] * sum_{k in g} x[m, k] * q[n, k] (+ bias[n]), fp32.
// Rows of x are taken MB <= 8 at a time, so each weight byte is widened once per 8 rows, and NT output
// channels at once, so small MB still has independent FMA chains. Within a group: 8-lane partial sums,
// then the k % 8 tail, in a fixed order (deterministic). ----

#if FD_X86
FD_INLINE float hsum_ps(__m256 v) __attribute__((target("avx2")));
FD_INLINE float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MB, int NT>
__attribute__((target("avx2,fma"))) void wo_tile_avx2(const float* x, int64_t K, const int8_t* w, const float* ws,
                                                      int64_t gs, const float* bp, int64_t n, float* out,
                                                      int64_t N) {
  const int64_t G = K / gs;
  __m256 tot[MB][NT];
  float tail[MB][NT] = {};
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NT; ++j) tot[i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k0 = g * gs, k1 = k0 + gs, kv = k0 + gs / 8 * 8;
    __m256 acc[MB][NT];
    float acct[MB][NT] = {};
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NT; ++j) acc[i][j] = _mm256_setzero_ps();
    for (int64_t k = k0; k < kv; k += 8) {
      __m256 wf[NT];
      for (int j = 0; j < NT; ++j) {
        const __m128i b8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + (n + j) * K + k));
        wf[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b8));
      }
      for (int i = 0; i < MB; ++i) {
        const __m256 xv = _mm256_loadu_ps(x + i * K + k);
        for (int j = 0; j < NT; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wf[j], acc[i][j]);
      }
    }
    for (int64_t k = kv; k < k1; ++k)
      for (int j = 0; j < NT; ++j) {
        const float wf = static_cast<float>(w[(n + j) * K + k]);
        for (int i = 0; i < MB; ++i) acct[i][j] += x[i * K + k] * wf;
      }
    for (int j = 0; j < NT; ++j) {
      const float s = ws[(n + j) * G + g];
      const __m256 sv = _mm256_set1_ps(s);
      for (int i = 0; i < MB; ++i) {
        tot[i][j] = _mm256_fmadd_ps(acc[i][j], sv, tot[i][j]);
        tail[i][j] += acct[i][j] * s;
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NT; ++j) {
      const float b = bp != nullptr ? bp[n + j] : 0.0f;
      out[i * N + n + j] = (hsum_ps(tot[i][j]) + tail[i][j]) + b;
    }
}

#endif

// Any CPU: the same sums, one output at a time.
void wo_scalar(int mb, const float* x, int64_t K, const int8_t* w, const float* ws, int64_t gs, const float* bp,
               int64_t n, float* out, int64_t N) {
  const int64_t G = K / gs;
  for (int i = 0; i < mb; ++i) {
    float tot = 0.0f;
    for (int64_t g = 0; g < G; ++g) {
      float acc = 0.0f;
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) acc += x[i * K + k] * static_cast<float>(w[n * K + k]);
      tot += acc * ws[n * G + g];
    }
    out[i * N + n] = tot + (bp != nullptr ? bp[n] : 0.0f);
  }
}

#if FD_X86
template <int MB>
void wo_range_avx2(const float* x, int64_t K, const int8_t* w, const float* ws, int64_t gs, const float* bp,
                   int64_t n0, int64_t n1, float* out, int64_t N) {
  constexpr int NT = MB <= 1 ? 4 : (MB <= 4 ? 2 : 1);
  int64_t n = n0;
  for (; n + NT <= n1; n += NT) wo_tile_avx2<MB, NT>(x, K, w, ws, gs, bp, n, out, N);
  for (; n < n1; ++n) wo_tile_avx2<MB, 1>(x, K, w, ws, gs, bp, n, out, N);
}

#endif

bool has_avx2_fma() {
#if FD_X86 && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

void wo_block(int mb, const float* x, int64_t K, const int8_t* w, const float* ws, int64_t gs, const float* bp,
              int64_t n0, int64_t n1, float* out, int64_t N) {
#if FD_X86
  if (has_avx2_fma()) {
    switch (mb) {
      case 8: return wo_range_avx2<8>(x, K, w, ws, gs, bp, n0, n1, out, N);
      case 7: return wo_range_avx2<7>(x, K, w, ws, gs, bp, n0, n1, out, N);
      case 6: return wo_range_avx2<6>(x, K, w, ws, gs, bp, n0, n1, out, N);
      case 5: return wo_range_avx2<5>(x, K, w, ws, gs, bp, n0, n1, out, N);
      case 4: return wo_range_avx2<4>(x, K, w, ws, gs, bp, n0, n1, out, N);
      case 3: return wo_range_avx2<3>(x, K, w, ws, gs, bp, n0, n1, out, N);
      case 2: return wo_range_avx2<2>(x, K, w, ws, gs, bp, n0, n1, out, N);
      default: return wo_range_avx2<1>(x, K, w, ws, gs, bp, n0, n1, out, N);
    }
  }
#endif
  for (int64_t n = n0; n < n1; ++n) wo_scalar(mb, x, K, w, ws, gs, bp, n, out, N);
}

// Small M: the GEMV-style kernel above, each weight byte widened once per 8 rows.
void gemv_rows(const float* xp, int64_t M, int64_t K, int64_t N, const int8_t* wp, const float* sp, int64_t gs,
               const float* bp, float* op) {
  constexpr int64_t kCols = 32;  // output channels per task
  parallel_tasks((N + kCols - 1) / kCols, [&](auto take, int64_t tasks) {
    for (int64_t t; (t = take()) < tasks;) {
      const int64_t n0 = t * kCols, n1 = std::min(N, n0 + kCols);
      for (int64_t m = 0; m < M; m += 8) {
        wo_block(int(std::min<int64_t>(8, M - m)), xp + m * K, K, wp, sp, gs, bp, n0, n1, op + m * N, N);
      }
    }
  });
}

// Larger M is compute-bound: blocks of kBlockN output channels are dequantized (w = q * scale, fp32, as in
// the reference) into one reused buffer and multiplied by BLAS, so the fp32 weight is never whole in memory.
constexpr int64_t kGemvRows = 16, kBlockN = 256;

void blocked_gemm(const at::Tensor& xf, const int8_t* wp, const float* sp, int64_t gs, const float* bp,
                  at::Tensor& outf) {
  const int64_t K = xf.size(1), N = outf.size(1), G = K / gs;
  at::Tensor wblk = at::empty({std::min(kBlockN, N), K}, xf.options());
  float* wb = wblk.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += kBlockN) {
    const int64_t nb = std::min(kBlockN, N - n0);
    at::parallel_for(0, nb, 16, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        const int8_t* q = wp + (n0 + j) * K;
        const float* s = sp + (n0 + j) * G;
        float* d = wb + j * K;
        for (int64_t g = 0; g < G; ++g) {
          const float sg = s[g];
          for (int64_t k = g * gs; k < (g + 1) * gs; ++k) d[k] = static_cast<float>(q[k]) * sg;
        }
      }
    });
    at::Tensor dst = outf.narrow(1, n0, nb);
    at::mm_out(dst, xf, wblk.narrow(0, 0, nb).t());
  }
  if (bp != nullptr) outf.add_(at::from_blob(const_cast<float*>(bp), {N}, xf.options()));
}

at::Tensor int8_weight_only_linear_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                                       const std::optional<at::Tensor>& bias, int64_t group_size) {
  check_rows(x, "x");
  TORCH_CHECK_TYPE(is_kernel_float(x.scalar_type()), "x: dtype ", x.scalar_type(),
                   " not supported (float32, bfloat16, float16)");
  check_int8_matrix(w, "w_int8");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK_VALUE(w.size(1) == K, "w_int8: expected shape (N, ", K, "), got ", w.sizes());
  TORCH_CHECK_VALUE(group_size >= 0 && (group_size == 0 || K % group_size == 0), "group_size: ", group_size,
                    " must be 0 (per channel) or a positive divisor of K = ", K);
  const int64_t gs = group_size == 0 ? std::max<int64_t>(K, 1) : group_size, G = K == 0 ? 1 : K / gs;
  const bool shape_ok = group_size == 0 ? (w_scale.dim() == 1 && w_scale.size(0) == N)
                                        : (w_scale.dim() == 2 && w_scale.size(0) == N && w_scale.size(1) == G);
  TORCH_CHECK_VALUE(shape_ok && w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() &&
                        w_scale.device().is_cpu(),
                    "w_scale: expected a contiguous float32 CPU tensor of shape (", N,
                    group_size == 0 ? std::string(",)") : ", " + std::to_string(G) + ")", ", got ",
                    w_scale.scalar_type(), " ", w_scale.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->is_floating_point() && bias->dim() == 1 && bias->size(0) == N && bias->device().is_cpu(),
                      "bias: expected a floating-point CPU tensor of shape (", N, ",), got ", bias->sizes());
  }
  at::Tensor bias_c;
  const float* bp = bias_f32(bias, bias_c);
  at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);  // widened once, not per n
  at::Tensor outf = x.scalar_type() == at::kFloat ? new_output({M, N}, x.options())
                                                  : at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  float* op = outf.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = w_scale.data_ptr<float>();
  const int64_t gsk = K == 0 ? 1 : gs;
  if (M > kGemvRows && K > 0) {
    blocked_gemm(xf, wp, sp, gsk, bp, outf);
  } else {
    gemv_rows(xp, M, K, N, wp, sp, gsk, bp, op);
  }
  if (x.scalar_type() == at::kFloat) return outf;
  at::Tensor out = new_output({M, N}, x.options());
  out.copy_(outf);  // one rounding to x's dtype
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) { m.impl("int8_weight_only_linear_cpu", &int8_weight_only_linear_cpu); }

}  // namespace fastdistill
