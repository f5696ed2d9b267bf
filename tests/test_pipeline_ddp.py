"""torchrun with 2 gloo processes on CPU gives the single-process result (same global batches).

The ranks split every global batch, normalize their losses by the global row count and DDP
averages the gradients, so the two runs differ only by the order of fp32 reductions.
"""
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline_cases import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("stages", [dict(prune=None, quantize=None)])
def test_two_gloo_processes_match_one(tmp_path, stages):
    outs = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        cfg = tmp_path / f"cfg{world}.yaml"
        cfg.write_text(yaml.safe_dump({**TINY, **stages, "output_dir": str(out)}))
        run = [sys.executable, "-m", "fastdistill", "run", str(cfg), "--no-progress", "--json"]
        if world > 1:
            run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   "-m", "fastdistill", "run", str(cfg), "--no-progress", "--json"]
        _run(run, tmp_path)
        outs[world] = load_file(str(out / "export" / "student.safetensors"))
        assert not (out / "checkpoints" / "distill.final.safetensors.tmp.0").exists()
    assert outs[1].keys() == outs[2].keys()
    for name in outs[1]:
        torch.testing.assert_close(outs[2][name], outs[1][name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(outs[1][n], torch.zeros_like(outs[1][n])) for n in outs[1])
