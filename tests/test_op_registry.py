"""Item: custom ops are registered at import (one registry, fastdistill/ops/common.py), so the first call
of an op may be inside torch.compile(fullgraph=True) (registration cannot run inside a trace)."""
import subprocess
import sys
import textwrap

import torch

import fastdistill  # noqa: F401  (imports every op module)


def _fastdistill_ops():
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastdistill::"))


def test_every_op_has_a_fake_after_import():
    from torch._library.simple_registry import singleton

    names = _fastdistill_ops()
    assert len(names) > 20, names
    missing = [n for n in names if singleton.find(n).fake_impl.kernel is None]
    assert not missing, f"no fake implementation registered at import for: {missing}"


# Each op's first call happens inside a fullgraph compile, in a fresh process (nothing registered by an
# earlier eager call). The eager backend still traces with fake tensors, which is where it used to fail.
_FIRST_CALL_UNDER_COMPILE = textwrap.dedent("""
    import torch, fastdistill
    from fastdistill.sparse import BlockSparseWeight, SemiStructuredWeight
    torch.manual_seed(0)
    s = torch.randn(6, 33, requires_grad=True); t = torch.randn(6, 33)
    lp, ids = torch.log_softmax(t, -1).topk(4)
    from fastdistill.cache.sampling import sample_teacher_targets
    slp, sids = sample_teacher_targets(t, 5, generator=torch.Generator().manual_seed(0))
    h = torch.randn(6, 8, requires_grad=True); w = torch.randn(33, 8, requires_grad=True)
    x = torch.randn(5, 32, requires_grad=True); wd = torch.randn(16, 32)
    wd.view(16, 8, 4)[..., 2:] = 0  # 2:4
    bsr = BlockSparseWeight.from_dense(wd, block_size=(16, 16)); ss = SemiStructuredWeight.from_dense(wd)
    q, qs = fastdistill.quantize_per_token(torch.randn(5, 32))
    wq = torch.randint(-127, 128, (16, 32), dtype=torch.int8); ws = torch.rand(16) + 0.1
    calls = {
        "distill_loss": lambda: fastdistill.distill_loss(s, t, backend="cpu"),
        "topk_distill_loss": lambda: fastdistill.topk_distill_loss(s, lp, ids, backend="cpu"),
        "fused_linear_distill_loss": lambda: fastdistill.fused_linear_distill_loss(h, w, h.detach(), w.detach(),
                                                                                   backend="cpu"),
        "sampled_distill_loss": lambda: fastdistill.sampled_distill_loss(s, slp, sids, backend="cpu"),
        "fused_linear_topk_distill_loss": lambda: fastdistill.fused_linear_topk_distill_loss(h, w, lp, ids,
                                                                                             backend="cpu"),
        "fused_linear_sampled_distill_loss": lambda: fastdistill.fused_linear_sampled_distill_loss(
            h, w, slp, sids, backend="cpu"),
        "quantize_per_token": lambda: fastdistill.quantize_per_token(x.detach(), backend="cpu")[1],
        "int8_linear": lambda: fastdistill.int8_linear(q, qs, wq, ws, backend="cpu"),
        "int8_weight_only_linear": lambda: fastdistill.int8_weight_only_linear(x, wq, ws, backend="cpu"),
        "block_sparse_linear": lambda: fastdistill.block_sparse_linear(x, bsr, backend="cpu"),
        "semi_structured_linear": lambda: fastdistill.semi_structured_linear(x, ss, backend="cpu"),
    }
    for name, call in calls.items():  # each op's first call is the compiled one
        out = torch.compile(call, fullgraph=True, backend="eager")()
        if out.requires_grad:
            out.sum().backward()
        print("ok", name)
""")


def test_first_call_inside_compile_fullgraph(tmp_path):
    script = tmp_path / "first_call.py"
    script.write_text(_FIRST_CALL_UNDER_COMPILE)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert res.stdout.count("ok ") == 11, res.stdout
