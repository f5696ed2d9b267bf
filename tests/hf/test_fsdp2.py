"""FSDP2 (fully_shard) and DDP on 2 gloo processes on CPU: causal_lm_distill_loss gives the single-process
losses and weights after 3 AdamW steps (one torchrun launch runs every case: tests/hf/fsdp2_worker.py).

Cases: fully_shard per decoder layer + root; the lm_head as its own fully_shard unit; GPT-2 with the
head tied to the embedding; DDP; and a teacher sharded with fully_shard too. The worker also checks that
final_hidden_states refuses an FSDP2 model outside its forward, and what the imports import."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CASES = ("layers", "head_unit", "tied", "ddp", "sharded_teacher")


def test_two_gloo_ranks_match_one_process(tmp_path):
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "fsdp2_worker.py"), str(report), ",".join(CASES)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(report.read_text())
    # `import fastdistill` and `import fastdistill.hf` (checked first thing in a fresh process) import
    # none of transformers, trl, accelerate
    assert result.pop("imports") == {"fastdistill": [], "fastdistill.hf": []}
    assert sorted(result) == sorted(CASES)
    for case, r in result.items():
        assert len(r["losses"]) == 3 and all(x > 0 for x in r["losses"]), case
        assert r["max_weight_change"] > 1e-3, case
