"""Builds fastdistill._C: the C++ CPU kernels always, the CUDA kernels when a CUDA torch and nvcc exist.

FASTDISTILL_CUDA=1 requires the CUDA build (fails loudly if it is impossible), =0 skips it,
unset builds it whenever possible. FASTDISTILL_CUDA_ARCH overrides the -gencode targets.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def want_cuda():
    flag = os.environ.get("FASTDISTILL_CUDA", "")
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not possible:
        sys.exit(f"FASTDISTILL_CUDA=1 but a CUDA build is impossible: torch.version.cuda={torch.version.cuda}, "
                 f"CUDA_HOME={CUDA_HOME}")
    return possible if flag == "" else flag == "1"


def extension():
    include = [os.path.join(ROOT, "csrc", "include")]
    # -ffp-contract=off: no silent FMA contraction, so x * (1/T) - max is exactly 0 at the max and
    # every target_clones variant (AVX-512, AVX2, baseline) gives the same bits.
    # -fno-trapping-math: lets GCC turn the selects of the hot loops into blends and vectorize them
    # (nothing here relies on floating-point exception flags).
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    sources = rel("csrc/ops.cpp") + rel("csrc/cpu/*.cpp")
    if want_cuda():
        arch = os.environ.get("FASTDISTILL_CUDA_ARCH", "-gencode=arch=compute_90,code=sm_90").split()
        print("fastdistill: building C++ CPU + CUDA kernels", flush=True)
        return CUDAExtension(
            "fastdistill._C", sources + rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp"),
            include_dirs=include, define_macros=[("FD_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--fmad=false", *arch]},
            extra_link_args=["-fopenmp"])
    print("fastdistill: building C++ CPU kernels (no CUDA build)", flush=True)
    return CppExtension("fastdistill._C", sources, include_dirs=include,
                        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    packages=find_packages(include=["fastdistill", "fastdistill.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
