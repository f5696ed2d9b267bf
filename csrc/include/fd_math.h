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

}  // namespace fd
