"""`fastdistill demo`: a real, small distillation on scikit-learn's bundled digits (no download).

Trains a teacher MLP on labelled digits, then the same small student twice from the same
initialisation, in the usual distillation setting where labels are scarce but inputs are not:
  - baseline: cross-entropy on the few labelled examples it has;
  - distilled: DistillLoss on the teacher's whole training set (the teacher's soft targets need no
    labels), plus cross-entropy on the same labelled examples.
Reports the three test accuracies and the time taken. Deterministic: fixed seeds and data order.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

import fastdistill


@dataclass
class DemoConfig:
    seed: int = 0
    train_fraction: float = 0.1  # share of the teacher's training inputs the student has labels for
    teacher_hidden: int = 512
    student_hidden: int = 24
    teacher_epochs: int = 40
    student_epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3
    temperature: float = 4.0
    soft_weight: float = 1.0
    hard_weight: float = 0.5


def load_digits(seed: int, train_fraction: float):
    """Digits as float tensors, split into teacher-train / student-train / test."""
    from sklearn.datasets import load_digits as sk_digits  # bundled with scikit-learn: no download

    x, y = sk_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = len(y) // 4
    test = (x[:n_test], y[:n_test])
    x_tr, y_tr = x[n_test:], y[n_test:]
    n_student = int(len(y_tr) * train_fraction)
    return (x_tr, y_tr), (x_tr[:n_student], y_tr[:n_student]), test


def mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def accuracy(model: nn.Module, data) -> float:
    model.eval()
    with torch.no_grad():
        return (model(data[0]).argmax(-1) == data[1]).float().mean().item()


def train(model, data, epochs, cfg: DemoConfig, loss_fn) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x, y = data
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=gen).split(cfg.batch_size):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), idx).backward()
            opt.step()


def run_demo(cfg: DemoConfig | None = None) -> dict:
    cfg = cfg or DemoConfig()
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    teacher_data, student_data, test = load_digits(cfg.seed, cfg.train_fraction)
    ce = nn.CrossEntropyLoss()

    teacher = mlp(cfg.teacher_hidden, cfg.seed)
    train(teacher, teacher_data, cfg.teacher_epochs, cfg, lambda out, idx: ce(out, teacher_data[1][idx]))
    teacher.eval()
    with torch.no_grad():
        teacher_logits = teacher(teacher_data[0])

    baseline = mlp(cfg.student_hidden, cfg.seed + 2)
    train(baseline, student_data, cfg.student_epochs, cfg, lambda out, idx: ce(out, student_data[1][idx]))

    # The student's labelled examples are the first len(student_data) of the teacher's inputs.
    n_labelled = len(student_data[1])
    distilled = mlp(cfg.student_hidden, cfg.seed + 2)  # same initialisation as the baseline
    soft = fastdistill.DistillLoss(temperature=cfg.temperature, soft_weight=cfg.soft_weight)
    hard = nn.CrossEntropyLoss(reduction="sum")

    def distill_step(out, idx):
        labelled = idx < n_labelled
        return soft(out, teacher_logits[idx]) + cfg.hard_weight * hard(
            out[labelled], teacher_data[1][idx[labelled]]) / len(idx)

    train(distilled, teacher_data, cfg.student_epochs, cfg, distill_step)

    backend = fastdistill.dispatch.select("distill_loss", "auto", torch.device("cpu"), (torch.float32,))
    return {
        "teacher_accuracy": accuracy(teacher, test),
        "student_accuracy": accuracy(baseline, test),
        "distilled_student_accuracy": accuracy(distilled, test),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in distilled.parameters()),
        "train_examples": {"teacher": len(teacher_data[1]), "student": len(student_data[1]), "test": len(test[1])},
        "backend": backend,
        "seconds": time.perf_counter() - start,
        "config": asdict(cfg),
    }


def format_report(r: dict) -> str:
    n = r["train_examples"]
    return "\n".join([
        "fastdistill demo: digits (scikit-learn, bundled), distill_loss backend "
        f"'{r['backend']}'",
        f"  teacher   MLP {r['teacher_params']:>7,d} params, {n['teacher']} train examples: "
        f"test accuracy {r['teacher_accuracy']:.2%}",
        f"  student   MLP {r['student_params']:>7,d} params, {n['student']} train examples, labels only: "
        f"test accuracy {r['student_accuracy']:.2%}",
        f"  student   MLP {r['student_params']:>7,d} params, same labels + DistillLoss on the teacher's "
        f"{n['teacher']} inputs: test accuracy {r['distilled_student_accuracy']:.2%}",
        f"  distillation gain: {100 * (r['distilled_student_accuracy'] - r['student_accuracy']):+.2f} points "
        f"on {n['test']} test digits; total time {r['seconds']:.1f} s",
    ])
