"""Distil a tiny causal transformer LM into a smaller one with fastdistill — no downloads, CPU is fine.

Two ways, both from README's "Distilling LLMs":
  online   the teacher runs next to the student; FusedLinearDistillLoss takes both models' last hidden
           states and lm_head weights, so no [tokens, vocab] logits tensor is ever materialized;
  offline  the teacher's top-k log-probabilities are written once to a TeacherCache, and the student
           trains from the cache with topk_distill_loss (the teacher is not needed any more).

    python examples/distill_tiny_lm.py [--steps 60] [--mode online offline]

The teacher is randomly initialised (with a sharpened head so that its next-token distributions are
informative); the printed KL(teacher || student) on held-out sequences is what distillation lowers.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from torch import nn

import fastdistill


class TinyLM(nn.Module):
    """Token + position embeddings, pre-norm causal transformer blocks, final norm, lm_head."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, max_len: int = 64, head_scale: float = 1.0):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        with torch.no_grad():
            self.lm_head.weight.mul_(head_scale)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        x = self.embed(ids) + self.pos(torch.arange(n, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=ids.device)
        return self.norm(self.blocks(x, mask=mask, is_causal=True))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(ids))


@torch.no_grad()
def heldout_kl(teacher: TinyLM, student: TinyLM, ids: torch.Tensor) -> float:
    """Mean per-token KL(teacher || student) on held-out sequences (full vocabulary)."""
    return fastdistill.distill_loss(student(ids), teacher(ids), backend="reference").item()


def distill_online(teacher, student, data, steps, batch):
    """Fused linear + KL: the loss sees hidden states and lm_head weights, never full logits."""
    loss_fn = fastdistill.FusedLinearDistillLoss(divergence="kl", temperature=1.0)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    for step in range(steps):
        ids = data[(step * batch) % len(data):][:batch]
        with torch.no_grad():
            teacher_h = teacher.hidden(ids)
        loss = loss_fn(student.hidden(ids), student.lm_head.weight, teacher_h, teacher.lm_head.weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def distill_offline(teacher, student, data, steps, batch, k):
    """Top-k teacher log-probabilities cached once, then topk_distill_loss with the rest-bucket tail."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = fastdistill.TeacherCache.build(tmp, teacher, list(data), k=k, batch_size=batch, progress=False)
        print(f"  cache: {cache.summary()}")
        opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
        for step in range(steps):
            items = [cache[(step * batch + i) % len(cache)] for i in range(batch)]
            ids = torch.stack([it["input_ids"] for it in items])
            logprobs = torch.stack([it["topk_logprobs"] for it in items]).float()
            indices = torch.stack([it["topk_indices"] for it in items])
            loss = fastdistill.topk_distill_loss(student(ids), logprobs, indices, tail="bucket")
            opt.zero_grad()
            loss.backward()
            opt.step()
    return loss.item()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--mode", nargs="+", default=["online", "offline"], choices=["online", "offline"])
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--k", type=int, default=32)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    vocab, seq, batch = args.vocab, 32, 16
    teacher = TinyLM(vocab, dim=128, layers=4, heads=4, head_scale=8.0).eval()
    data = torch.randint(0, vocab, (256, seq))
    heldout = torch.randint(0, vocab, (32, seq))
    results = {}
    for mode in args.mode:
        torch.manual_seed(1)  # the same student initialisation for both modes
        student = TinyLM(vocab, dim=48, layers=2, heads=4)
        before = heldout_kl(teacher, student, heldout)
        if mode == "online":
            distill_online(teacher, student, data, args.steps, batch)
        else:
            distill_offline(teacher, student, data, args.steps, batch, args.k)
        after = heldout_kl(teacher, student, heldout)
        results[mode] = (before, after)
        print(f"{mode:>7}: held-out KL(teacher || student) {before:.3f} -> {after:.3f} after {args.steps} steps")
    return results


if __name__ == "__main__":
    main()
