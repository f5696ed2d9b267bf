"""Edge cases of vocabulary-parallel calls (run by vocab_parallel_worker.py on every rank): the exact endpoints of
the divergences, k = V, no labels, no tokens, num_items as a tensor, no_grad."""
import torch

from vocab_parallel_worker import V, case_distill, case_fused, case_topk, close, logits_inputs


def case_no_tokens(env, op: str):
    """0 rows: a zero loss and an empty gradient, as on one process (and no per-row collective on any rank)."""
    from fastdistill import distill_loss, fused_linear_distill_loss, topk_distill_loss

    z, y, _ = logits_inputs(9, nan=False, masked=False)
    z, y = z[:0], y[:0]
    leaf = env.shard("group", z, -1, grad=True)
    if op == "distill":
        got = distill_loss(leaf, env.shard("group", y, -1), group=env.group)
    elif op == "topk":
        ids = torch.zeros(0, 5, 4, dtype=torch.int64)
        got = topk_distill_loss(leaf, torch.zeros(0, 5, 4, dtype=torch.float64), ids, group=env.group)
    else:
        h = torch.zeros(0, 5, 8, dtype=torch.float64, requires_grad=True)
        w = torch.randn(V, 8, dtype=torch.float64)
        leaf = env.shard("group", w, 0, grad=True)
        got = fused_linear_distill_loss(h, leaf, h.detach(), env.shard("group", w, 0), group=env.group)
    got.backward()
    close("loss", got, torch.zeros((), dtype=torch.float64))
    assert leaf.grad is not None and not leaf.grad.any(), "gradient of no tokens is not zero"


def case_no_grad(env):
    from fastdistill import distill_loss

    z, y, labels = logits_inputs(10, nan=False, masked=True)
    leaf = env.shard("dtensor", z, -1, grad=True)
    with torch.no_grad():
        got = distill_loss(leaf, env.shard("dtensor", y, -1), labels=labels, divergence="skew_kl")
    want = distill_loss(leaf, env.shard("dtensor", y, -1), labels=labels, divergence="skew_kl")
    assert not got.requires_grad and want.requires_grad
    close("loss", got, want.detach())


def edge_cases(env):
    return {
        "edge/jsd_beta0": lambda: case_distill(env, "group", "jsd", dict(beta=0.0, temperature=2.0)),
        "edge/jsd_beta1": lambda: case_distill(env, "dtensor", "jsd", dict(beta=1.0, reduction="none")),
        "edge/skew_kl_1": lambda: case_distill(env, "group", "skew_kl", dict(skew=1.0, hard_weight=0.3)),
        "edge/skew_reverse_kl_0": lambda: case_fused(env, "dtensor", "skew_reverse_kl", dict(skew=0.0), {}),
        "edge/topk_k_equals_V": lambda: case_topk(env, "group", "jsd", "bucket", dict(temperature=1.5), k=V),
        "edge/num_items_tensor": lambda: case_distill(env, "dtensor", "tvd", dict(num_items=torch.tensor(6.0))),
        "edge/no_labels/distill": lambda: case_distill(env, "group", "kl", dict(temperature=2.0), no_labels=True),
        "edge/no_labels/topk": lambda: case_topk(env, "dtensor", "tvd", "bucket", {}, no_labels=True),
        "edge/no_labels/fused": lambda: case_fused(env, "group", "jsd", dict(reduction="none"), {}, no_labels=True),
        "edge/no_tokens/distill": lambda: case_no_tokens(env, "distill"),
        "edge/no_tokens/topk": lambda: case_no_tokens(env, "topk"),
        "edge/no_tokens/fused": lambda: case_no_tokens(env, "fused"),
        "edge/no_grad": lambda: case_no_grad(env),
    }
