// Scalar math shared by the CPU and CUDA kernels. Torch-free so that `nvcc -c` works anywhere.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
// always_inline: the CPU hot loops only vectorize when these are inlined into them.
#define FD_HD inline __attribute__((always_inline))
#endif

namespace fd {

// max without fmaxf's NaN rules: a plain compare, which vectorizes (fmaxf is a libm call on x86).
FD_HD float max_f32(float a, float b) { return a > b ? a : b; }
FD_HD float min_f32(float a, float b) { return a < b ? a : b; }

// The NaN rule of the loss kernels (CPU, CUDA; the Triton kernels and the references do the same):
// a row holding NaN or +inf (softmax undefined) in an input its loss reads gets a NaN loss and an
// all-NaN gradient row; -inf is a masked token (probability 0); ignored rows stay exact zeros.
// One unordered compare tells NaN and +inf apart from finite values and -inf, so the flag rides
// along the max loops without slowing them.
FD_HD bool poisons_row(float x) { return !(x < INFINITY); }

#if defined(__CUDA_ARCH__)
FD_HD float exp_f32(float x) { return expf(x); }
#else
// exp for the CPU hot loops: branch-free, so GCC vectorizes the loops that call it
// (libm's expf is a scalar call). Cephes polynomial on [-ln2/2, ln2/2], ~1 ulp.
// Results below FLT_MIN flush to 0 so that exp(-inf) == 0 exactly.
FD_HD float exp_f32(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447505531f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // round-to-nearest by the 1.5 * 2^23 trick: vectorizes, unlike a call to nearbyintf
  float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = ((int32_t)k + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  y = x < lo ? 0.0f : y;
  return x > hi ? INFINITY : y;
}
#endif

#if defined(__CUDA_ARCH__)
FD_HD float log1p_unit(float u) { return log1pf(u); }
#else
// log(x) for finite x > 0 (normal range): Cephes logf, ~1 ulp, branch-free so loops vectorize.
FD_HD float log_f32(float x) {
  int32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  float e = (float)(((bits >> 23) & 0xff) - 126);  // x = m * 2^e, m in [0.5, 1)
  bits = (bits & (int32_t)0x807fffff) | 0x3f000000;
  float m;
  memcpy(&m, &bits, sizeof(m));
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return (m + y) + 0.693359375f * e;
}

// log(1 + u) for u in [0, 1], accurate for tiny u too: log(w) * u / (w - 1) with w = 1 + u
// cancels the rounding of w (Goldberg's trick). Vectorizes, unlike libm's log1pf.
FD_HD float log1p_unit(float u) {
  const float w = 1.0f + u;
  const float d = w - 1.0f;
  return d == 0.0f ? u : log_f32(w) * (u / d);
}
#endif

}  // namespace fd
