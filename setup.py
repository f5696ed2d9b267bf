"""Builds fastdistill._C: the C++ CPU kernels always, the CUDA kernels when a CUDA torch and a matching nvcc exist.

The extension compiles against the torch of the running interpreter, so install with
`pip install --no-build-isolation .` into an environment that already has the torch you will use.

Environment:
  FASTDISTILL_CUDA=1     require the CUDA build (fails loudly when it is impossible), =0 skip it; unset: build
                         it when torch has CUDA and nvcc's major version matches torch.version.cuda, else build
                         the CPU kernels only and record why (fastdistill.info()["build"]).
  TORCH_CUDA_ARCH_LIST   GPU targets, e.g. "8.0;9.0+PTX" ("+PTX" also embeds that arch's PTX for newer GPUs).
                         Default: DEFAULT_ARCH_LIST below (A100, A10/3090, L4/4090, H100/H200, B200 + PTX).
  FASTDISTILL_CUDA_ARCH  raw nvcc -gencode flags; overrides TORCH_CUDA_ARCH_LIST.
The build writes fastdistill/_build_info.py (what was built, for which archs, against which torch, and why
the CUDA kernels were left out, if they were).
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# Every arch needs sm_80 features (cp.async, ldmatrix, bf16 mma.m16n8k16). 10.0 needs nvcc >= 12.8.
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0;10.0+PTX"
DEFAULT_ARCH_LIST_OLD_NVCC = "8.0;8.6;8.9;9.0+PTX"


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def nvcc_release(cuda_home):
    """nvcc's "major.minor" release, or None when there is no runnable nvcc under cuda_home."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def cuda_plan(flag, torch_cuda, cuda_home, nvcc):
    """(build the CUDA kernels?, why not). flag: FASTDISTILL_CUDA; nvcc: nvcc_release(); FASTDISTILL_CUDA=1
    turns every reason into a failed build."""
    if flag == "0":
        return False, "FASTDISTILL_CUDA=0"
    reason = None
    if torch_cuda is None:
        reason = f"torch {torch.__version__} is a CPU build"
    elif cuda_home is None or nvcc is None:
        reason = f"nvcc not found (CUDA_HOME={cuda_home}); torch is built for CUDA {torch_cuda}"
    elif nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        reason = f"nvcc {nvcc} does not match torch's CUDA {torch_cuda} (major versions differ)"
    if reason is not None and flag == "1":
        sys.exit(f"FASTDISTILL_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    return reason is None, reason


def default_arch_list(nvcc):
    major, minor = (int(v) for v in (nvcc or "0.0").split(".")[:2])
    return DEFAULT_ARCH_LIST if (major, minor) >= (12, 8) else DEFAULT_ARCH_LIST_OLD_NVCC


def gencode_flags(arch_list):
    """TORCH_CUDA_ARCH_LIST syntax ("8.0;9.0+PTX", spaces also separate) -> nvcc -gencode flags."""
    flags = []
    for item in arch_list.replace(" ", ";").split(";"):
        if not item:
            continue
        arch, ptx = (item[:-4], True) if item.endswith("+PTX") else (item, False)
        if not re.fullmatch(r"\d+\.\d+a?", arch):
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot read {item!r} (expected e.g. '8.0' or '9.0+PTX')")
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST: no architecture in {arch_list!r}")
    return flags


# -ffp-contract=off: no silent FMA contraction, so x * (1/T) - max is exactly 0 at the max and
# every target_clones variant (AVX-512, AVX2, baseline) gives the same bits.
# -fno-trapping-math: lets GCC turn the selects of the hot loops into blends and vectorize them
# (nothing here relies on floating-point exception flags).
# -g0: no debug info (python's CFLAGS carry -g): the same machine code, half the compile time, a smaller .so.
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-g0"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false"]


def extension(info):
    include = [os.path.join(ROOT, "csrc", "include")]
    cxx = list(CXX_FLAGS)
    sources = rel("csrc/ops.cpp") + rel("csrc/cpu/*.cpp")
    nvcc = nvcc_release(CUDA_HOME)
    build_cuda, reason = cuda_plan(os.environ.get("FASTDISTILL_CUDA", ""), torch.version.cuda, CUDA_HOME, nvcc)
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, nvcc=nvcc, cuda=build_cuda,
                cuda_skipped=reason, cuda_arch=None)
    if build_cuda:
        if os.environ.get("FASTDISTILL_CUDA_ARCH"):
            arch = os.environ["FASTDISTILL_CUDA_ARCH"].split()
            info["cuda_arch"] = os.environ["FASTDISTILL_CUDA_ARCH"]
        else:
            arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or default_arch_list(nvcc)
            arch = gencode_flags(arch_list)
            info["cuda_arch"] = arch_list
        print(f"fastdistill: building C++ CPU + CUDA kernels for {info['cuda_arch']}", flush=True)
        return CUDAExtension(
            "fastdistill._C", sources + rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp"),
            include_dirs=include, define_macros=[("FD_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": [*NVCC_FLAGS, *arch]},
            extra_link_args=["-fopenmp"])
    print(f"fastdistill: building C++ CPU kernels only ({reason})", flush=True)
    return CppExtension("fastdistill._C", sources, include_dirs=include,
                        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


def build_ext_class(info):
    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        """Also writes fastdistill/_build_info.py next to the built extension (in place for editable installs)."""

        def run(self):
            super().run()
            path = os.path.join(os.path.dirname(self.get_ext_fullpath("fastdistill._C")), "_build_info.py")
            with open(path, "w") as f:
                f.write('"""Written by setup.py at build time: what fastdistill._C contains."""\n')
                f.write(f"BUILD = {info!r}\n")

    return BuildExt


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    build_info = {}
    setup(
        packages=find_packages(include=["fastdistill", "fastdistill.*"]),
        ext_modules=[extension(build_info)],
        cmdclass={"build_ext": build_ext_class(build_info)},
    )
