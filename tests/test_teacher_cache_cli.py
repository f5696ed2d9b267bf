"""python -m fastdistill.cache: build and info through a subprocess, the MODULE:ATTR rules and the
one-line errors in process."""
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # cache_fixtures, also imported by the CLI subprocesses

from cache_fixtures import VOCAB, TinyCausalTeacher, edit_manifest, expected_topk, make_sequences  # noqa: E402
from fastdistill.cache import TeacherCache, read_manifest  # noqa: E402
from fastdistill.cache import __main__ as cli  # noqa: E402
from fastdistill.cache import manifest as mf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 8


# --- command line --------------------------------------------------------------------------------

def run_cli(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), REPO,
                                                        os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "fastdistill.cache", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_build_and_info(tmp_path):
    out = str(tmp_path / "cli")
    r = run_cli("build", "--teacher", "cache_fixtures:tiny_teacher", "--data", "cache_fixtures:tiny_dataset",
                "--out", out, "--k", str(K), "--temperature", "1.5", "--dtype", "bfloat16", "--batch-size", "3",
                "--shard-size", "6", "--device", "cpu", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "complete" in r.stdout
    cache = TeacherCache(out, expected_k=K, expected_vocab=VOCAB, verify=True)
    assert cache.dtype == torch.bfloat16 and cache.num_shards == 4
    teacher, seqs = TinyCausalTeacher(), make_sequences()
    assert cache.teacher_hash == mf.module_hash(teacher)
    for i in (0, 3, 22):
        values, indices = expected_topk(teacher, seqs[i], K, 1.5, torch.bfloat16)
        assert torch.equal(cache[i]["topk_logprobs"], values) and torch.equal(cache[i]["topk_indices"], indices)

    r = run_cli("info", out)
    assert r.returncode == 0, r.stderr
    for text in ("complete", "23 in 4 shards", "targets       topk: k=8",
                 f"tokens        {cache.num_tokens}", f"k={K}", "temperature 1.5",
                 f"{K * 6} B (top-k) vs {VOCAB * 2} B (full vocab, bfloat16)"):
        assert text in r.stdout, (text, r.stdout)


def test_cli_resolution_rules_and_errors_in_process(tmp_path, capsys):
    """The MODULE:ATTR rules and the one-line errors (exit status 2), in process: a subprocess costs
    seconds of torch import each."""
    out = str(tmp_path / "c")
    # an nn.Module instance and a generator function: used as is / called and listed
    assert cli.main(["build", "--teacher", "cache_fixtures:tiny_teacher_instance", "--data",
                     "cache_fixtures:tiny_dataset_gen", "--out", out, "--k", "4", "--no-progress"]) == 0
    assert TeacherCache(out).num_sequences == 23
    # a class with no required arguments is instantiated; same weights, so the build resumes as a no-op
    assert cli.main(["build", "--teacher", "cache_fixtures:TinyCausalTeacher", "--data",
                     "cache_fixtures:tiny_dataset", "--out", out, "--k", "4", "--no-progress"]) == 0
    capsys.readouterr()
    for argv, message in [
        (["build", "--teacher", "cache_fixtures:TinyCausalTeacher", "--data", "cache_fixtures:tiny_dataset",
          "--out", out, "--k", "5"], "k mismatch"),
        (["build", "--teacher", "cache_fixtures", "--data", "x:y", "--out", out], "expected MODULE:ATTR"),
        (["build", "--teacher", "no_such_module_xyz:t", "--data", "x:y", "--out", out], "cannot import module"),
        (["build", "--teacher", "cache_fixtures:nothing_here", "--data", "x:y", "--out", out],
         "has no attribute 'nothing_here'"),
        (["build", "--teacher", "cache_fixtures:VOCAB", "--data", "cache_fixtures:tiny_dataset", "--out", out],
         "not a callable or nn.Module"),
        (["build", "--teacher", "cache_fixtures:FailingTeacher", "--data", "cache_fixtures:tiny_dataset",
          "--out", out], "needs constructor arguments"),
        (["info", str(tmp_path / "nope")], "no such directory"),
    ]:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err

    assert cli.main(["info", out, "--verify"]) == 0
    assert "every shard's sha256 matches" in capsys.readouterr().out
    assert cli.main(["info", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == read_manifest(out)
    os.remove(os.path.join(out, "shard-00000.safetensors"))
    assert cli.main(["info", out, "--verify"]) == 2
    assert "shard-00000.safetensors is missing" in capsys.readouterr().err
    edit_manifest(out, lambda m: m.update(complete=False, shards=m["shards"][:0]))
    assert cli.main(["info", out]) == 0
    assert "INCOMPLETE: 0/1 shards" in capsys.readouterr().out
