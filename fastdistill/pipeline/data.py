"""The built-in dataset and models, and the deterministic, rank-aware batch order.

Datasets are pairs of tensors (inputs [n, ...], labels [n] int64; label -100 = unlabelled for the
student). Batches are global: every epoch draws one permutation from (seed, stage, epoch), cuts it
into global batches of `batch_size`, and rank r of w takes positions r, r + w, ... of each batch, so
N processes see exactly the rows one process would, in the same global steps.
"""
from __future__ import annotations

import torch
from torch import nn

from fastdistill.pipeline.repro import derive_seed

UNLABELLED = -100


def load_digits(seed: int, test_fraction: float, label_fraction: float):
    """scikit-learn's bundled 8x8 digits (no download) as (train, test), with the student's labels
    kept for the first `label_fraction` of the (shuffled) training rows and -100 elsewhere.
    Returns (x_train, y_train, y_train_student), (x_test, y_test)."""
    from sklearn.datasets import load_digits as sk_digits

    x, y = sk_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(derive_seed(seed, "split")))
    x, y = x[order], y[order]
    n_test = int(round(len(y) * test_fraction))
    x_tr, y_tr = x[n_test:], y[n_test:]
    y_student = y_tr.clone()
    y_student[int(round(len(y_tr) * label_fraction)):] = UNLABELLED
    return (x_tr, y_tr, y_student), (x[:n_test], y[:n_test])


class MLP(nn.Sequential):
    """Linear-ReLU blocks and a linear head; modules named body.0, body.2, ..., head."""

    def __init__(self, in_features: int, hidden: list[int], classes: int):
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        super().__init__()
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)


def make_mlp(in_features: int, hidden: list[int], classes: int, seed: int) -> MLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(in_features, hidden, classes)


def global_batches(n: int, batch_size: int, seed: int, stage: str, epoch: int) -> list[torch.Tensor]:
    """The epoch's global batches: a permutation of range(n) from (seed, stage, epoch), cut in order."""
    gen = torch.Generator().manual_seed(derive_seed(seed, stage, epoch))
    return list(torch.randperm(n, generator=gen).split(batch_size))


def local_rows(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return batch[rank::world]
