// ISA variants of the CPU hot loops: GCC compiles each FD_CLONES function for AVX-512, AVX2 and the
// baseline, and the loader picks the best one the CPU has (the dev machines have AVX2 only, users' may
// have AVX-512). FD_INLINE forces inlining into those loops so that they vectorize.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FD_CLONES
#endif
#define FD_INLINE inline __attribute__((always_inline))
