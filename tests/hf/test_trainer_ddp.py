"""DistillationTrainer under torchrun with 2 gloo processes on CPU equals one process on the global
batch: the per-rank micro-batches hold different token counts, Trainer sums the count over the ranks
(average_tokens_across_devices) and DDP averages the gradients. One launch runs every case
(tests/hf/trainer_ddp_worker.py)."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def test_two_gloo_processes_match_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "trainer_ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    assert set(results) == {"mask_only_ga2", "collator_hard_labels"}
    for case, r in results.items():
        torch.testing.assert_close(r["logged"], r["ref_losses"], rtol=1e-4, atol=1e-6, msg=case)
        moved = 0.0
        for name, start in r["start"].items():
            got, want = r["trained"][name] - start, r["ref"][name] - start
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6, msg=f"{case}: {name}")
            moved = max(moved, want.abs().max().item())
        assert moved > 1e-3, case
