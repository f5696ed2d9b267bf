"""One training stage: deterministic epochs, DDP, guards against non-finite steps, per-epoch checkpoints.

The loss function returns the sum of its rows' losses divided by the GLOBAL number of rows in the
step (`num_items`), so the rank losses add up to the single-process loss; DDP averages gradients
over ranks, so the loss is multiplied by the world size before backward to make that average a sum.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from fastdistill.pipeline import checkpoint
from fastdistill.pipeline.config import Optim
from fastdistill.pipeline.data import global_batches, local_rows
from fastdistill.pipeline.repro import derive_seed


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class Runtime:
    """What every stage needs to know about the run it is part of."""
    seed: int
    out_dir: str
    device: torch.device
    rank: int = 0
    world: int = 1
    resume: bool = False
    progress: bool = True
    run_id: str | None = None  # sha256 of the run identity (config, data, world): checkpoints carry it
    events: list = field(default_factory=list)  # human-readable notes for the report (skipped steps, ...)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.out_dir, "checkpoints")

    def barrier(self):
        if self.world > 1:
            dist.barrier()


class Trainable(nn.Module):
    """The student plus the stage's extra trainable modules (hidden-state projections): one DDP unit."""

    def __init__(self, student: nn.Module, extras: nn.ModuleDict):
        super().__init__()
        self.student, self.extras = student, extras

    def forward(self, x):
        return self.student(x)


# loss_fn(forward, rows, n_global) -> loss of these rows, already divided by n_global
LossFn = Callable[[Callable, torch.Tensor, int], torch.Tensor]


@dataclass
class Stage:
    name: str
    epochs: int
    optim: Optim
    n_rows: int  # rows of the training set
    loss_fn: LossFn
    eval_fn: Callable[[], dict]  # {"loss": ..., "accuracy": ...} on the eval set, after each epoch
    after_step: Callable[[int], None] | None = None  # called with the global step after optimizer.step()
    extra_state: Callable[[], tuple[dict, dict]] | None = None  # stage state beyond weights + optimizer
    load_extra_state: Callable[[dict, dict], None] | None = None


def _reduce_sum(rt: Runtime, value: torch.Tensor) -> torch.Tensor:
    if rt.world > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def run_stage(rt: Runtime, stage: Stage, student: nn.Module, extras: nn.ModuleDict | None = None) -> dict:
    """Trains (or, on resume, finishes training) `student` for one stage; returns the stage record:
    {"history": [{"epoch", "train_loss", "loss", "accuracy", "skipped"}...], "skipped_steps": n}."""
    extras = extras if extras is not None else nn.ModuleDict()
    unit = Trainable(student, extras)
    params = [p for p in unit.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.optim.lr, weight_decay=stage.optim.weight_decay)
    final, last = f"{stage.name}.final", f"{stage.name}.last"
    record = {"history": [], "skipped_steps": 0}
    start = 0
    for name in (final, last):
        if rt.resume and checkpoint.exists(rt.ckpt_dir, name):
            tensors, meta = checkpoint.load(rt.ckpt_dir, name, rt.run_id)
            _load_unit(unit, tensors)
            checkpoint.unflatten_optimizer(opt, tensors, meta["optimizer"])
            if stage.load_extra_state is not None:
                stage.load_extra_state(tensors, meta.get("extra", {}))
            record, start = meta["record"], meta["epoch"] + 1
            if name == final:
                return record
            break

    model = unit
    if rt.world > 1:
        model = nn.parallel.DistributedDataParallel(unit, device_ids=[rt.device.index] if rt.device.type == "cuda"
                                                    else None)
    steps_per_epoch = math.ceil(stage.n_rows / stage.optim.batch_size)
    epochs, bar = range(start, stage.epochs), None
    if rt.progress and rt.main:  # tqdm is a `pipeline` extra: only needed when bars are shown
        from tqdm import tqdm

        epochs = bar = tqdm(epochs, desc=f"{stage.name:>9s}", initial=start, total=stage.epochs, leave=True,
                            dynamic_ncols=True)
    streak = 0
    for epoch in epochs:
        torch.manual_seed(derive_seed(rt.seed, stage.name, epoch, "torch"))  # dropout etc.: a pure epoch
        unit.train()
        total, skipped = torch.zeros((), dtype=torch.float64), 0
        for i, batch in enumerate(global_batches(stage.n_rows, stage.optim.batch_size, rt.seed, stage.name, epoch)):
            rows = local_rows(batch, rt.rank, rt.world)
            opt.zero_grad(set_to_none=True)
            loss = stage.loss_fn(model, rows, len(batch))
            (loss * rt.world).backward()  # every rank runs backward, even on a NaN loss: DDP needs all of them
            norm = torch.nn.utils.clip_grad_norm_(params, stage.optim.grad_clip or math.inf)
            global_loss = _reduce_sum(rt, loss.detach().double())
            if not (torch.isfinite(norm) and torch.isfinite(global_loss)):  # grads are all-reduced: ranks agree
                skipped, streak = skipped + 1, streak + 1
                rt.events.append(f"{stage.name}: epoch {epoch} step {i}: non-finite loss or gradient, step skipped")
                if streak >= stage.optim.max_nonfinite_steps:
                    raise NonFiniteError(
                        f"{stage.name}: {streak} consecutive steps with a non-finite loss or gradient (epoch "
                        f"{epoch}, step {i}); lower the learning rate, set optim.grad_clip, or check the data")
                continue
            streak = 0
            opt.step()
            total += global_loss.cpu()
            if stage.after_step is not None:
                stage.after_step(epoch * steps_per_epoch + i + 1)
        unit.eval()
        metrics = stage.eval_fn()
        record["history"].append({"epoch": epoch, "train_loss": float(total) / max(steps_per_epoch - skipped, 1),
                                  "skipped": skipped, **metrics})
        record["skipped_steps"] += skipped
        if bar is not None:
            bar.set_postfix(loss=f"{record['history'][-1]['train_loss']:.4f}", acc=f"{metrics['accuracy']:.4f}")
        _save(rt, stage, unit, opt, record, epoch, final if epoch == stage.epochs - 1 else last)
    if stage.epochs == 0 or start >= stage.epochs:
        _save(rt, stage, unit, opt, record, stage.epochs - 1, final)
    return record


def _load_unit(unit: Trainable, tensors: dict) -> None:
    state = {k[len("unit."):]: v for k, v in tensors.items() if k.startswith("unit.")}
    missing, unexpected = unit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise checkpoint.CheckpointError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _save(rt, stage, unit, opt, record, epoch, name):
    if rt.main:
        opt_tensors, skeleton = checkpoint.flatten_optimizer(opt)
        tensors = {f"unit.{k}": v for k, v in unit.state_dict().items() if isinstance(v, torch.Tensor)}
        tensors.update(opt_tensors)
        meta = {"stage": stage.name, "epoch": epoch, "record": record, "optimizer": skeleton, "run_id": rt.run_id}
        if stage.extra_state is not None:
            extra_tensors, meta["extra"] = stage.extra_state()
            tensors.update(extra_tensors)
        checkpoint.save(rt.ckpt_dir, name, tensors, meta)
    rt.barrier()
