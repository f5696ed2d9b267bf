"""Run by tests/hf/test_fsdp2.py under torchrun (2 gloo ranks on CPU): every case trains a tiny HF student
3 AdamW steps with causal_lm_distill_loss, sharded (FSDP2 / DDP) on half the batch per rank, and checks
the global loss of each step and the gathered weights against a single-process run on the whole batch."""
import json
import os
import sys

import torch
import torch.distributed as dist

import fastdistill  # noqa: F401  (first, to check what it imports)

IMPORTS = {"fastdistill": [m for m in ("transformers", "trl", "accelerate") if m in sys.modules]}
import fastdistill.hf  # noqa: E402

IMPORTS["fastdistill.hf"] = [m for m in ("transformers", "trl", "accelerate") if m in sys.modules]

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf.tiny_models import batch, tiny_gpt2, tiny_llama  # noqa: E402

from fastdistill.hf import causal_lm_distill_loss, final_hidden_states, shift_labels  # noqa: E402

STEPS, BATCH = 3, 4


def _student(case):
    if case == "tied":  # GPT-2: lm_head tied to the token embedding; no dropout so that runs compare
        return tiny_gpt2(seed=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return tiny_llama(seed=1)


def _shard(case, model, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if case == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    mesh = init_device_mesh("cpu", (world,))
    layers = model.transformer.h if case == "tied" else model.model.layers
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    if case == "head_unit":
        fully_shard(model.lm_head, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train(case, teacher, rank, world):
    """(global loss per step, weights after STEPS steps); world == 0: one process, the whole batch."""
    model = _student(case)
    sharded = world > 0
    student = _shard(case, model, world) if sharded else model
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.01)
    losses = []
    for step in range(STEPS):
        ids, mask = batch(b=BATCH, t=9, seed=100 + step)
        mask[3, 5:] = 0  # a second padded row, on the other rank
        num_items = int((shift_labels(ids, mask, -100) != -100).sum())
        if sharded:
            rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
            ids, mask = ids[rows], mask[rows]
        if sharded and step == 0 and case != "ddp":
            try:  # outside its forward the sharded head weight is unusable: refused, not a wrong loss
                final_hidden_states(student, input_ids=ids, attention_mask=mask)
                raise AssertionError("final_hidden_states accepted an FSDP2 student outside its forward")
            except ValueError as e:
                assert " is sharded with fully_shard and its head weight is only unsharded" in str(e), e
        loss = causal_lm_distill_loss(student, teacher, ids, mask, num_items=num_items)
        # each rank's loss is its share of the global mean; DDP/FSDP average the gradients over ranks
        (loss * (world if sharded else 1)).backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        if sharded:
            dist.all_reduce(total)
        losses.append(total.item())
    weights = {n: _full(p.detach()).clone() for n, p in model.named_parameters()}
    return losses, weights


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    report, refs = {"imports": IMPORTS}, {}
    cases = sys.argv[2].split(",") if len(sys.argv) > 2 else ("layers", "head_unit", "tied", "ddp", "sharded_teacher")
    for case in cases:
        teacher = tiny_llama(seed=7, hidden_size=48)
        kind = "tied" if case == "tied" else "llama"  # the one-process run depends on the student only
        if kind not in refs:
            refs[kind] = _train(case, teacher, rank, 0)
        ref_losses, ref_weights = refs[kind]
        if case == "sharded_teacher":  # a teacher sharded too (no gradients: its head is gathered)
            _shard("layers", teacher, world)
        losses, weights = _train(case, teacher, rank, world)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7,
                                   msg=f"{case}: losses {losses} vs one process {ref_losses}")
        assert weights.keys() == ref_weights.keys(), case
        for name, w in weights.items():
            torch.testing.assert_close(w, ref_weights[name], rtol=1e-4, atol=2e-5,
                                       msg=lambda m, c=case, n=name: f"{c}: {n}: {m}")
        moved = max((ref_weights[n] - w).abs().max().item() for n, w in _student(case).named_parameters())
        assert moved > 1e-3, (case, moved)  # the steps change the weights far beyond the tolerance
        report[case] = {"losses": losses, "max_weight_change": moved}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
