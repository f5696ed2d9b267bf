"""Packaging contracts that are cheap to check on every test run (the full sdist -> wheel -> fresh venv check is
`make check-package`, tests/package_check.py): the sdist carries the C++/CUDA sources, one version, core
dependencies that suffice for `import fastdistill` and the ops, the build's CUDA decision and its record, and
a loud warning when a present extension cannot load."""
import glob
import importlib.machinery
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

import package_check
import setup_py

ROOT = setup_py.ROOT


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_version_is_single_sourced():
    import fastdistill
    from fastdistill import _version

    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"], project
    attr = _pyproject()["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "fastdistill._version.__version__"
    assert fastdistill.__version__ == _version.__version__
    assert fastdistill.info()["versions"]["fastdistill"] == _version.__version__


def test_core_dependencies_and_extras():
    project = _pyproject()["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert names == {"torch", "safetensors", "packaging", "numpy"}, project["dependencies"]
    torch_req = next(d for d in project["dependencies"] if d.startswith("torch"))
    assert torch_req == "torch>=2.8", torch_req  # mm/addmm(out_dtype=) in the fused linear loss
    extras = project["optional-dependencies"]
    assert {"pyyaml", "tqdm", "matplotlib", "scikit-learn"} <= set(extras["pipeline"])
    assert extras["demo"] == extras["pipeline"] and extras["triton"] == ["triton>=3.6"]


# Imports of packages that are not core dependencies fail in the child: `import fastdistill` and a cpu op must
# not need them (they belong to the `pipeline` extra; triton loads on first use of a triton backend).
BLOCKED = ("yaml", "tqdm", "matplotlib", "sklearn", "triton", "scipy", "pandas")
BLOCK_SCRIPT = r"""
import sys
for name in BLOCKED:  # what "not installed" looks like: import raises, importlib.util.find_spec gives None
    sys.modules[name] = None
import torch
import fastdistill
s, t = torch.randn(4, 37), torch.randn(4, 37)
for backend in ("cpu", "reference"):
    assert torch.isfinite(fastdistill.distill_loss(s, t, backend=backend))
assert torch.isfinite(fastdistill.distill_loss(s, t))  # auto skips the triton backend
print("ok")
"""


def test_import_and_cpu_op_need_only_core_dependencies():
    proc = subprocess.run([sys.executable, "-c", f"BLOCKED = {BLOCKED!r}\n" + BLOCK_SCRIPT], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok", proc.stdout


def test_sdist_contains_every_csrc_source(tmp_path):
    """The sdist must build the extension (issue 11: without MANIFEST.in it lacked csrc/include and csrc/cuda)."""
    pytest.importorskip("build")
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), ROOT],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdist,) = glob.glob(str(tmp_path / "fastdistill-*.tar.gz"))
    assert package_check.sdist_missing_sources(sdist) == []
    import tarfile

    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    assert any(n.endswith("csrc/include/fd_cuda_int8_dev.cuh") for n in names), names  # a .cuh header
    assert not [n for n in names if n.endswith((".so", ".o")) or n.endswith("_build_info.py")], names


def test_cuda_plan():
    setup = setup_py.load()
    assert setup.cuda_plan("", None, "/usr/local/cuda", "13.0")[0] is False  # CPU torch
    ok, reason = setup.cuda_plan("", "13.0", "/usr/local/cuda", "12.4")
    assert not ok and "does not match" in reason, reason  # the CPU kernels still build, with the reason
    ok, reason = setup.cuda_plan("", "12.8", None, None)
    assert not ok and "nvcc not found" in reason, reason
    assert setup.cuda_plan("", "13.0", "/usr/local/cuda", "13.0") == (True, None)
    assert setup.cuda_plan("", "12.8", "/usr/local/cuda", "12.6") == (True, None)  # minor mismatch: torch warns
    assert setup.cuda_plan("0", "13.0", "/usr/local/cuda", "13.0")[0] is False
    with pytest.raises(SystemExit, match="FASTDISTILL_CUDA=1.*does not match"):
        setup.cuda_plan("1", "13.0", "/usr/local/cuda", "12.4")


def test_arch_list_to_gencode():
    setup = setup_py.load()
    assert setup.gencode_flags("8.0;9.0+PTX") == ["-gencode=arch=compute_80,code=sm_80",
                                                  "-gencode=arch=compute_90,code=sm_90",
                                                  "-gencode=arch=compute_90,code=compute_90"]
    assert setup.gencode_flags("8.6 9.0a") == ["-gencode=arch=compute_86,code=sm_86",
                                               "-gencode=arch=compute_90a,code=sm_90a"]
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        setup.gencode_flags("Hopper")
    assert setup.default_arch_list("12.4") == "8.0;8.6;8.9;9.0+PTX"  # no sm_100 before nvcc 12.8
    assert setup.default_arch_list("13.0").startswith("8.0;8.6;8.9;9.0;10.0")


def test_build_is_recorded():
    import fastdistill

    build = fastdistill.info()["build"]
    if build is None:
        pytest.skip("this extension was built before setup.py wrote fastdistill/_build_info.py")
    assert build["torch"] == __import__("torch").__version__, build  # built against the torch that runs
    if not build["cuda"]:
        assert build["cuda_skipped"], build  # the reason the CUDA kernels were left out


def _package_copy(tmp_path, fake_extension):
    """A copy of the fastdistill package without its build outputs, optionally with a corrupt _C extension."""
    import fastdistill

    dest = tmp_path / "fastdistill"
    shutil.copytree(os.path.dirname(fastdistill.__file__), dest,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_build_info.py"))
    if fake_extension:  # what an ABI-mismatched build looks like to the loader: present, but fails to load
        (dest / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"\x7fELF not really a shared object")
    return tmp_path


IMPORT_SCRIPT = r"""
import sys, warnings
# The checkout's editable install maps fastdistill.* to the checkout (the real _C included): drop its finder.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", type(f).__module__)]
warnings.simplefilter("always")
import torch
import fastdistill
assert fastdistill.__file__.startswith(HERE), fastdistill.__file__
loss = fastdistill.distill_loss(torch.randn(3, 17), torch.randn(3, 17))  # auto falls back to a backend that runs
assert torch.isfinite(loss)
print("load_error:", fastdistill._ext.load_error())
"""


def _import_copy(where):
    return subprocess.run([sys.executable, "-c", f"HERE = {str(where)!r}\n" + IMPORT_SCRIPT], capture_output=True,
                          text=True, cwd=where, timeout=300, env={**os.environ, "PYTHONPATH": str(where)})


def test_broken_extension_warns_loudly_at_import(tmp_path):
    proc = _import_copy(_package_copy(tmp_path, fake_extension=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RuntimeWarning: fastdistill: the compiled extension exists but failed to load" in proc.stderr, proc.stderr
    assert "rebuild it against this torch" in proc.stderr and "--no-build-isolation" in proc.stderr, proc.stderr
    assert proc.stderr.count("failed to load") == 1, proc.stderr  # once per process


def test_missing_extension_is_quiet(tmp_path):
    """A pure-Python install is legitimate: no warning, the reference backends serve."""
    proc = _import_copy(_package_copy(tmp_path, fake_extension=False))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "failed to load" not in proc.stderr, proc.stderr
    assert "load_error: fastdistill._C is not built" in proc.stdout, proc.stdout
