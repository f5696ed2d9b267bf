"""Compile checks of the CUDA sources on machines without a CUDA torch (the GPU run builds for real):
every .cu for every architecture of setup.py's default TORCH_CUDA_ARCH_LIST (sm_80 ... plus PTX), with
setup.py's nvcc flags."""
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch.utils.cpp_extension as cpp_ext

import setup_py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
BINDINGS = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
NVCC = shutil.which("nvcc") or (os.path.join(cpp_ext.CUDA_HOME, "bin", "nvcc") if cpp_ext.CUDA_HOME else None)
needs_nvcc = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found")


def test_there_are_cuda_sources():
    assert CU_FILES, "no csrc/cuda/*.cu files found"


@needs_nvcc
def test_default_arch_list_covers_sm80_to_sm90_and_ptx():
    setup = setup_py.load()
    flags = setup.gencode_flags(setup.default_arch_list(setup.nvcc_release(os.path.dirname(os.path.dirname(NVCC)))))
    for sm in ("80", "86", "89", "90"):
        assert f"-gencode=arch=compute_{sm},code=sm_{sm}" in flags, flags
    assert any(",code=compute_" in f for f in flags), flags  # PTX of the newest arch: JIT on newer GPUs


# Archs whose register allocation is held to "no spills". nvcc 13.0's ptxas spills 8-16 bytes in
# bsr_dw_f32_kernel and the fp16/bf16 semi_mma_kernel<4, false> for sm_100 only: compile-checked there.
SPILL_FREE_MAJOR = 9


@needs_nvcc
@pytest.mark.parametrize("path", CU_FILES, ids=[os.path.basename(p) for p in CU_FILES])
def test_nvcc_compiles(path, tmp_path):
    """Host code + device code for every default arch up to sm_90 in one nvcc run (host code compiles once;
    --threads 0 runs the per-arch device compiles in parallel), no register spills; newer archs and the PTX
    as device code only, in a second run."""
    setup = setup_py.load()
    archs = setup.default_arch_list(setup.nvcc_release(os.path.dirname(os.path.dirname(NVCC)))).split(";")
    held = [a for a in archs if int(a.split(".")[0]) <= SPILL_FREE_MAJOR and not a.endswith("+PTX")]
    rest = [a for a in archs if a not in held]
    include = f"-I{os.path.join(ROOT, 'csrc', 'include')}"
    common = [*setup.NVCC_FLAGS, "--threads", "0", "-Xptxas", "-warn-spills", include, path]
    res = subprocess.run([NVCC, "-c", *common, *setup.gencode_flags(";".join(held)), "-o", str(tmp_path / "out.o")],
                         capture_output=True, text=True)
    assert res.returncode == 0, f"{held}: {res.stderr[-4000:]}"
    assert "spill" not in res.stderr, f"{held}: {res.stderr[-4000:]}"
    if rest:
        res = subprocess.run([NVCC, "-fatbin", *common, *setup.gencode_flags(";".join(rest)),
                              "-o", str(tmp_path / "out.fatbin")], capture_output=True, text=True)
        assert res.returncode == 0, f"{rest}: {res.stderr[-4000:]}"


@needs_nvcc
@pytest.mark.parametrize("path", BINDINGS, ids=[os.path.basename(p) for p in BINDINGS])
def test_cuda_bindings_parse(path, tmp_path):
    """The CUDA bindings against torch's headers (the CPU wheel lacks one generated CUDA header: stub it)."""
    homes = [cpp_ext.CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda",
             os.path.dirname(os.path.dirname(os.path.realpath(NVCC)))]
    found = [h for h in homes if h and os.path.exists(os.path.join(h, "include", "cuda_runtime_api.h"))]
    if not found:
        pytest.skip(f"CUDA headers not found (looked in {homes})")
    cuda_include = os.path.join(found[0], "include")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [str(tmp_path), os.path.join(ROOT, "csrc", "include"), cuda_include,
                sysconfig.get_paths()["include"], *cpp_ext.include_paths()]
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-DFD_WITH_CUDA", *[f"-I{i}" for i in includes],
           path]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
