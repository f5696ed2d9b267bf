// CUDA kernels of fastdistill::quantize_per_token_cuda and fastdistill::int8_linear_epilogue_cuda
// (the int8 GEMM core between them is torch._int_mm). Both are memory-bound single passes with
// 16-byte accesses where the row layout allows it; the arithmetic is the one fixed in csrc/ops.cpp,
// with explicit _rn intrinsics so that the bits match the CPU kernel and the reference.
// Torch-free: compiles with a bare `nvcc -c`.
#include <cuda_runtime.h>

#include "fd_cuda_int8.h"
#include "fd_cuda_int8_dev.cuh"

namespace fastdistill {
namespace {

using mma::from_f;
using mma::to_f;

constexpr int kQuantThreads = 256;

// max that keeps a NaN once seen (fmaxf would drop it), so a row with NaN gets a NaN scale.
__device__ __forceinline__ float nan_max(float a, float v) { return (v > a || v != v) ? v : a; }

// (v * pre) * inv, clamped, rounded half to even; pre = 1 (exact) except in tiny rows (2^64, see below).
// ok == false (zero, inf or NaN row): 0.
__device__ __forceinline__ int8_t quantize_one(float v, float pre, float inv, bool ok) {
  const float t = fminf(fmaxf(__fmul_rn(__fmul_rn(v, pre), inv), -127.0f), 127.0f);
  return ok ? (int8_t)__float2int_rn(t) : (int8_t)0;
}

// One block per row: absmax (16-byte loads, warp shuffles + a fixed smem pass), then the row is read
// again (from L1/L2: a row is at most a few tens of KB) and quantized. No atomics.
template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_per_token_kernel(const T* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ scale, int64_t K,
                              bool vec) {
  constexpr int V = 16 / sizeof(T);  // elements per 16-byte load
  __shared__ float warp_max[kQuantThreads / 32];
  const T* xr = x + (int64_t)blockIdx.x * K;
  int8_t* qr = q + (int64_t)blockIdx.x * K;
  const int64_t nvec = vec ? K / V : 0;

  float a = 0.0f;
  for (int64_t i = threadIdx.x; i < nvec; i += kQuantThreads) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(xr) + i);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < V; ++j) a = nan_max(a, fabsf(to_f(e[j])));
  }
  for (int64_t k = nvec * V + threadIdx.x; k < K; k += kQuantThreads) a = nan_max(a, fabsf(to_f(xr[k])));
  for (int o = 16; o > 0; o >>= 1) a = nan_max(a, __shfl_xor_sync(0xffffffffu, a, o));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = a;
  __syncthreads();
  a = warp_max[0];
#pragma unroll
  for (int w = 1; w < kQuantThreads / 32; ++w) a = nan_max(a, warp_max[w]);

  // The rule of csrc/ops.cpp: NaN row -> scale NaN (one bit pattern), inf row -> inf, zero row -> 0, all three
  // with q = 0; rows with a < 2^-64 are scaled by 2^64 first (127 / a overflows below ~3.7e-37).
  const bool ok = a > 0.0f && a < INFINITY;
  const float pre = a < 0x1p-64f ? 0x1p64f : 1.0f;
  const float inv = ok ? __fdiv_rn(127.0f, __fmul_rn(a, pre)) : 0.0f;
  if (threadIdx.x == 0) scale[blockIdx.x] = a != a ? __int_as_float(0x7fc00000) : __fdiv_rn(a, 127.0f);

  for (int64_t i = threadIdx.x; i < nvec; i += kQuantThreads) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(xr) + i);
    const T* e = reinterpret_cast<const T*>(&raw);
    int8_t out[V];
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = quantize_one(to_f(e[j]), pre, inv, ok);
    if constexpr (V == 8) {
      reinterpret_cast<uint2*>(qr)[i] = *reinterpret_cast<const uint2*>(out);
    } else {
      reinterpret_cast<uint32_t*>(qr)[i] = *reinterpret_cast<const uint32_t*>(out);
    }
  }
  for (int64_t k = nvec * V + threadIdx.x; k < K; k += kQuantThreads) {
    qr[k] = quantize_one(to_f(xr[k]), pre, inv, ok);
  }
}

constexpr int kEpiThreads = 256;
constexpr int kEpiCols = 4 * kEpiThreads;  // columns per block: 4 per thread (one 16-byte int32 load)

// out[m, n] = cast(((float)acc * x_scale[m]) * w_scale[n] (+ bias[n])): one rounding per operation.
template <typename O>
__device__ __forceinline__ O epilogue_one(int32_t acc, float xs, float ws, float b, bool has_bias) {
  float t = __fmul_rn(__fmul_rn(__int2float_rn(acc), xs), ws);
  if (has_bias) t = __fadd_rn(t, b);
  return from_f<O>(t);
}

// Grid: (column blocks, row blocks); rows loop with the grid's y stride (M may exceed 65535).
template <typename O>
__global__ void __launch_bounds__(kEpiThreads)
    int8_epilogue_kernel(const int32_t* __restrict__ acc, const float* __restrict__ x_scale,
                         const float* __restrict__ w_scale, const void* __restrict__ bias, cuda_launch::DType bias_dtype,
                         O* __restrict__ out, int64_t M, int64_t N, bool vec) {
  const int64_t n0 = (int64_t)blockIdx.x * kEpiCols + 4 * (int64_t)threadIdx.x;
  if (n0 >= N) return;
  const bool has_bias = bias != nullptr;
  float ws[4], b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t n = n0 + j < N ? n0 + j : N - 1;  // clamped: the tail is not stored
    ws[j] = w_scale[n];
    if (has_bias) b[j] = int8_dev::load_as_float(bias, bias_dtype, n);
  }
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const float xs = x_scale[m];
    const int32_t* ar = acc + m * N;
    O* orow = out + m * N;
    if (vec) {  // N % 4 == 0 and aligned rows: one 16-byte load, one 8/16-byte store
      const int4 a = __ldg(reinterpret_cast<const int4*>(ar + n0));
      O o[4] = {epilogue_one<O>(a.x, xs, ws[0], b[0], has_bias), epilogue_one<O>(a.y, xs, ws[1], b[1], has_bias),
                epilogue_one<O>(a.z, xs, ws[2], b[2], has_bias), epilogue_one<O>(a.w, xs, ws[3], b[3], has_bias)};
      if constexpr (sizeof(O) == 4) {
        *reinterpret_cast<uint4*>(orow + n0) = *reinterpret_cast<const uint4*>(o);
      } else {
        *reinterpret_cast<uint2*>(orow + n0) = *reinterpret_cast<const uint2*>(o);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (n0 + j < N) orow[n0 + j] = epilogue_one<O>(ar[n0 + j], xs, ws[j], b[j], has_bias);
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename T>
int launch_quantize(const void* x, int8_t* q, float* scale, int64_t M, int64_t K, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  // 16-byte loads need every row start aligned: K a multiple of V and an aligned base; q rows then
  // start at multiples of V bytes.
  const bool vec = K % V == 0 && aligned16(x) && (reinterpret_cast<uintptr_t>(q) % V) == 0;
  quantize_per_token_kernel<T><<<(unsigned)M, kQuantThreads, 0, stream>>>(static_cast<const T*>(x), q, scale, K, vec);
  return (int)cudaGetLastError();
}

template <typename O>
int launch_epilogue(const int32_t* acc, const float* x_scale, const float* w_scale, const void* bias,
                    cuda_launch::DType bias_dtype, void* out, int64_t M, int64_t N, cudaStream_t stream) {
  const bool vec = N % 4 == 0 && aligned16(acc) && (reinterpret_cast<uintptr_t>(out) % (4 * sizeof(O))) == 0;
  const dim3 grid((unsigned)((N + kEpiCols - 1) / kEpiCols), (unsigned)(M < 65535 ? M : 65535));
  int8_epilogue_kernel<O><<<grid, kEpiThreads, 0, stream>>>(acc, x_scale, w_scale, bias, bias_dtype,
                                                            static_cast<O*>(out), M, N, vec);
  return (int)cudaGetLastError();
}

}  // namespace

namespace cuda_launch {

int quantize_per_token(const void* x, DType x_dtype, int8_t* q, float* scale, int64_t M, int64_t K,
                       cudaStream_t stream) {
  if (M == 0) return 0;
  if (M > 0x7fffffff) return (int)cudaErrorInvalidValue;  // one block per row
  switch (x_dtype) {
    case F32:
      return launch_quantize<float>(x, q, scale, M, K, stream);
    case BF16:
      return launch_quantize<__nv_bfloat16>(x, q, scale, M, K, stream);
    default:
      return launch_quantize<__half>(x, q, scale, M, K, stream);
  }
}

int int8_linear_epilogue(const int32_t* acc, const float* x_scale, const float* w_scale, const void* bias,
                         DType bias_dtype, void* out, DType out_dtype, int64_t M, int64_t N, cudaStream_t stream) {
  if (M == 0 || N == 0) return 0;
  switch (out_dtype) {
    case F32:
      return launch_epilogue<float>(acc, x_scale, w_scale, bias, bias_dtype, out, M, N, stream);
    case BF16:
      return launch_epilogue<__nv_bfloat16>(acc, x_scale, w_scale, bias, bias_dtype, out, M, N, stream);
    default:
      return launch_epilogue<__half>(acc, x_scale, w_scale, bias, bias_dtype, out, M, N, stream);
  }
}

}  // namespace cuda_launch
}  // namespace fastdistill
