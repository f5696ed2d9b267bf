"""Cross-compiles the C++ CPU extension sources for aarch64 (GH200/Grace, Graviton, Apple silicon under Linux)
against this torch's headers, so x86-only code (intrinsics, target_clones) without a portable fallback
fails here instead of on a user's machine.

`-c -O0` rather than `-fsyntax-only`: GCC reports an x86 `target_clones` only when it generates code, and
-O0 costs ~20% over a syntax check. The host's python headers serve as-is: pyconfig.h of x86-64 Linux
describes an LP64 target, which aarch64 Linux also is (no -D tweaks or stubs are needed).
Debian/Ubuntu: `apt-get install g++-aarch64-linux-gnu` (.ci/run installs it)."""
import glob
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch.utils.cpp_extension as cpp_ext

import setup_py

ROOT = setup_py.ROOT
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))) + [os.path.join(ROOT, "csrc", "ops.cpp")]
CXX = shutil.which("aarch64-linux-gnu-g++")
# ~15 s of CPU per file (the files compile in parallel); not marked slow: it is the aarch64 CI check.
pytestmark = [
    pytest.mark.skipif(CXX is None, reason="aarch64-linux-gnu-g++ not found (apt-get install g++-aarch64-linux-gnu)"),
]


def _flags():
    setup = setup_py.load()
    flags = [f for f in setup.CXX_FLAGS if not f.startswith("-O")] + ["-O0"]
    includes = [os.path.join(ROOT, "csrc", "include"), *cpp_ext.include_paths(), sysconfig.get_paths()["include"]]
    return flags + [f"-I{i}" for i in includes] + ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{source: (returncode, stderr)}, compiled in parallel (one process per core)."""
    out = tmp_path_factory.mktemp("aarch64")
    flags = _flags()

    def compile_one(path):
        obj = out / (os.path.basename(path) + ".o")
        res = subprocess.run([CXX, *flags, "-c", path, "-o", str(obj)], capture_output=True, text=True)
        if res.returncode == 0:  # the object really is aarch64 code
            head = obj.read_bytes()[:20]
            assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183, "not an aarch64 ELF"
        return path, (res.returncode, res.stderr)

    with ThreadPoolExecutor(max_workers=max(1, min(len(SOURCES), os.cpu_count() or 1))) as pool:
        return dict(pool.map(compile_one, SOURCES))


def test_sources_found():
    assert len(SOURCES) >= 2 and all(os.path.exists(p) for p in SOURCES), SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=[os.path.relpath(p, ROOT) for p in SOURCES])
def test_compiles_for_aarch64(path, results):
    code, stderr = results[path]
    assert code == 0, f"{os.path.relpath(path, ROOT)} does not compile for aarch64:\n{stderr[-4000:]}"


def test_cross_compiler_rejects_x86_code(tmp_path):
    """The check can fail: an unguarded x86 target_clones (what the CPU kernels use) is an error for aarch64."""
    src = tmp_path / "x86_only.cpp"
    src.write_text('__attribute__((target_clones("avx2", "default"))) int f(int x) { return x + 1; }\n'
                   "int g() { return f(1); }\n")
    res = subprocess.run([CXX, "-O0", "-c", str(src), "-o", str(tmp_path / "x.o")], capture_output=True, text=True)
    assert res.returncode != 0 and "avx2" in res.stderr, res.stderr
