// CPU kernels of fastdistill::block_sparse_linear_{fwd,dx,dw}_cpu (formats: csrc/ops.cpp).
//
// fwd and dx are the same product over a compressed index: out[m, o*bo + oo] = sum over the stored
// blocks of output block row o (CSR for fwd, the CSC view for dx) of A[m, rb*br + rr] * w(oo, rr).
// A (x or dy) is packed once, converted to fp32 and transposed into tiles of MR rows ([R][MR] per
// tile), so the micro-kernel reads MR consecutive floats per reduction index and broadcasts one weight
// element per output: a 24 x 4 register tile (12 AVX2 accumulators, FMA). OpenMP runs over output block
// rows; each thread keeps a [bo][MR] fp32 tile in L1 and visits the row's blocks in groups sized so the
// packed A panels and weight blocks of a group stay in L1 across the output sub-tiles.
// dw: one stored block per task, dvalues[p] = dy[:, rows]ᵀ · x[:, cols] in fp32 over all M in order,
// from dy and x packed the same way (contiguous over m: no page-strided column walks).
// Every sum runs in a fixed order: results are bitwise reproducible on a given machine.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "fd_sparse_checks.h"

namespace fastdistill {
namespace {

constexpr int64_t MR = 24;  // rows of A per micro tile (3 AVX2 vectors)
constexpr int64_t NR = 4;   // outputs per micro tile (bo is a multiple of 16)

bool has_avx2_fma() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// The weight of one product: element (oo, rr) of stored block `blk` is vals[blk * bsz + oo * so + rr * sr].
struct Weight {
  const float* vals;
  const int32_t* ptr;   // [n_out_blocks + 1]
  const int32_t* idx;   // reduction block of each entry
  const int32_t* perm;  // values index of each entry, or nullptr (identity)
  int64_t bo, br, so, sr, bsz;
};

// Packs A [M, R] (row stride R) into fp32 tiles: out[t][r][i] = A[t*MR + i, r], zeros beyond M.
template <typename T>
void pack_transposed(const T* A, int64_t M, int64_t R, float* out) {
  const int64_t tiles = (M + MR - 1) / MR;
  constexpr int64_t RC = 64;
  at::parallel_for(0, tiles * ((R + RC - 1) / RC), 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t t = job / ((R + RC - 1) / RC), r0 = (job % ((R + RC - 1) / RC)) * RC;
      const int64_t r1 = std::min(R, r0 + RC);
      float* dst = out + t * R * MR;
      for (int64_t i = 0; i < MR; ++i) {
        const int64_t m = t * MR + i;
        if (m < M) {
          const T* src = A + m * R;
          for (int64_t r = r0; r < r1; ++r) dst[r * MR + i] = static_cast<float>(src[r]);
        } else {
          for (int64_t r = r0; r < r1; ++r) dst[r * MR + i] = 0.0f;
        }
      }
    }
  });
}

// acc[oo][0..MR) += sum over entries p in [p0, p1) and rr < BR of apack[rb*BR + rr][.] * w(oo0 + j, rr),
// for oo in [oo0, oo0 + NR). acc rows are MR floats apart. The 12 accumulators are named variables (an
// array of __m256 was spilled to the stack by GCC) and BR and the weight strides SO / SR are compile-time
// constants, so the reduction loop is loads, broadcasts and FMAs only.
#if defined(__x86_64__) && defined(__GNUC__)
template <int BR, int SO, int SR>
__attribute__((target("avx2,fma"))) void micro_avx2(const Weight& w, const float* apack, int64_t p0, int64_t p1,
                                                    int64_t oo0, float* acc) {
#define FD_ACC_ROW(j) __m256 c##j##0 = _mm256_loadu_ps(acc + j * MR), c##j##1 = _mm256_loadu_ps(acc + j * MR + 8), \
                      c##j##2 = _mm256_loadu_ps(acc + j * MR + 16);
  FD_ACC_ROW(0) FD_ACC_ROW(1) FD_ACC_ROW(2) FD_ACC_ROW(3)
#undef FD_ACC_ROW
  const int64_t bsz = w.bsz;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t blk = w.perm ? w.perm[p] : p;
    const float* a = apack + int64_t(w.idx[p]) * BR * MR;
    const float* b = w.vals + blk * bsz + oo0 * SO;
#pragma GCC unroll 4
    for (int rr = 0; rr < BR; ++rr) {
      const __m256 a0 = _mm256_loadu_ps(a + rr * MR), a1 = _mm256_loadu_ps(a + rr * MR + 8),
                   a2 = _mm256_loadu_ps(a + rr * MR + 16);
      const float* bq = b + rr * SR;
#define FD_FMA_ROW(j)                                      \
  {                                                        \
    const __m256 s = _mm256_broadcast_ss(bq + j * SO);     \
    c##j##0 = _mm256_fmadd_ps(a0, s, c##j##0);             \
    c##j##1 = _mm256_fmadd_ps(a1, s, c##j##1);             \
    c##j##2 = _mm256_fmadd_ps(a2, s, c##j##2);             \
  }
      FD_FMA_ROW(0) FD_FMA_ROW(1) FD_FMA_ROW(2) FD_FMA_ROW(3)
#undef FD_FMA_ROW
    }
  }
#define FD_STORE_ROW(j)                           \
  _mm256_storeu_ps(acc + j * MR, c##j##0);        \
  _mm256_storeu_ps(acc + j * MR + 8, c##j##1);    \
  _mm256_storeu_ps(acc + j * MR + 16, c##j##2);
  FD_STORE_ROW(0) FD_STORE_ROW(1) FD_STORE_ROW(2) FD_STORE_ROW(3)
#undef FD_STORE_ROW
}

using MicroFn = void (*)(const Weight&, const float*, int64_t, int64_t, int64_t, float*);

// The instance for this product: fwd (SO = bk, SR = 1, BR = bk) or dx (SO = 1, SR = bk, BR = bn).
template <int BR>
MicroFn micro_for_br(bool fwd, int64_t bk) {
  if (fwd) return micro_avx2<BR, BR, 1>;
  switch (bk) {
    case 16: return micro_avx2<BR, 1, 16>;
    case 32: return micro_avx2<BR, 1, 32>;
    default: return micro_avx2<BR, 1, 64>;
  }
}

MicroFn pick_micro(const Weight& w) {
  if (!has_avx2_fma()) return nullptr;
  const bool fwd = w.sr == 1;
  const int64_t bk = fwd ? w.br : w.sr;
  switch (w.br) {
    case 16: return micro_for_br<16>(fwd, bk);
    case 32: return micro_for_br<32>(fwd, bk);
    default: return micro_for_br<64>(fwd, bk);
  }
}
#else
using MicroFn = void (*)(const Weight&, const float*, int64_t, int64_t, int64_t, float*);
MicroFn pick_micro(const Weight&) { return nullptr; }
#endif

void micro_generic(const Weight& w, const float* apack, int64_t p0, int64_t p1, int64_t oo0, float* acc) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t blk = w.perm ? w.perm[p] : p;
    const float* a = apack + int64_t(w.idx[p]) * w.br * MR;
    const float* b = w.vals + blk * w.bsz + oo0 * w.so;
    for (int64_t rr = 0; rr < w.br; ++rr)
      for (int j = 0; j < NR; ++j) {
        const float s = b[rr * w.sr + j * w.so];
        for (int64_t i = 0; i < MR; ++i) acc[j * MR + i] += a[rr * MR + i] * s;
      }
  }
}

// out [M, n_out_blocks * bo] (type T) = packed A through the weight (+ bias).
template <typename T>
void bsr_product(const float* apack, int64_t M, int64_t R, const Weight& w, int64_t n_out_blocks,
                 const float* bias, T* out) {
  const int64_t NO = n_out_blocks * w.bo, tiles = (M + MR - 1) / MR;
  // Blocks per group: packed A panels + weight blocks of one group within ~24 KiB of L1.
  const int64_t group = std::max<int64_t>(1, (24 << 10) / int64_t(sizeof(float) * (w.br * MR + w.bo * w.br)));
  const MicroFn micro = pick_micro(w);
  // Output block rows are split into equal shares of work (stored blocks + 1 per row), not of rows: a
  // random pattern gives some rows many more blocks than others.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, n_out_blocks));
  const int64_t total = w.ptr[n_out_blocks] + n_out_blocks;
  auto first_row = [&](int64_t part) {  // first o whose work prefix reaches part * total / parts
    const int64_t target = part * total / parts;
    int64_t lo = 0, hi = n_out_blocks;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (w.ptr[mid] + mid < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    std::vector<float> tile(w.bo * MR);
    const int64_t begin = first_row(part_begin), end = part_end == parts ? n_out_blocks : first_row(part_end);
    for (int64_t o = begin; o < end; ++o) {
      const int64_t p_begin = w.ptr[o], p_end = w.ptr[o + 1];
      for (int64_t t = 0; t < tiles; ++t) {
        const float* a = apack + t * R * MR;
        std::fill(tile.begin(), tile.end(), 0.0f);
        for (int64_t g0 = p_begin; g0 < p_end; g0 += group) {
          const int64_t g1 = std::min(p_end, g0 + group);
          // The next group's A panels (scattered over the packed A, usually in L3) are fetched into L2
          // while this group computes; the hardware prefetcher only follows each panel once started.
          for (int64_t q = g1; q < std::min(p_end, g1 + group); ++q) {
            const char* panel = reinterpret_cast<const char*>(a + int64_t(w.idx[q]) * w.br * MR);
            for (int64_t off = 0; off < int64_t(sizeof(float)) * w.br * MR; off += 64)
              __builtin_prefetch(panel + off, 0, 2);
          }
          for (int64_t oo = 0; oo < w.bo; oo += NR) {
            if (micro) micro(w, a, g0, g1, oo, tile.data() + oo * MR);
            else micro_generic(w, a, g0, g1, oo, tile.data() + oo * MR);
          }
        }
        const int64_t rows = std::min(MR, M - t * MR);
        for (int64_t i = 0; i < rows; ++i) {
          T* dst = out + (t * MR + i) * NO + o * w.bo;
          for (int64_t oo = 0; oo < w.bo; ++oo) {
            const float v = tile[oo * MR + i] + (bias ? bias[o * w.bo + oo] : 0.0f);
            dst[oo] = static_cast<T>(v);
          }
        }
      }
    }
  });
}

at::Tensor packed(const at::Tensor& a) {
  const int64_t M = a.size(0), R = a.size(1);
  at::Tensor out = at::empty({(M + MR - 1) / MR * R * MR}, a.options().dtype(at::kFloat));
  // A buffer as large as x, every call: where malloc hands back fresh pages (benchmarks/harness.py sets a
  // 64 KiB mmap threshold) huge-page advice turns thousands of first-touch faults into a few. Measured on
  // the dev CPU with that threshold: BSR 90% forward 33.6 -> 27.5 ms (512 x 4096 x 4096 fp32).
  if (out.nbytes() >= (size_t(8) << 20)) advise_huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "bsr_pack", [&] {
    pack_transposed<scalar_t>(a.data_ptr<scalar_t>(), M, R, out.data_ptr<float>());
  });
  return out;
}

at::Tensor run_product(const at::Tensor& a, const at::Tensor& values, const Weight& w0, int64_t n_out_blocks,
                       const std::optional<at::Tensor>& bias) {
  const int64_t M = a.size(0), R = a.size(1);
  at::Tensor out = new_output({M, n_out_blocks * w0.bo}, a.options());
  if (M == 0) return out;
  const at::Tensor vals = values.to(at::kFloat).contiguous();  // the kernel reads fp32 blocks
  const at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  Weight w = w0;
  w.vals = vals.data_ptr<float>();
  const at::Tensor apack = packed(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "bsr_product", [&] {
    bsr_product<scalar_t>(apack.data_ptr<float>(), M, R, w, n_out_blocks,
                          b32.defined() ? b32.data_ptr<float>() : nullptr, out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor block_sparse_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                                       const at::Tensor& col, const std::optional<at::Tensor>& bias, int64_t N) {
  check_bsr_fwd(x, values, crow, col, bias, N, at::kCPU);
  const int64_t bn = values.size(1), bk = values.size(2);
  // Output index oo = i (row in the block, stride bk), reduction rr = j (stride 1).
  Weight w{nullptr, crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), nullptr, bn, bk, bk, 1, bn * bk};
  return run_product(x, values, w, N / bn, bias);
}

at::Tensor block_sparse_linear_dx_cpu(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& ccol,
                                      const at::Tensor& row, const at::Tensor& perm, int64_t K) {
  check_bsr_dx(dy, values, ccol, row, perm, K, at::kCPU);
  const int64_t bn = values.size(1), bk = values.size(2);
  // Output index oo = j (column in the block, stride 1), reduction rr = i (stride bk).
  Weight w{nullptr, ccol.data_ptr<int32_t>(), row.data_ptr<int32_t>(), perm.data_ptr<int32_t>(), bk, bn, 1, bk,
           bn * bk};
  return run_product(dy, values, w, K / bk, std::nullopt);
}

// dw from the packed (transposed) dy and x of bsr_product: dyP[t][n][i], xP[t][k][i] hold dy[t*MR + i, n]
// and x[t*MR + i, k] (zeros past M), so every dvalues element is a dot product over contiguous m. A
// 4 x 2 register tile of such dot products (8 accumulators, 6 loads per 8 FMAs), reduced at the end.
// dv [bn, bk] = sum over tiles of dyP[rows]ᵀ · xP[cols]; every m in a fixed order.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  alignas(32) float l[8];
  _mm256_store_ps(l, v);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

__attribute__((target("avx2,fma"))) void dw_block_avx2(const float* dyP, const float* xP, int64_t tiles, int64_t N,
                                                       int64_t K, int64_t row0, int64_t col0, int64_t bn,
                                                       int64_t bk, float* dv) {
  for (int64_t i0 = 0; i0 < bn; i0 += 4)
    for (int64_t j0 = 0; j0 < bk; j0 += 2) {
      __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
      for (int64_t t = 0; t < tiles; ++t) {
        const float* d = dyP + (t * N + row0 + i0) * MR;
        const float* x = xP + (t * K + col0 + j0) * MR;
        for (int64_t v = 0; v < MR; v += 8) {
          const __m256 x0 = _mm256_loadu_ps(x + v), x1 = _mm256_loadu_ps(x + MR + v);
          const __m256 d0 = _mm256_loadu_ps(d + v), d1 = _mm256_loadu_ps(d + MR + v),
                       d2 = _mm256_loadu_ps(d + 2 * MR + v), d3 = _mm256_loadu_ps(d + 3 * MR + v);
          c00 = _mm256_fmadd_ps(d0, x0, c00);
          c01 = _mm256_fmadd_ps(d0, x1, c01);
          c10 = _mm256_fmadd_ps(d1, x0, c10);
          c11 = _mm256_fmadd_ps(d1, x1, c11);
          c20 = _mm256_fmadd_ps(d2, x0, c20);
          c21 = _mm256_fmadd_ps(d2, x1, c21);
          c30 = _mm256_fmadd_ps(d3, x0, c30);
          c31 = _mm256_fmadd_ps(d3, x1, c31);
        }
      }
      float* o = dv + i0 * bk + j0;
      o[0] = hsum(c00), o[1] = hsum(c01), o[bk] = hsum(c10), o[bk + 1] = hsum(c11);
      o[2 * bk] = hsum(c20), o[2 * bk + 1] = hsum(c21), o[3 * bk] = hsum(c30), o[3 * bk + 1] = hsum(c31);
    }
}
#endif

void dw_block_generic(const float* dyP, const float* xP, int64_t tiles, int64_t N, int64_t K, int64_t row0,
                      int64_t col0, int64_t bn, int64_t bk, float* dv) {
  for (int64_t i = 0; i < bn; ++i)
    for (int64_t j = 0; j < bk; ++j) {
      float s = 0.0f;
      for (int64_t t = 0; t < tiles; ++t)
        for (int64_t m = 0; m < MR; ++m) s += dyP[(t * N + row0 + i) * MR + m] * xP[(t * K + col0 + j) * MR + m];
      dv[i * bk + j] = s;
    }
}

at::Tensor block_sparse_linear_dw_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow,
                                      const at::Tensor& col, int64_t bn, int64_t bk) {
  check_bsr_dw(dy, x, crow, col, bn, bk, at::kCPU);
  const int64_t nnzb = col.numel(), M = x.size(0), N = dy.size(1), K = x.size(1), R = N / bn;
  at::Tensor out = new_output({nnzb, bn, bk}, x.options());
  if (nnzb == 0) return out;
  if (M == 0) return out.zero_();
  const at::Tensor dyP = packed(dy), xP = packed(x);
  const int64_t tiles = (M + MR - 1) / MR;
  const int32_t* crow_p = crow.data_ptr<int32_t>();
  const int32_t* col_p = col.data_ptr<int32_t>();
  std::vector<int32_t> row_of(nnzb);  // block row of every stored block, from the CSR pointers
  for (int64_t r = 0; r < R; ++r)
    for (int64_t p = crow_p[r]; p < crow_p[r + 1]; ++p) row_of[p] = (int32_t)r;
  const bool simd = has_avx2_fma();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bsr_dw", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, nnzb, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> dv(bn * bk);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t row0 = int64_t(row_of[p]) * bn, col0 = int64_t(col_p[p]) * bk;
#if defined(__x86_64__) && defined(__GNUC__)
        if (simd) dw_block_avx2(dyP.data_ptr<float>(), xP.data_ptr<float>(), tiles, N, K, row0, col0, bn, bk, dv.data());
        else dw_block_generic(dyP.data_ptr<float>(), xP.data_ptr<float>(), tiles, N, K, row0, col0, bn, bk, dv.data());
#else
        dw_block_generic(dyP.data_ptr<float>(), xP.data_ptr<float>(), tiles, N, K, row0, col0, bn, bk, dv.data());
#endif
        for (int64_t e = 0; e < bn * bk; ++e) o[p * bn * bk + e] = static_cast<scalar_t>(dv[e]);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("block_sparse_linear_fwd_cpu", &block_sparse_linear_fwd_cpu);
  m.impl("block_sparse_linear_dx_cpu", &block_sparse_linear_dx_cpu);
  m.impl("block_sparse_linear_dw_cpu", &block_sparse_linear_dw_cpu);
}

}  // namespace fastdistill
