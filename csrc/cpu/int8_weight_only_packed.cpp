// CPU W8A16 on a packed int8 weight (issue 14; schemas in csrc/ops.cpp, tiles and summation order in
// csrc/include/fd_int8_w8a16.h): int8_pack_w8a16_cpu and int8_weight_only_linear_packed_cpu.
// Small M (memory-bound): the tiles widen the packed int8 weight in registers, each weight byte read once per
// 8 rows of x. Larger M (compute-bound): blocks of the weight are dequantized into one buffer and multiplied by
// BLAS (the unpacked op's route, read from the packed layout).
// FASTDISTILL_INT8_CPU_PATH=scalar (read per call, shared with the W8A8 kernels) forces the scalar tiles.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "fd_checks.h"
#include "fd_cpu_isa.h"
#include "fd_int8_cpu.h"
#include "fd_int8_pack.h"
#include "fd_int8_w8a16.h"

namespace fastdistill {
namespace {

using w8a16::kPanel;
using w8a16::Problem;

constexpr int64_t kTaskPanels = 8;                 // 64 output channels per task
constexpr int64_t kSmallM = 64;                    // above: dequantize + BLAS (M = 64: tiles 1.3x faster)
constexpr int64_t kSerialMacs = int64_t(1) << 20;  // below: the calling thread alone (a fork costs more)
constexpr int64_t kBlockPanels = 32;               // 256 channels per dequantized block (large M)

bool use_avx2() {
#if FD_X86 && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* e = std::getenv("FASTDISTILL_INT8_CPU_PATH");
  if (e != nullptr && std::strcmp(e, "scalar") == 0) return false;
  TORCH_CHECK_VALUE(has || e == nullptr || std::strcmp(e, "avx2") != 0,
                    "FASTDISTILL_INT8_CPU_PATH: avx2 requested, this CPU has no AVX2/FMA");
  return has;
#else
  return false;
#endif
}

// One tile of MB rows from panel p (NP panels on AVX2, else one) into res; returns the panels done.
template <int MB>
int64_t tile(const Problem& pb, const float* x, int64_t p, int64_t p_end, bool avx2, float* res) {
#if FD_X86
  if (avx2) {
    constexpr int NP = w8a16::panels_for(MB);
    if (p + NP <= p_end) {
      w8a16::tile_avx2<MB, NP>(pb, x, p, res);
      return NP;
    }
    w8a16::tile_avx2<MB, 1>(pb, x, p, res);
    return 1;
  }
#endif
  (void)p_end;
  (void)avx2;
  w8a16::tile_scalar<MB>(pb, x, p, res);
  return 1;
}

template <typename T>
void store(const float* res, int mb, int64_t np, int64_t p, int64_t N, const float* bp, T* out) {
  const int64_t n0 = p * kPanel, n1 = std::min(N, n0 + np * kPanel), w = np * kPanel;
  for (int i = 0; i < mb; ++i)
    for (int64_t n = n0; n < n1; ++n) {
      const float t = res[i * w + (n - n0)];
      out[i * N + n] = static_cast<T>(bp != nullptr ? t + bp[n] : t);
    }
}

template <typename T>
void small_m(const Problem& pb, int64_t M, const float* bp, T* out) {
  const bool avx2 = use_avx2();
  const int64_t P = w8a16::panels(pb.N), tasks = (P + kTaskPanels - 1) / kTaskPanels;
  auto worker = [&](auto take, int64_t n_tasks) {
    alignas(32) float res[8 * kTaskPanels * kPanel];
    for (int64_t t; (t = take()) < n_tasks;) {
      const int64_t p_begin = t * kTaskPanels, p_end = std::min(P, p_begin + kTaskPanels);
      for (int64_t m = 0; m < M; m += 8) {
        const int mb = int(std::min<int64_t>(8, M - m));
        const float* x = pb.x + m * pb.ldx;
        for (int64_t p = p_begin, np = 0; p < p_end; p += np) {
          switch (mb) {
            case 8: np = tile<8>(pb, x, p, p_end, avx2, res); break;
            case 7: np = tile<7>(pb, x, p, p_end, avx2, res); break;
            case 6: np = tile<6>(pb, x, p, p_end, avx2, res); break;
            case 5: np = tile<5>(pb, x, p, p_end, avx2, res); break;
            case 4: np = tile<4>(pb, x, p, p_end, avx2, res); break;
            case 3: np = tile<3>(pb, x, p, p_end, avx2, res); break;
            case 2: np = tile<2>(pb, x, p, p_end, avx2, res); break;
            default: np = tile<1>(pb, x, p, p_end, avx2, res); break;
          }
          store(res, mb, np, p, pb.N, bp, out + m * pb.N);
        }
      }
    }
  };
  if (M * pb.N * pb.K < kSerialMacs || at::get_num_threads() == 1 || at::in_parallel_region()) {
    int64_t next = 0;
    worker([&next]() { return next++; }, tasks);
  } else {
    parallel_tasks(tasks, worker);
  }
}

// Large M: 256-channel blocks dequantized (fp32 q * scale, as the reference) into wblk [K, 256], then BLAS.
void large_m(const Problem& pb, const at::Tensor& xf, const float* bp, at::Tensor& outf) {
  const int64_t K = pb.K, N = pb.N, P = w8a16::panels(N), ldb = kBlockPanels * kPanel;
  at::Tensor wblk = at::empty({K, ldb}, xf.options());
  float* wb = wblk.data_ptr<float>();
  for (int64_t pb0 = 0; pb0 < P; pb0 += kBlockPanels) {
    const int64_t np = std::min(kBlockPanels, P - pb0), n0 = pb0 * kPanel, nb = std::min(N - n0, np * kPanel);
    at::parallel_for(0, np, 1, [&](int64_t b, int64_t e) {
      float s[kPanel];
      for (int64_t j = b; j < e; ++j) {
        const int8_t* q = pb.w + (pb0 + j) * w8a16::panel_stride(K);
        for (int64_t g = 0; g < pb.G; ++g) {
          w8a16::panel_scales(pb, pb0 + j, g, s);
          for (int64_t k = g * pb.gs; k < (g + 1) * pb.gs; ++k)
            for (int64_t l = 0; l < kPanel; ++l)
              wb[k * ldb + j * kPanel + l] = static_cast<float>(q[k * kPanel + l]) * s[l];
        }
      }
    });
    at::Tensor dst = outf.narrow(1, n0, nb);
    at::mm_out(dst, xf, wblk.narrow(1, 0, nb));
  }
  if (bp != nullptr) outf.add_(at::from_blob(const_cast<float*>(bp), {N}, xf.options()));
}

at::Tensor pack_w8a16(const at::Tensor& w, int64_t group_size) {
  check_int8_matrix(w, "w_int8");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK_VALUE(group_size == 0 || (group_size > 0 && K % group_size == 0), "group_size: ", group_size,
                    " must be 0 (per channel) or a positive divisor of K = ", K);
  at::Tensor packed = new_packed(PackKind::kW8A16, w8a16::kLayout, N, K, K, group_size, w8a16::payload_bytes(N, K));
  int8_t* dst = reinterpret_cast<int8_t*>(packed_payload_mut(packed));
  const int8_t* src = w.data_ptr<int8_t>();
  at::parallel_for(0, w8a16::panels(N), 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      for (int64_t l = 0; l < kPanel && p * kPanel + l < N; ++l) {
        const int8_t* row = src + (p * kPanel + l) * K;
        int8_t* d = dst + p * w8a16::panel_stride(K) + l;
        for (int64_t k = 0; k < K; ++k) d[k * kPanel] = row[k];
      }
  });
  return packed;
}

// x (times smooth_inv rounded to x's dtype, as torch's elementwise product) widened to fp32 rows in `buf`.
template <typename T>
void widen_rows(const T* x, const T* smooth, int64_t m0, int64_t m1, int64_t K, float* buf) {
  for (int64_t i = m0 * K; i < m1 * K; i += K)
    for (int64_t k = 0; k < K; ++k)
      buf[i + k] = smooth != nullptr ? static_cast<float>(static_cast<T>(static_cast<float>(x[i + k]) *
                                                                         static_cast<float>(smooth[k])))
                                     : static_cast<float>(x[i + k]);
}

at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& smooth_inv) {
  check_rows(x, "x");
  TORCH_CHECK_TYPE(is_kernel_float(x.scalar_type()), "x: dtype ", x.scalar_type(),
                   " not supported (float32, bfloat16, float16)");
  TORCH_CHECK_VALUE(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.device().is_cpu() &&
                        (w_scale.dim() == 1 || w_scale.dim() == 2),
                    "w_scale: expected a contiguous float32 CPU tensor of shape (N,) or (N, K / group_size), got ",
                    w_scale.scalar_type(), " ", w_scale.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = w_scale.size(0);
  const PackHeader h = check_packed(w_packed, PackKind::kW8A16, w8a16::kLayout, N, K);
  TORCH_CHECK_VALUE(h.k_padded == K && h.payload_bytes == w8a16::payload_bytes(N, K) && h.group_size >= 0 &&
                        (h.group_size == 0 || K % h.group_size == 0),
                    "w_packed: header inconsistent with its layout (corrupted)");
  const int64_t G = h.group_size == 0 ? 1 : K / h.group_size;
  const bool scale_ok = h.group_size == 0 ? w_scale.dim() == 1 : (w_scale.dim() == 2 && w_scale.size(1) == G);
  TORCH_CHECK_VALUE(scale_ok, "w_scale: shape ", w_scale.sizes(), " does not match w_packed, packed with group_size ",
                    h.group_size, h.group_size == 0 ? std::string(" (expects (N,))")
                                                    : " (expects (N, " + std::to_string(G) + "))");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->is_floating_point() && bias->dim() == 1 && bias->size(0) == N && bias->device().is_cpu(),
                      "bias: expected a floating-point CPU tensor of shape (", N, ",), got ", bias->sizes());
  }
  if (smooth_inv.has_value()) {
    TORCH_CHECK_VALUE(smooth_inv->scalar_type() == at::kFloat && smooth_inv->dim() == 1 &&
                          smooth_inv->size(0) == K && smooth_inv->device().is_cpu(),
                      "smooth_inv: expected a float32 CPU tensor of shape (", K, ",), got ",
                      smooth_inv->scalar_type(), " ", smooth_inv->sizes());
  }
  at::Tensor out = new_output({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  at::Tensor bias_c;
  const float* bp = bias_f32(bias, bias_c);
  if (K == 0) {  // empty sums: the bias or zeros (scales never multiply anything)
    if (bp != nullptr) out.copy_(bias_c.unsqueeze(0).expand({M, N}));
    else out.zero_();
    return out;
  }
  Problem pb{nullptr, K, K, N, G, K / G, reinterpret_cast<const int8_t*>(packed_payload(w_packed)),
             w_scale.data_ptr<float>()};
  const bool widen = x.scalar_type() != at::kFloat || smooth_inv.has_value();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int8_weight_only_linear_packed", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      at::Tensor smooth_c;
      const scalar_t* sp = nullptr;
      if (smooth_inv.has_value()) {
        smooth_c = smooth_inv->to(x.scalar_type()).contiguous();
        sp = smooth_c.data_ptr<scalar_t>();
      }
      if (M <= kSmallM) {
        thread_local std::vector<float> buf;  // reused: no allocation per call once grown
        if (widen) {
          if (buf.size() < size_t(M * K)) buf.resize(M * K);
          widen_rows(xp, sp, 0, M, K, buf.data());
          pb.x = buf.data();
        } else {
          pb.x = reinterpret_cast<const float*>(xp);
        }
        small_m(pb, M, bp, out.data_ptr<scalar_t>());
        return;
      }
      at::Tensor xf = x;
      if (widen) {
        xf = at::empty({M, K}, x.options().dtype(at::kFloat));
        float* xb = xf.data_ptr<float>();
        at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) { widen_rows(xp, sp, b, e, K, xb); });
      }
      at::Tensor outf = x.scalar_type() == at::kFloat ? out : at::empty({M, N}, x.options().dtype(at::kFloat));
      large_m(pb, xf, bp, outf);
      if (x.scalar_type() != at::kFloat) out.copy_(outf);  // one rounding to x's dtype
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("int8_pack_w8a16_cpu", &pack_w8a16);
  m.impl("int8_weight_only_linear_packed_cpu", &linear_packed);
}

}  // namespace fastdistill
