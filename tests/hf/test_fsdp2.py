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


@pytest.fixture
def one_rank_group():
    """A gloo group of one process in this process, so that DDP and fully_shard can wrap modules here."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def _linear():
    import torch

    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def test_run_in_forward_plain_module_calls_fn_without_hooks():
    import torch

    from fastdistill.distributed import run_in_forward
    from fastdistill.distributed.forward import in_forward

    lin = _linear()
    lin.register_forward_hook(lambda m, i, o: o * 0)  # would zero the result if fn ran as the forward
    x = torch.ones(2, 4)
    out = run_in_forward(lin, lambda a, k=1: (in_forward(lin), a.sum() * k), x, k=3)
    assert out == (False, x.sum() * 3)


def test_run_in_forward_ddp_and_fsdp_restore_forward(one_rank_group):
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from fastdistill.distributed import run_in_forward
    from fastdistill.distributed.forward import in_forward

    lin = _linear()
    own = lin.forward  # an instance-level forward (as accelerate installs) is put back as it was
    lin.forward = own
    ddp = torch.nn.parallel.DistributedDataParallel(lin)
    assert run_in_forward(ddp, lambda x: (in_forward(ddp), in_forward(lin), lin.forward(x).shape), torch.ones(2, 4)) \
        == (True, True, (2, 3))
    assert lin.__dict__["forward"] is own and not in_forward(ddp)
    with pytest.raises(RuntimeError, match="boom"):
        run_in_forward(ddp, lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert lin.__dict__["forward"] is own

    sharded = fully_shard(_linear(), mesh=init_device_mesh("cpu", (1,)), reshard_after_forward=True)
    sharded(torch.ones(1, 4))  # root lazy init; afterwards the weight is the sharded DTensor again
    weight_type = run_in_forward(sharded, lambda x: type(sharded.weight), torch.ones(1, 4))
    assert weight_type is torch.nn.Parameter and isinstance(sharded.weight, DTensor)
    assert "forward" not in sharded.__dict__
