// The W8A8 CPU GEMM (layout, paths and exactness argument in csrc/include/fd_int8_gemm.h).
// Blocking: M in chunks of at most 128 rows; per chunk the rows are quantized/copied once into a shared A buffer
// (their u8 form derived while hot), then threads take weight panels (16 columns) and run MR-row tiles over K
// blocks (the panel's block stays in L1 while the chunk's rows pass over it); the epilogue writes the output.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "fd_cpu_isa.h"
#include "fd_int8_cpu.h"
#include "fd_int8_gemm.h"
#include "fd_int8_tiles.h"

namespace fastdistill {
namespace {

// kVnniScalar: the VNNI paths' blocking and a + 128 / colsum arithmetic on scalar tiles (tests run it anywhere)
enum class Path { kScalar, kAvx2, kAvx2Swap, kVnni256, kVnni512, kVnniScalar };
struct PathInfo {
  int mr, np;  // tile rows, panels per tile
};

PathInfo path_info(Path p) {
  switch (p) {
    case Path::kVnni512:
    case Path::kVnniScalar: return {8, 2};
    case Path::kAvx2:
    case Path::kAvx2Swap: return {3, 2};
    default: return {4, 1};
  }
}

TileFn tile_for(Path p, int mr, int np) {
  if (p == Path::kVnniScalar) return np == 2 ? shift_tile<2> : shift_tile<1>;
#if FD_X86
  static const TileFn avx2[2][3] = {{avx2_tile<1, 1, false>, avx2_tile<2, 1, false>, avx2_tile<3, 1, false>},
                                    {avx2_tile<1, 2, false>, avx2_tile<2, 2, false>, avx2_tile<3, 2, false>}};
  static const TileFn swap[2][3] = {{avx2_tile<1, 1, true>, avx2_tile<2, 1, true>, avx2_tile<3, 1, true>},
                                    {avx2_tile<1, 2, true>, avx2_tile<2, 2, true>, avx2_tile<3, 2, true>}};
  static const TileFn v256[4] = {vnni256_tile<1>, vnni256_tile<2>, vnni256_tile<3>, vnni256_tile<4>};
  static const TileFn v512[2][8] = {
      {vnni512_tile<1, 1>, vnni512_tile<2, 1>, vnni512_tile<3, 1>, vnni512_tile<4, 1>, vnni512_tile<5, 1>,
       vnni512_tile<6, 1>, vnni512_tile<7, 1>, vnni512_tile<8, 1>},
      {vnni512_tile<1, 2>, vnni512_tile<2, 2>, vnni512_tile<3, 2>, vnni512_tile<4, 2>, vnni512_tile<5, 2>,
       vnni512_tile<6, 2>, vnni512_tile<7, 2>, vnni512_tile<8, 2>}};
  switch (p) {
    case Path::kAvx2: return avx2[np - 1][mr - 1];
    case Path::kAvx2Swap: return swap[np - 1][mr - 1];
    case Path::kVnni256: return v256[mr - 1];
    case Path::kVnni512: return v512[np - 1][mr - 1];
    default: break;
  }
#endif
  (void)mr;
  (void)np;
  return scalar_tile;
}

// ---- epilogue of one tile: t = ((float)acc * xs[m]) * ws[n] (+ bias[n]) -> O, the order of int8_linear_epilogue ----

template <typename O>
void store_tile(const int32_t* c, int rows, int cols, const int32_t* colsum, const float* xs, const float* ws,
                const float* bias, O* out, int64_t ldo) {
  int32_t corr[2 * kW8A8Panel] = {};
  if (colsum != nullptr)  // vnni: sum (a + 128) w - 128 colsum, in wrapping uint32 arithmetic
    for (int j = 0; j < cols; ++j) corr[j] = int32_t(uint32_t(colsum[j]) << 7);
  for (int i = 0; i < rows; ++i) {
    const float x = xs[i];
    const int32_t* ci = c + i * kLdc;
    O* o = out + i * ldo;
    if (bias != nullptr) {
      for (int j = 0; j < cols; ++j)
        o[j] = static_cast<O>((static_cast<float>(int32_t(uint32_t(ci[j]) - uint32_t(corr[j]))) * x) * ws[j] + bias[j]);
    } else {
      for (int j = 0; j < cols; ++j)
        o[j] = static_cast<O>((static_cast<float>(int32_t(uint32_t(ci[j]) - uint32_t(corr[j]))) * x) * ws[j]);
    }
  }
}

// ---- path choice ----

bool cpu_has(const char* what) {
#if FD_X86 && defined(__GNUC__)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  static const bool v512 = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
  static const bool v256 = __builtin_cpu_supports("avxvnni");
  return std::strcmp(what, "avx2") == 0 ? avx2 : std::strcmp(what, "vnni512") == 0 ? v512 : v256;
#else
  (void)what;
  return false;
#endif
}

Path vnni_path() { return cpu_has("vnni512") ? Path::kVnni512 : Path::kVnni256; }

void gemm_on(Path base, const W8A8Rows& rows, int64_t M, int64_t N, int64_t K, const uint8_t* payload, uint32_t flags,
             const float* ws, const float* bias, void* out, at::ScalarType out_dtype);

// A worst case (all +-127, -128 in a and w, a K tail, an N tail) through the VNNI path vs the scalar one, once:
// the VNNI path cannot run on the dev machines, so a user's CPU checks it before trusting it.
bool vnni_self_check() {
  constexpr int64_t M = 9, N = 37, K = 1029;
  std::vector<int8_t> a(M * K), w(N * K);
  uint32_t r = 12345;
  auto next = [&r]() { return r = r * 1664525u + 1013904223u, int8_t(int(r >> 24) - 128); };
  for (int64_t i = 0; i < M * K; ++i) a[i] = i < 3 * K ? int8_t(i % 3 == 0 ? -128 : 127) : i < 6 * K ? -127 : next();
  for (int64_t i = 0; i < N * K; ++i) w[i] = i < 5 * K ? int8_t(i % 2 ? -127 : 127) : i < 9 * K ? -128 : next();
  struct Rows : W8A8Rows {
    const int8_t* a;
    int64_t K;
    bool fill(int64_t m0, int64_t m1, int8_t* dst, int64_t lda, float* xs) const override {
      for (int64_t m = m0; m < m1; ++m) std::memcpy(dst + (m - m0) * lda, a + m * K, K), xs[m - m0] = 1.0f;
      return true;
    }
  } src;
  src.a = a.data();
  src.K = K;
  std::vector<uint8_t> packed(w8a8_payload_bytes(N, K));
  const uint32_t flags = pack_w8a8_payload(w.data(), N, K, packed.data());
  std::vector<float> ones(N, 1.0f), ref(M * N), got(M * N);  // |sums| < 2^24: exact in float
  gemm_on(Path::kScalar, src, M, N, K, packed.data(), flags, ones.data(), nullptr, ref.data(), at::kFloat);
  gemm_on(vnni_path(), src, M, N, K, packed.data(), flags, ones.data(), nullptr, got.data(), at::kFloat);
  return std::memcmp(ref.data(), got.data(), ref.size() * sizeof(float)) == 0;
}

Path base_path() {
  const char* e = std::getenv("FASTDISTILL_INT8_CPU_PATH");
  const bool has_vnni = cpu_has("vnni512") || cpu_has("avxvnni");
  if (e == nullptr || *e == '\0' || std::strcmp(e, "auto") == 0) {
    if (has_vnni) {
      static const bool ok = vnni_self_check();
      if (ok) return vnni_path();
      TORCH_WARN_ONCE("fastdistill: the int8 VNNI path failed its self-check on this CPU; using AVX2 instead");
    }
    return cpu_has("avx2") ? Path::kAvx2 : Path::kScalar;
  }
  if (std::strcmp(e, "scalar") == 0) return Path::kScalar;
  if (std::strcmp(e, "vnni_scalar") == 0) return Path::kVnniScalar;
  if (std::strcmp(e, "avx2") == 0) {
    TORCH_CHECK_VALUE(cpu_has("avx2"), "FASTDISTILL_INT8_CPU_PATH: avx2 requested, this CPU has no AVX2");
    return Path::kAvx2;
  }
  if (std::strcmp(e, "vnni") == 0) {
    TORCH_CHECK_VALUE(has_vnni, "FASTDISTILL_INT8_CPU_PATH: vnni requested, this CPU has neither avx512_vnni nor "
                                "avx_vnni");
    return vnni_path();
  }
  TORCH_CHECK_VALUE(false, "FASTDISTILL_INT8_CPU_PATH: expected auto, scalar, avx2, vnni or vnni_scalar, got '", e, "'");
}

// ---- the driver ----

// The u8 forms of a row of A (restrict + simd: the byte loops vectorize).
FD_CLONES void abs_bytes(const int8_t* __restrict s, uint8_t* __restrict u, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) u[k] = uint8_t(s[k] < 0 ? -int(s[k]) : int(s[k]));  // |-128| = 128
}

FD_CLONES void shift_bytes(const int8_t* __restrict s, uint8_t* __restrict u, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) u[k] = uint8_t(s[k]) ^ 0x80u;  // a + 128
}

constexpr int64_t kMaxChunk = 128;                    // rows of A per chunk (a task's int32 tiles: 16 KiB)
constexpr int64_t kChunkBytes = int64_t(1) << 20;     // A buffer per chunk (signed + u8 rows)
constexpr int64_t kSerialMacs = int64_t(1) << 21;     // below this a call runs on the calling thread
constexpr int64_t kRowSplitWeightBytes = int64_t(1) << 18;  // packed W up to 256 KiB (half an L2): split rows
constexpr int64_t kRowTask = 48;                             // rows per task then (a multiple of the tile heights)
constexpr int64_t kSerialMacsByRows = int64_t(1) << 18;      // one parallel region is cheap next to 2^18 MACs

template <typename F>
void run_tasks(bool parallel, int64_t n, const F& body) {
  if (!parallel || n <= 1) {
    for (int64_t t = 0; t < n; ++t) body(t);
    return;
  }
  parallel_tasks(n, [&](auto take, int64_t count) {
    for (int64_t t; (t = take()) < count;) body(t);
  });
}

template <typename O>
void gemm_typed(Path base, const W8A8Rows& rows, int64_t M, int64_t N, int64_t K, const uint8_t* payload,
                uint32_t flags, const float* ws, const float* bias, O* out) {
  const int64_t K4 = w8a8_k4(K), panels = w8a8_n16(N) / kW8A8Panel, lda = std::max<int64_t>(K4, 4);
  const int8_t* wpack = reinterpret_cast<const int8_t*>(payload);
  const int32_t* colsum = reinterpret_cast<const int32_t*>(payload + w8a8_n16(N) * K4);
  const int64_t macs = M * N * std::max<int64_t>(K, 1);
  const bool threads = at::get_num_threads() > 1;
  const bool vnni = base == Path::kVnni256 || base == Path::kVnni512 || base == Path::kVnniScalar;
  // avx2 with a -128 weight: the swapped form if A has no -128, else scalar (decided per row set after the fill)
  const bool swap_or_scalar = base == Path::kAvx2 && (flags & kW8A8HasM128) != 0;
  const PathInfo info = path_info(base);
  // Small weights (packed W within L2) with rows to share: threads split the rows, not the panels, in ONE
  // parallel region; each task quantizes its rows and runs every panel over them (the demo's layers: N = 10 is a
  // single panel, which a panel split would leave to one thread). Else M goes in chunks and threads split panels.
  const int64_t w_bytes = w8a8_n16(N) * K4;
  const bool by_rows = w_bytes <= kRowSplitWeightBytes && M * 2 * lda <= kChunkBytes && M >= 2 * kRowTask;
  const bool parallel = threads && macs >= (by_rows ? kSerialMacsByRows : kSerialMacs);
  const int64_t mc_max = std::max<int64_t>(info.mr, std::min(kMaxChunk, kChunkBytes / (2 * lda)) / info.mr * info.mr);
  const int64_t chunks = by_rows ? 1 : (M + mc_max - 1) / mc_max;  // even chunks: each one streams all of W
  const int64_t mc = by_rows ? M : ((M + chunks - 1) / chunks + info.mr - 1) / info.mr * info.mr;
  // K blocks: a panel's block (16 x kc bytes per panel) stays in L1 while the chunk's rows pass over it
  const int64_t kc = std::min<int64_t>(K4, info.np == 2 ? 512 : 1024);
  // one buffer per calling thread, reused across calls (no allocation per call once grown)
  thread_local std::vector<uint8_t> buf;
  const size_t need = size_t(mc) * (2 * lda + sizeof(float)) + 64;
  if (buf.size() < need) buf.resize(need);
  int8_t* as = reinterpret_cast<int8_t*>(buf.data());
  uint8_t* au = buf.data() + mc * lda;
  float* xs = reinterpret_cast<float*>(buf.data() + 2 * mc * lda);

  // Rows r0..r1 of the buffer <- rows m0 + r0.. of A, padded, with their u8 forms; true if one holds -128.
  auto prepare = [&](int64_t m0, int64_t r0, int64_t r1) {
    const bool m128 = rows.fill(m0 + r0, m0 + r1, as + r0 * lda, lda, xs + r0);
    for (int64_t r = r0; r < r1; ++r) {
      int8_t* a = as + r * lda;
      uint8_t* u = au + r * lda;
      std::memset(a + K, 0, lda - K);
      if (base == Path::kAvx2 && !swap_or_scalar) {
        abs_bytes(a, u, lda);
      } else if (vnni) {
        shift_bytes(a, u, lda);
      }
    }
    return m128;
  };
  // Output rows m0 + r0 .. m0 + r1 (buffer rows r0..r1, at most kMaxChunk) x panels p .. p + np of `path`.
  auto panel_rows = [&](Path path, int64_t m0, int64_t r0, int64_t r1, int64_t p) {
    const PathInfo pi = path_info(path);
    const int np = int(std::min<int64_t>(pi.np, panels - p));
    const int64_t rows_n = r1 - r0;
    alignas(64) int32_t c[kMaxChunk * kLdc];
    const int8_t* wp = wpack + p * kW8A8Panel * K4;
    for (int64_t k0 = 0; k0 < K4; k0 += kc) {
      const int64_t kn = std::min(kc, K4 - k0);
      for (int64_t r = 0, mr; r < rows_n; r += mr) {
        // even tile heights (16 rows: 3 3 3 3 2 2, not 3 3 3 3 3 1: a 1-row tile loads W once per row)
        const int64_t left = rows_n - r, tiles = (left + pi.mr - 1) / pi.mr;
        mr = (left + tiles - 1) / tiles;
        const int64_t b = (r0 + r) * lda + k0;
        tile_for(path, int(mr), np)(int(mr), as + b, au + b, lda, wp + k0 * kW8A8Panel, kW8A8Panel * K4, kn, k0 > 0,
                                    c + r * kLdc);
      }
    }
    if (K4 == 0) std::memset(c, 0, sizeof(int32_t) * rows_n * kLdc);
    const int64_t n0 = p * kW8A8Panel;
    const int cols = int(std::min<int64_t>(np * kW8A8Panel, N - n0));
    for (int64_t r = 0; r < rows_n; r += 8) {
      store_tile(c + r * kLdc, int(std::min<int64_t>(8, rows_n - r)), cols, vnni ? colsum + n0 : nullptr,
                 xs + r0 + r, ws + n0, bias == nullptr ? nullptr : bias + n0, out + (m0 + r0 + r) * N + n0, N);
    }
  };
  auto path_for = [&](bool a_m128) { return !swap_or_scalar ? base : a_m128 ? Path::kScalar : Path::kAvx2Swap; };

  if (by_rows) {
    run_tasks(parallel, (M + kRowTask - 1) / kRowTask, [&](int64_t t) {
      const int64_t r0 = t * kRowTask, r1 = std::min(M, r0 + kRowTask);
      const Path path = path_for(prepare(0, r0, r1));
      for (int64_t p = 0; p < panels; p += path_info(path).np) panel_rows(path, 0, r0, r1, p);
    });
    return;
  }
  for (int64_t m0 = 0; m0 < M; m0 += mc) {
    const int64_t rows_n = std::min(mc, M - m0);
    std::atomic<bool> a_m128{false};
    constexpr int64_t kRowBlock = 8;
    run_tasks(parallel, (rows_n + kRowBlock - 1) / kRowBlock, [&](int64_t t) {
      const int64_t r0 = t * kRowBlock, r1 = std::min(rows_n, r0 + kRowBlock);
      if (prepare(m0, r0, r1)) a_m128.store(true, std::memory_order_relaxed);
    });
    const Path path = path_for(a_m128.load());
    const int64_t np = path_info(path).np;
    run_tasks(parallel, (panels + np - 1) / np, [&](int64_t t) { panel_rows(path, m0, 0, rows_n, t * np); });
  }
}

void gemm_on(Path base, const W8A8Rows& rows, int64_t M, int64_t N, int64_t K, const uint8_t* payload, uint32_t flags,
             const float* ws, const float* bias, void* out, at::ScalarType out_dtype) {
  if (M == 0 || N == 0) return;
  switch (out_dtype) {
    case at::kFloat: return gemm_typed(base, rows, M, N, K, payload, flags, ws, bias, static_cast<float*>(out));
    case at::kBFloat16:
      return gemm_typed(base, rows, M, N, K, payload, flags, ws, bias, static_cast<at::BFloat16*>(out));
    case at::kHalf: return gemm_typed(base, rows, M, N, K, payload, flags, ws, bias, static_cast<at::Half*>(out));
    default: TORCH_CHECK_TYPE(false, "out_dtype: ", out_dtype, " not supported (float32, bfloat16, float16)");
  }
}

}  // namespace

uint32_t pack_w8a8_payload(const int8_t* w, int64_t N, int64_t K, uint8_t* payload) {
  const int64_t K4 = w8a8_k4(K), n16 = w8a8_n16(N);
  int32_t* colsum = reinterpret_cast<int32_t*>(payload + n16 * K4);
  std::atomic<bool> m128{false};
  at::parallel_for(0, n16 / kW8A8Panel, std::max<int64_t>(1, 65536 / std::max<int64_t>(16 * K4, 1)),
                   [&](int64_t b, int64_t e) {
                     bool seen = false;
                     for (int64_t p = b; p < e; ++p) {
                       uint8_t* dst = payload + p * kW8A8Panel * K4;
                       const int64_t rows = std::min<int64_t>(kW8A8Panel, N - p * kW8A8Panel);
                       for (int64_t j = 0; j < rows; ++j) {
                         const int8_t* row = w + (p * kW8A8Panel + j) * K;
                         int32_t s = 0;
                         bool neg = false;
                         for (int64_t k = 0; k < K; ++k) s += row[k], neg |= row[k] == -128;
                         colsum[p * kW8A8Panel + j] = s;
                         seen |= neg;
                       }
                       for (int64_t j = rows; j < kW8A8Panel; ++j) colsum[p * kW8A8Panel + j] = 0;
                       // k-quad outer: each quad writes 64 contiguous bytes from 16 row streams (padding: zeros)
                       for (int64_t k = 0; k < K4; k += 4) {
                         const int64_t n = std::min<int64_t>(4, K - k);
                         for (int64_t j = 0; j < kW8A8Panel; ++j) {
                           uint8_t* d = dst + k * 16 + j * 4;
                           if (n < 4 || j >= rows) std::memset(d, 0, 4);
                           if (j < rows) std::memcpy(d, w + (p * kW8A8Panel + j) * K + k, n);
                         }
                       }
                     }
                     if (seen) m128.store(true, std::memory_order_relaxed);
                   });
  return m128.load() ? kW8A8HasM128 : 0u;
}

void gemm_w8a8(const W8A8Rows& rows, int64_t M, int64_t N, int64_t K, const uint8_t* payload, uint32_t flags,
               const float* ws, const float* bias, void* out, at::ScalarType out_dtype) {
  gemm_on(base_path(), rows, M, N, K, payload, flags, ws, bias, out, out_dtype);
}

}  // namespace fastdistill
