// ISA variants of the CPU hot loops: GCC compiles each FD_CLONES function for AVX-512, AVX2 and the
// baseline, and the loader picks the best one the CPU has (the dev machines have AVX2 only, users' may
// have AVX-512). FD_INLINE forces inlining into those loops so that they vectorize.
// FD_X86: x86 intrinsics (<immintrin.h>, target("avx2") functions, __builtin_cpu_supports) are compiled only
// when it is 1; other architectures (aarch64: Grace, Graviton) build the portable loops instead.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define FD_X86 1
#else
#define FD_X86 0
#endif

#if defined(__GNUC__) && !defined(__clang__) && FD_X86
#define FD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FD_CLONES
#endif
#define FD_INLINE inline __attribute__((always_inline))
