"""Distil a Hugging Face Llama-architecture teacher into a smaller HF student with fastdistill's
DistillationTrainer (a transformers.Trainer whose loss never materializes [tokens, vocab] logits).

With no arguments it needs no download: the text is Python's own standard-library sources read as
bytes (vocabulary: 256 bytes + BOS/EOS/PAD), a small Llama teacher is first trained briefly on
them with the plain HF Trainer, then a smaller Llama student is distilled from it. Printed: held-out
perplexity (per byte) of teacher and student, and the student's KL(teacher || student) per token,
before and after distillation.

    python examples/distill_hf_causal_lm.py                      # about 2-3 minutes on a 2-core CPU
    python examples/distill_hf_causal_lm.py --teacher-steps 30 --steps 30 --seq 32   # seconds
    python examples/distill_hf_causal_lm.py --teacher PATH --student PATH [--tokenizer PATH]

With --teacher and --student (local checkpoints, e.g. from save_pretrained or the HF cache; loaded
with local_files_only) the teacher is used as it is and the text is tokenized with --tokenizer
(default: the student's directory). Both models must use the same tokenizer; if one vocabulary is
longer (padding rows), the loss gives the missing entries probability 0.
"""
from __future__ import annotations

import argparse
import math
import os
import sysconfig
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

BYTE_VOCAB, BOS, EOS, PAD = 259, 256, 257, 258


def stdlib_bytes(n_bytes: int) -> bytes:
    """The first n_bytes of the standard library's .py files (sorted paths, EOS between files)."""
    root = sysconfig.get_paths()["stdlib"]
    out, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(dirpath, name), "rb") as f:
                data = f.read()
            out.append(data)
            total += len(data) + 1
            if total >= n_bytes:
                return b"\x00".join(out)[:n_bytes]
    if total < n_bytes // 2:
        raise RuntimeError(f"only {total} bytes of Python sources under {root}; pass --teacher/--student and text")
    return b"\x00".join(out)


def byte_tokens(n_tokens: int) -> torch.Tensor:
    """Byte ids of the stdlib sources, a file's NUL separator mapped to EOS."""
    ids = torch.frombuffer(bytearray(stdlib_bytes(n_tokens)), dtype=torch.uint8).long()
    return ids.masked_fill(ids == 0, EOS)


def text_tokens(tokenizer, n_tokens: int) -> torch.Tensor:
    """The stdlib sources tokenized with a pretrained tokenizer (about 3 bytes per token read)."""
    text = stdlib_bytes(4 * n_tokens).decode("utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


def windows(tokens: torch.Tensor, count: int, seq: int, seed: int, bos) -> list[dict]:
    """`count` random windows of `seq` tokens (BOS first when there is one); labels = input_ids."""
    g = torch.Generator().manual_seed(seed)
    body = seq - (bos is not None)
    starts = torch.randint(0, len(tokens) - body, (count,), generator=g)
    out = []
    for s in starts.tolist():
        ids = tokens[s:s + body]
        if bos is not None:
            ids = torch.cat([torch.tensor([bos]), ids])
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def llama(hidden: int, layers: int, vocab: int, seq: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, hidden // 32)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq, bos_token_id=BOS,
        eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False))


@torch.no_grad()
def heldout(student, teacher, data: list[dict], batch: int) -> dict:
    """Student perplexity (exp of the mean next-token cross-entropy) and mean per-token KL(teacher || student)
    on held-out windows; the KL comes from the fused loss, so no [tokens, vocab] tensor is built for it."""
    from fastdistill.hf import causal_lm_distill_loss

    student.eval()
    nll = kl = 0.0
    for i in range(0, len(data), batch):
        ids = torch.stack([d["input_ids"] for d in data[i:i + batch]]).to(student.device)
        n = ids.numel() - ids.shape[0]  # next-token targets in this batch
        nll += student(input_ids=ids, labels=ids).loss.item() * n
        kl += causal_lm_distill_loss(student, teacher, ids).item() * n
    total = sum(d["input_ids"].numel() - 1 for d in data)
    return {"ppl": math.exp(nll / total), "kl": kl / total}


@torch.no_grad()
def perplexity(model, data: list[dict], batch: int) -> float:
    model.eval()
    nll = 0.0
    for i in range(0, len(data), batch):
        ids = torch.stack([d["input_ids"] for d in data[i:i + batch]]).to(model.device)
        nll += model(input_ids=ids, labels=ids).loss.item() * (ids.numel() - ids.shape[0])
    return math.exp(nll / sum(d["input_ids"].numel() - 1 for d in data))


def training_args(out: str, steps: int, batch: int, lr: float, seed: int, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                             lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0,
                             logging_steps=max(1, steps // 5), save_strategy="no", report_to=[], seed=seed,
                             disable_tqdm=True, dataloader_num_workers=0,
                             dataloader_pin_memory=torch.cuda.is_available(), **kw)


def load_pretrained(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, local_files_only=True)
    student = AutoModelForCausalLM.from_pretrained(args.student, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.student, local_files_only=True)
    return teacher, student, tokenizer


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="local checkpoint of a pretrained teacher (skips training one)")
    p.add_argument("--student", help="local checkpoint of the student to distil (with --teacher)")
    p.add_argument("--tokenizer", help="tokenizer directory for --teacher/--student (default: --student)")
    p.add_argument("--teacher-steps", type=int, default=400, help="steps of training the byte-level teacher")
    p.add_argument("--steps", type=int, default=400, help="distillation steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows of --seq tokens")
    p.add_argument("--teacher-hidden", type=int, default=128)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--student-hidden", type=int, default=64)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--divergence", default="kl")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--hard-weight", type=float, default=0.0, help="weight of the next-token cross-entropy")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--output-dir", help="Trainer output directory (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if (args.teacher is None) != (args.student is None):
        p.error("--teacher and --student go together")

    from fastdistill.hf import DistillationTrainer
    from transformers import Trainer

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    n_train = max(args.teacher_steps, args.steps) * args.batch * args.seq + 4 * args.seq
    n_eval = args.eval_windows * args.seq
    if args.teacher:
        teacher, student, tokenizer = load_pretrained(args)
        tokens, bos = text_tokens(tokenizer, n_train + n_eval), tokenizer.bos_token_id
        source = f"{len(tokens)} tokens of Python stdlib sources ({type(tokenizer).__name__})"
    else:
        tokens, bos = byte_tokens(n_train + n_eval), BOS
        source = f"{len(tokens)} bytes of Python stdlib sources"
    train_tokens, eval_tokens = tokens[:-n_eval], tokens[-n_eval:]  # held-out: text the models never see
    eval_data = windows(eval_tokens, args.eval_windows, args.seq, seed=1, bos=bos)
    print(f"data: {source}; held out: {args.eval_windows} windows of {args.seq}")
    out_dir = args.output_dir or tempfile.mkdtemp(prefix="distill_hf_")

    if not args.teacher:
        teacher = llama(args.teacher_hidden, args.teacher_layers, BYTE_VOCAB, args.seq, seed=args.seed)
        student = llama(args.student_hidden, args.student_layers, BYTE_VOCAB, args.seq, seed=args.seed + 1)
        data = windows(train_tokens, args.teacher_steps * args.batch, args.seq, seed=2, bos=bos)
        t = time.perf_counter()
        Trainer(model=teacher, train_dataset=data, args=training_args(
            os.path.join(out_dir, "teacher"), args.teacher_steps, args.batch, args.lr, args.seed)).train()
        print(f"teacher: {sum(q.numel() for q in teacher.parameters()) / 1e6:.2f} M parameters, "
              f"{args.teacher_steps} steps of next-token training in {time.perf_counter() - t:.0f} s")
    teacher.eval()
    n_s = sum(q.numel() for q in student.parameters()) / 1e6
    results = {"teacher_ppl": perplexity(teacher, eval_data, args.batch),
               "before": heldout(student, teacher, eval_data, args.batch)}
    print(f"held-out teacher perplexity {results['teacher_ppl']:.3f}")
    print(f"student ({n_s:.2f} M parameters) before: perplexity {results['before']['ppl']:.3f}, "
          f"KL(teacher || student) {results['before']['kl']:.4f}")

    data = windows(train_tokens, args.steps * args.batch, args.seq, seed=3, bos=bos)
    t = time.perf_counter()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=data,
        args=training_args(os.path.join(out_dir, "student"), args.steps, args.batch, args.lr, args.seed),
        divergence=args.divergence, temperature=args.temperature, hard_weight=args.hard_weight)
    trainer.train()
    results["distill_seconds"] = time.perf_counter() - t
    results["after"] = heldout(student, teacher, eval_data, args.batch)
    print(f"student after {args.steps} distillation steps ({results['distill_seconds']:.0f} s): perplexity "
          f"{results['after']['ppl']:.3f}, KL(teacher || student) {results['after']['kl']:.4f}")
    results["seconds"] = time.perf_counter() - t0
    print(f"total {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
