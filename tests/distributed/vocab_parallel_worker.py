"""Run by test_vocab_parallel.py as 2 processes (gloo ranks on CPU):
`python vocab_parallel_worker.py OUT_DIR RANK WORLD INIT_FILE`. Each rank runs every vocabulary-parallel case
against the single-process reference (float64) and writes OUT_DIR/rank<r>.json: {case name: "" when it passed,
else what went wrong}.

Every rank builds the same full tensors (same seed), passes its slice (group=, split 700 + 571) or a DTensor
placed Shard (torch's even split: 636 + 635), and compares its loss with the reference's and its gradient slice
with the matching slice of the reference's gradient: nothing is gathered.
"""
import json
import math
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

V, H, H_T, K = 1271, 16, 12, 20
GROUP_SPLIT = (700, 571)
DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "mse")
# Option sets: every divergence runs each; they cover temperature, the hard-label term, the reductions
# (with num_items, and "none" with uneven upstream row gradients) and the beta / skew weights.
OPTIONS = {
    "A": dict(temperature=2.0, hard_weight=0.3, reduction="batchmean", beta=0.3, skew=0.2),
    "B": dict(temperature=1.0, hard_weight=0.0, reduction="none", beta=0.7, skew=0.6),
    "C": dict(temperature=1.5, hard_weight=0.5, reduction="sum", beta=0.5, skew=0.1, scale_t2=False),
    "D": dict(temperature=1.0, hard_weight=0.2, reduction="batchmean", num_items=7.5),
}


class Env:
    def __init__(self, rank, world):
        from torch.distributed.device_mesh import init_device_mesh

        self.rank, self.world = rank, world
        self.mesh = init_device_mesh("cpu", (world,))
        self.group = dist.group.WORLD

    def slice_of(self, mode: str, n: int = V) -> slice:
        if mode == "group":
            sizes = GROUP_SPLIT
        else:  # torch.chunk's split, what Shard uses
            c = math.ceil(n / self.world)
            sizes = [max(min(c, n - r * c), 0) for r in range(self.world)]
        start = sum(sizes[:self.rank])
        return slice(start, start + sizes[self.rank])

    def shard(self, mode: str, full: torch.Tensor, dim: int, grad: bool = False):
        """What this rank passes for a tensor split along `dim`: its slice (mode "group") or a DTensor."""
        from torch.distributed.tensor import Shard, distribute_tensor

        if mode == "group":
            index = [slice(None)] * full.dim()
            index[dim] = self.slice_of(mode, full.shape[dim])
            out = full[tuple(index)].clone()
        else:
            out = distribute_tensor(full.detach(), self.mesh, [Shard(dim)])
        return out.requires_grad_() if grad else out

    def replicate(self, full: torch.Tensor, grad: bool = False):
        from torch.distributed.tensor import Replicate, distribute_tensor

        out = distribute_tensor(full.detach(), self.mesh, [Replicate()])
        return out.requires_grad_() if grad else out

    def kwargs(self, mode: str, opts: dict) -> dict:
        """group= for local slices; with DTensors too under option set C (it must agree with the mesh)."""
        return {"group": self.group} if mode == "group" or opts is OPTIONS["C"] else {}


def local_grad(leaf, placement_type=None):
    from torch.distributed.tensor import DTensor

    if isinstance(leaf, DTensor):
        assert isinstance(leaf.grad, DTensor), f"gradient of a DTensor is a {type(leaf.grad).__name__}"
        assert leaf.grad.placements == leaf.placements, (leaf.grad.placements, leaf.placements)
        return leaf.grad.to_local()
    return leaf.grad


# float64 inputs: float64 end to end; lower precision vs the float64 reference of the same rounded inputs
TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6), torch.bfloat16: (2e-2, 2e-3)}


def close(name, got, want, equal_nan=False):
    rtol, atol = TOLERANCES[got.dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, equal_nan=equal_nan,
                               msg=lambda m: f"{name}: {m}")


def upstream(loss: torch.Tensor) -> torch.Tensor:
    """Upstream gradient: uneven row weights for reduction "none" (checks the per-row scaling)."""
    if loss.dim() == 0:
        return torch.ones((), dtype=loss.dtype)
    return torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).view(loss.shape)


def logits_inputs(seed: int, nan: bool, masked: bool):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 5, V, generator=g, dtype=torch.float64) * 3
    y = torch.randn(2, 5, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[0, 0] = labels[1, 4] = -100
    z[1, 4] = -math.inf  # an ignored row of padding: must not leak
    labels[0, 2] = 7
    if masked:  # masked tokens (probability 0) in both models, one on each rank
        z[0, 2, 3] = y[0, 2, 3] = z[0, 2, 1000] = y[0, 2, 1000] = -math.inf
    if nan:  # the NaN rule: NaN on rank 1's slice only; the whole row is NaN on every rank
        z[0, 3, 1100] = math.nan
    return z, y, labels


def case_distill(env, mode, divergence, opts, nan=False, dtype=torch.float64, no_labels=False):
    from fastdistill import distill_loss
    from fastdistill.reference.distill_loss import distill_loss_ref

    z, y, labels = (t.to(dtype) if t.is_floating_point() else t for t in logits_inputs(1, nan, divergence != "mse"))
    if no_labels:  # every row counts: no padding row
        z[1, 4], labels = y[1, 4].flip(-1), None  # not the teacher row: tvd has a kink at p = q
    full = z.to(torch.float64, copy=True).requires_grad_()
    want = distill_loss_ref(full, y.double(), labels, divergence=divergence, **opts)
    (want * upstream(want)).sum().backward()
    leaf = env.shard(mode, z, -1, grad=True)
    got = distill_loss(leaf, env.shard(mode, y, -1), labels=labels, divergence=divergence, **opts,
                       **env.kwargs(mode, opts))
    (got * upstream(got)).sum().backward()
    close("loss", got, want, equal_nan=nan)
    close("grad", local_grad(leaf), full.grad[..., env.slice_of(mode)], equal_nan=nan)


def case_topk(env, mode, divergence, tail, opts, nan=False, dtype=torch.float64, k=K, no_labels=False):
    from fastdistill import topk_distill_loss
    from fastdistill.reference.topk_distill_loss import topk_distill_loss_ref

    z, y, labels = logits_inputs(2, nan, masked=False)
    if no_labels:
        z[1, 4], labels = y[1, 4].flip(-1), None  # not the teacher row: tvd has a kink at p = q
    lp, ids = torch.log_softmax(y / opts.get("temperature", 1.0), -1).topk(k, -1)
    if k < V:
        z[0, 4, y[0, 4].argmin()] = -math.inf  # a masked student token outside the top k
    if nan:
        ids[1, 1, 0] = V  # an id outside [0, V): a NaN row on every rank too
    z, lp = z.to(dtype), lp.to(dtype)
    full = z.to(torch.float64, copy=True).requires_grad_()
    want = topk_distill_loss_ref(full, lp.double(), ids, labels, tail=tail, divergence=divergence, **opts)
    (want * upstream(want)).sum().backward()
    leaf = env.shard(mode, z, -1, grad=True)
    got = topk_distill_loss(leaf, lp, ids, tail=tail, labels=labels, divergence=divergence, **opts,
                            **env.kwargs(mode, opts))
    (got * upstream(got)).sum().backward()
    close("loss", got, want, equal_nan=nan)
    close("grad", local_grad(leaf), full.grad[..., env.slice_of(mode)], equal_nan=nan)


def fused_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    d = dict(generator=g, dtype=torch.float64)
    sh, th = torch.randn(2, 5, H, **d), torch.randn(2, 5, H_T, **d)
    sw, tw = torch.randn(V, H, **d) * 0.5, torch.randn(V, H_T, **d) * 0.5
    sb, tb = torch.randn(V, **d), torch.randn(V, **d)
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[0, 0] = labels[1, 4] = -100
    sh[1, 4] = math.nan  # padding in an ignored row: kept out of every gradient
    return sh, sw, sb, th, tw, tb, labels


def case_fused(env, mode, divergence, opts, heads, replicated_hidden=False, nan=False, dtype=torch.float64,
               no_labels=False):
    from fastdistill import fused_linear_distill_loss
    from fastdistill.reference.fused_linear_distill_loss import fused_linear_distill_loss_ref

    sh, sw, sb, th, tw, tb, labels = fused_inputs(3)
    if no_labels:
        sh[1, 4], labels = 0.5, None
    if nan:
        sw[1100, 0] = math.nan  # a weight row on rank 1: NaN logits in every valid row, on every rank
    sh, sw, sb, th, tw, tb = (t.to(dtype) for t in (sh, sw, sb, th, tw, tb))
    full = [t.to(torch.float64, copy=True).requires_grad_() for t in (sh, sw, sb)]
    want = fused_linear_distill_loss_ref(full[0], full[1], th.double(), tw.double(), student_bias=full[2],
                                         teacher_bias=tb.double(),
                                         labels=labels, divergence=divergence, **opts, **heads)
    (want * upstream(want)).sum().backward()
    hidden = env.replicate(sh, grad=True) if replicated_hidden else sh.clone().requires_grad_()
    weight, bias = env.shard(mode, sw, 0, grad=True), env.shard(mode, sb, 0, grad=True)
    got = fused_linear_distill_loss(hidden, weight, th, env.shard(mode, tw, 0), student_bias=bias,
                                    teacher_bias=env.shard(mode, tb, 0), labels=labels, chunk_size=3,
                                    divergence=divergence, **opts, **heads, **env.kwargs(mode, opts))
    (got * upstream(got)).sum().backward()
    close("loss", got, want, equal_nan=nan)
    close("grad hidden", local_grad(hidden), full[0].grad, equal_nan=nan)
    close("grad weight", local_grad(weight), full[1].grad[env.slice_of(mode)], equal_nan=nan)
    close("grad bias", local_grad(bias), full[2].grad[env.slice_of(mode)], equal_nan=nan)


def case_colwise_head(env, fused: bool):
    """What users run: nn.Linear heads parallelized by torch's ColwiseParallel (weight Shard(0), logits
    Shard(-1)); the student head's weight gradient after backward equals one process's slice."""
    from torch import nn
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from fastdistill import distill_loss, fused_linear_distill_loss
    from fastdistill.reference.distill_loss import distill_loss_ref

    sh, sw, sb, th, tw, tb, labels = fused_inputs(6)
    sh[1, 4] = 0.0  # nn.Linear computes every row: no NaN padding here
    heads = []
    for w, b in ((sw, sb), (tw, tb)):
        head = nn.Linear(w.shape[1], V, dtype=torch.float64)
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
        heads.append(parallelize_module(head, env.mesh, ColwiseParallel(use_local_output=False)))
    student, teacher = heads
    full = sw.clone().requires_grad_()
    want = distill_loss_ref(sh @ full.t() + sb, th @ tw.t() + tb, labels, divergence="jsd", hard_weight=0.4)
    want.backward()
    if fused:
        got = fused_linear_distill_loss(sh, student.weight, th, teacher.weight, student_bias=student.bias,
                                        teacher_bias=teacher.bias, labels=labels, divergence="jsd", hard_weight=0.4)
    else:
        with torch.no_grad():
            t_logits = teacher(th)
        got = distill_loss(student(sh), t_logits, labels=labels, divergence="jsd", hard_weight=0.4)
    got.backward()
    close("loss", got, want)
    close("grad weight", student.weight.grad.to_local(), full.grad[env.slice_of("dtensor")])


def case_module(env, fused: bool):
    """DistillLoss / FusedLinearDistillLoss(group=...) on local slices equal the functions on one process."""
    from fastdistill import DistillLoss, FusedLinearDistillLoss
    from fastdistill.reference.distill_loss import distill_loss_ref
    from fastdistill.reference.fused_linear_distill_loss import fused_linear_distill_loss_ref

    part = env.slice_of("group")
    opts = dict(divergence="tvd", temperature=2.0, hard_weight=0.2)
    if fused:
        sh, sw, _, th, tw, _, labels = fused_inputs(7)
        full = sw.clone().requires_grad_()
        want = fused_linear_distill_loss_ref(sh, full, th, tw, labels=labels, **opts)
        leaf = sw[part].clone().requires_grad_()
        got = FusedLinearDistillLoss(group=env.group, **opts)(sh, leaf, th, tw[part], labels)
    else:
        z, y, labels = logits_inputs(8, nan=False, masked=True)
        full = z.clone().requires_grad_()
        want = distill_loss_ref(full, y, labels, **opts)
        leaf = z[..., part].clone().requires_grad_()
        got = DistillLoss(group=env.group, **opts)(leaf, y[..., part], labels)
    want.backward()
    got.backward()
    close("loss", got, want)
    close("grad", leaf.grad, full.grad[part] if fused else full.grad[..., part])


HEADS = [dict(logit_scale=0.7, softcap=30.0, teacher_softcap=0.0), dict(teacher_logit_scale=1.3)]


def good_cases(env):
    cases = {}
    for mode in ("group", "dtensor"):
        for i, div in enumerate(DIVERGENCES):
            for key, opts in OPTIONS.items():
                if key in ("C", "D") and i % 2:  # C and D on every other divergence
                    continue
                cases[f"distill/{mode}/{div}/{key}"] = lambda m=mode, d=div, o=opts: case_distill(env, m, d, o)
                heads = HEADS[(i + len(key)) % 2]
                rep = mode == "dtensor" and key == "B"
                cases[f"fused/{mode}/{div}/{key}"] = (lambda m=mode, d=div, o=opts, h=heads, r=rep:
                                                      case_fused(env, m, d, o, h, replicated_hidden=r))
                if div == "mse":
                    continue
                for tail in ("renormalize", "bucket"):
                    cases[f"topk/{mode}/{div}/{tail}/{key}"] = (lambda m=mode, d=div, t=tail, o=opts:
                                                                case_topk(env, m, d, t, o))
        nan_opts = dict(OPTIONS["A"], reduction="none")
        cases[f"nan/{mode}/distill"] = lambda m=mode: case_distill(env, m, "jsd", nan_opts, nan=True)
        cases[f"nan/{mode}/topk"] = lambda m=mode: case_topk(env, m, "kl", "bucket", nan_opts, nan=True)
        cases[f"nan/{mode}/fused"] = lambda m=mode: case_fused(env, m, "kl", nan_opts, HEADS[0], nan=True)
    low = dict(OPTIONS["A"], reduction="none")
    cases["lowp/distill/float32"] = lambda: case_distill(env, "group", "jsd", low, dtype=torch.float32)
    cases["lowp/topk/float32"] = lambda: case_topk(env, "dtensor", "kl", "bucket", low, dtype=torch.float32)
    cases["lowp/fused/float32"] = lambda: case_fused(env, "group", "kl", low, HEADS[0], dtype=torch.float32)
    cases["lowp/fused/bfloat16"] = lambda: case_fused(env, "dtensor", "kl", OPTIONS["A"], HEADS[1],
                                                      dtype=torch.bfloat16)
    cases["module/distill"] = lambda: case_module(env, fused=False)
    cases["module/fused"] = lambda: case_module(env, fused=True)
    cases["tp/colwise/distill"] = lambda: case_colwise_head(env, fused=False)
    cases["tp/colwise/fused"] = lambda: case_colwise_head(env, fused=True)
    return cases


def run_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    env = Env(rank, world)
    from vocab_parallel_bad_cases import bad_cases
    from vocab_parallel_edge_cases import edge_cases

    results = {}
    # Bad input first: a case that raised on one rank only would desynchronize the collectives of the rest.
    for name, case in {**bad_cases(env), **good_cases(env), **edge_cases(env)}.items():
        try:
            case()
            results[name] = ""
        except Exception:  # recorded per case; the test reports them
            results[name] = traceback.format_exc(limit=4)[-3000:]
    dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":  # python vocab_parallel_worker.py OUT_DIR RANK WORLD INIT_FILE
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    run_rank(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[1])
