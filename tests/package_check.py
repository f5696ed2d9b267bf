"""`make check-package` (CI runs it after `make test`): the release artifacts work for someone who is not us.

1. `python -m build --no-isolation` builds the sdist, then the wheel FROM the sdist (so the sdist is proven
   to build: it carries every C++/CUDA source and header);
2. the sdist lists csrc/ completely, the wheel holds the compiled extension and its build record;
3. the wheel installs into a FRESH venv (no system site-packages: only the wheel's declared dependencies,
   torch pinned to the dev pin from local disk) and passes a smoke test run outside the checkout:
   import without warnings, `fastdistill info` (console script), one `cpu`-backend op.
Prints the time of each step. Run: .venv/bin/python tests/package_check.py [--keep DIR]
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PIN = "torch==2.13.0"  # requirements-dev.txt: the CPU build from local disk (unpinned pulls GBs of CUDA)

SMOKE = r"""
import json, warnings
warnings.simplefilter("error")  # a broken extension warns at import: fail on it
import torch
import fastdistill
assert fastdistill._ext.load_error() is None, fastdistill._ext.load_error()
assert fastdistill.__file__.startswith(PREFIX), fastdistill.__file__  # the installed copy, not the checkout
s = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
t = torch.randn(3, 11, dtype=torch.float64)
for backend in ("cpu", "reference"):
    loss = fastdistill.distill_loss(s.float(), t.float(), backend=backend)
    assert torch.isfinite(loss), (backend, loss)
print(json.dumps({"version": fastdistill.__version__, "build": fastdistill.info()["build"]}))
"""


def sdist_missing_sources(sdist: str) -> list[str]:
    """csrc files of the checkout (.h .cuh .cpp .cu) that the sdist lacks."""
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = [os.path.relpath(p, ROOT) for ext in ("h", "cuh", "cpp", "cu")
              for p in glob.glob(os.path.join(ROOT, "csrc", "**", f"*.{ext}"), recursive=True)]
    return sorted(p for p in wanted if p not in names)


def run(cmd, **kw):
    print("+", " ".join(cmd)[:300], flush=True)
    res = subprocess.run(cmd, **kw)
    if res.returncode != 0:
        sys.exit(f"package check: failed (exit {res.returncode}): {' '.join(cmd)[:300]}\n"
                 f"{(res.stdout or '')[-3000:]}\n{(res.stderr or '')[-3000:]}")
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="work in this directory and keep it (default: a temporary one)")
    args = parser.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="fd-package-")
    os.makedirs(work, exist_ok=True)
    dist, venv = os.path.join(work, "dist"), os.path.join(work, "venv")
    times = {}

    start = time.time()
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT], env=env, cwd=work)
    times["sdist + wheel from the sdist"] = time.time() - start
    (sdist,) = glob.glob(os.path.join(dist, "fastdistill-*.tar.gz"))
    (wheel,) = glob.glob(os.path.join(dist, "fastdistill-*.whl"))

    missing = sdist_missing_sources(sdist)
    assert not missing, f"the sdist lacks {missing} (MANIFEST.in)"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.startswith("fastdistill/_C") and n.endswith(".so") for n in names), names
    assert "fastdistill/_build_info.py" in names, names
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    print("wheel requires:", requires)

    start = time.time()
    run([sys.executable, "-m", "venv", venv])
    py = os.path.join(venv, "bin", "python")
    run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", TORCH_PIN, wheel])
    times["fresh venv + install"] = time.time() - start

    start = time.time()
    outside = tempfile.mkdtemp(prefix="fd-smoke-")  # not the checkout: `import fastdistill` must find the wheel
    smoke = f"PREFIX = {venv!r}\n" + SMOKE
    out = run([py, "-c", smoke], cwd=outside, capture_output=True, text=True).stdout
    print("smoke:", out.strip().splitlines()[-1])
    info = run([os.path.join(venv, "bin", "fastdistill"), "info"], cwd=outside, capture_output=True, text=True)
    assert "distill_loss" in info.stdout, info.stdout[-2000:]
    # the benchmark suite ships in the wheel: it runs without the source tree
    run_json = os.path.join(outside, "bench.json")
    bench = run([os.path.join(venv, "bin", "fastdistill"), "bench", "--op", "quantize_per_token", "--reps", "2",
                 "--json", run_json], cwd=outside, capture_output=True, text=True)
    assert bench.returncode == 0 and "vs best baseline" in bench.stdout and "failed" not in bench.stdout, (
        bench.stdout[-2000:] + bench.stderr[-2000:])
    # and the regression guard: a run checked against itself
    guard = run([os.path.join(venv, "bin", "fastdistill"), "bench", "--check", run_json, "--against", run_json],
                cwd=outside, capture_output=True, text=True)
    assert guard.returncode == 0 and guard.stdout.rstrip().endswith("OK"), guard.stdout[-2000:] + guard.stderr[-2000:]
    times["smoke test"] = time.time() - start

    for step, seconds in times.items():
        print(f"package check: {step}: {seconds:.0f} s")
    print(f"package check: OK ({os.path.basename(sdist)}, {os.path.basename(wheel)}; work dir {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
