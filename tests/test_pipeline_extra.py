"""numpy, pyyaml, tqdm, matplotlib and scikit-learn are the `pipeline` extra: the package, the cache and
the ops work without the last four (writing safetensors needs numpy), `import fastdistill.pipeline` without
any, and `fastdistill demo|run` say what to install."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRA = ("yaml", "tqdm", "matplotlib", "sklearn")


def _python(code: str, blocked=EXTRA, cwd=None):
    """Runs code in a fresh interpreter where importing any of `blocked` fails (sys.modules[name] = None)."""
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_demo_without_the_extra_says_what_to_install(tmp_path):
    r = _python("from fastdistill.cli import main\nsys.exit(main(['demo', '--output-dir', 'out']))",
                blocked=(*EXTRA, "numpy"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.endswith("fastdistill: demo needs numpy, pyyaml, tqdm, matplotlib, scikit-learn: "
                             "pip install 'fastdistill[pipeline]'\n"), r.stderr
    assert r.stderr.count("fastdistill:") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_run_names_only_the_missing_package(tmp_path):
    r = _python("from fastdistill.cli import main\nsys.exit(main(['run', 'cfg.yaml']))", blocked=("sklearn",),
                cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "run needs scikit-learn: pip install 'fastdistill[pipeline]'" in r.stderr


def test_pipeline_imports_without_the_extra():
    r = _python("import fastdistill.pipeline, fastdistill.cli\nprint('ok')", blocked=(*EXTRA, "numpy"))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_package_cache_and_ops_work_without_the_extra(tmp_path):
    code = f"""
import torch
import fastdistill, fastdistill.cache, fastdistill.pipeline
from cache_fixtures import TinyCausalTeacher, make_sequences
cache = fastdistill.cache.TeacherCache.build({str(tmp_path)!r}, TinyCausalTeacher(), make_sequences(n=5), k=4,
                                             progress=True)  # no tqdm: no bar, no error
fastdistill.cache.TeacherCache({str(tmp_path)!r}, verify=True)
item = cache[1]
student = torch.randn(item["input_ids"].numel(), 97)
loss = fastdistill.topk_distill_loss(student, item["topk_logprobs"].float(), item["topk_indices"], backend="reference")
assert torch.isfinite(loss), loss
print("ok", sorted(m for m in {EXTRA!r} if sys.modules.get(m) is not None))
"""
    r = _python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "ok []"
