"""Pipeline: teacher → distill → prune → quantize, evaluated after every stage, exported, reported.

    Pipeline(teacher, student, train_data, eval_data, config).run() -> summary dict

train_data is (x, y) or (x, y, y_student) with y_student = -100 on rows whose labels the student
may not use; eval_data is (x, y). Under torchrun the student is trained with DDP (the teacher is
not wrapped: it is frozen), and only rank 0 writes files.
"""
from __future__ import annotations

import copy
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn

from fastdistill.pipeline import checkpoint, losses, measure, repro
from fastdistill.pipeline.config import Config
from fastdistill.pipeline.train import Runtime, Stage, run_stage


class Pipeline:
    def __init__(self, teacher: nn.Module, student: nn.Module, train_data, eval_data, config: Config | None = None,
                 *, resume: bool = False, progress: bool = True):
        self.cfg = config if config is not None else Config()
        if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
            raise TypeError("teacher, student: expected torch.nn.Module instances")
        if len(train_data) not in (2, 3) or len(eval_data) != 2:
            raise ValueError("train_data: expected (x, y) or (x, y, y_student); eval_data: expected (x, y)")
        self.x, self.y = train_data[0], train_data[1]
        self.y_student = train_data[2] if len(train_data) == 3 else train_data[1]
        self.eval_x, self.eval_y = eval_data
        for name, t in (("train_data", self.y), ("train_data[2]", self.y_student), ("eval_data", self.eval_y)):
            if t.dtype != torch.long:
                raise TypeError(f"{name}: labels must be int64, got {t.dtype}")
        if len(self.x) != len(self.y) or len(self.y) != len(self.y_student):
            raise ValueError(f"train_data: inputs and labels differ in length ({len(self.x)}, {len(self.y)}, "
                             f"{len(self.y_student)})")
        self.teacher, self.student = teacher, student
        self.resume, self.progress = resume, progress

    # --- orchestration ---------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        device = self.x.device
        rt = Runtime(seed=cfg.seed, out_dir=cfg.output_dir, device=device, rank=rank, world=world,
                     resume=self.resume, progress=self.progress)
        repro.set_deterministic(cfg.deterministic)
        repro.seed_everything(cfg.seed)
        if rt.main:
            os.makedirs(rt.ckpt_dir, exist_ok=True)
        t_start = time.perf_counter()
        self.manifest = {
            "config": cfg.to_dict(), "seed": cfg.seed, "environment": repro.environment(device, world),
            "data_sha256": {"train": repro.hash_tensors(self.x, self.y, self.y_student),
                            "eval": repro.hash_tensors(self.eval_x, self.eval_y)},
            "stages": {},
        }
        self._check_resume_matches(rt)
        self.rt, self.stages = rt, []

        self._teacher_stage()
        teacher_metrics = self._measure("teacher", self.teacher)
        initial_student = copy.deepcopy(self.student)
        if cfg.distill is not None and cfg.distill.baseline:
            baseline = copy.deepcopy(initial_student)
            labelled = self.y_student != -100
            xs, ys = self.x[labelled], self.y_student[labelled]
            self._train("baseline", baseline, cfg.distill.epochs, cfg.distill.optim, len(ys),
                        losses.cross_entropy(xs, ys))
            self._measure("baseline", baseline)
        if cfg.distill is not None:
            self._distill_stage("distill", self.student, cfg.distill.epochs, cfg.distill.optim)
            self._measure("distill", self.student)
        if cfg.prune is not None:
            from fastdistill.pipeline.compress import deployable, prune_stage

            prune_stage(self)
            if cfg.quantize is None:  # the pruned student is the result: ship it in sparse storage
                self.student = deployable(self.student)
            self._measure("prune", self.student if cfg.quantize is None else deployable(self.student))
        if cfg.quantize is not None:
            from fastdistill.pipeline.compress import quantize_stage

            quantize_stage(self)
            self._measure("quantize", self.student)
        summary = self._summary(teacher_metrics, time.perf_counter() - t_start)
        if rt.main:
            if cfg.export:
                self._export()
            checkpoint.atomic_write_json(os.path.join(cfg.output_dir, "manifest.json"), self.manifest)
            from fastdistill.pipeline.report import write_report

            write_report(cfg.output_dir, summary)
        rt.barrier()
        return summary

    # --- stages ----------------------------------------------------------------------------------
    def _teacher_stage(self):
        tc = self.cfg.teacher
        if tc.checkpoint is not None:
            from safetensors.torch import load_file

            try:
                state = load_file(tc.checkpoint)
            except Exception as e:  # OSError, or safetensors' own error types for a corrupt file
                raise checkpoint.CheckpointError(f"teacher.checkpoint: cannot load {tc.checkpoint}: {e}") from None
            try:
                self.teacher.load_state_dict(state)
            except RuntimeError as e:  # torch's message spans lines: keep the first problem, on one line
                detail = " ".join(str(e).split())
                raise checkpoint.CheckpointError(f"teacher.checkpoint: {tc.checkpoint} does not fit the teacher "
                                                 f"model: {detail[:400]}") from None
        elif tc.epochs > 0:
            self._train("teacher", self.teacher, tc.epochs, tc.optim, len(self.y), losses.cross_entropy(self.x, self.y))
        self.teacher.eval().requires_grad_(False)

    def _distill_stage(self, name, student, epochs, optim, after_step=None, extra_state=None, load_extra=None):
        dc = self.cfg.distill
        if dc is None:  # prune/quantize recovery without a distill stage still distills, with the defaults
            from fastdistill.pipeline.config import Distill

            dc = Distill()
        proj = losses.make_projections(dc, student, self.teacher, self.x, repro.derive_seed(self.cfg.seed, name))
        loss_fn = losses.distillation(dc, self.teacher, student, proj, self.x, self.y_student)
        try:
            self._train(name, student, epochs, optim, len(self.y), loss_fn, proj, after_step, extra_state,
                        load_extra)
        finally:
            loss_fn.close()

    def _train(self, name, model, epochs, optim, n_rows, loss_fn, extras=None, after_step=None, extra_state=None,
               load_extra=None):
        bs = self.cfg.data.eval_batch_size
        stage = Stage(name=name, epochs=epochs, optim=optim, n_rows=n_rows, loss_fn=loss_fn,
                      eval_fn=lambda: measure.evaluate(model, self.eval_x, self.eval_y, bs),
                      after_step=after_step, extra_state=extra_state, load_extra_state=load_extra)
        record = run_stage(self.rt, stage, model, extras)
        self.stages.append({"stage": name, **record})
        return record

    def _measure(self, name, model) -> dict:
        ev = self.cfg.evaluate
        metrics = measure.evaluate(model, self.eval_x, self.eval_y, self.cfg.data.eval_batch_size)
        metrics.update(size_bytes=measure.size_on_disk(model),
                       latency_ms=measure.latency_ms(model, self.eval_x[:ev.latency_batch_size], ev.latency_repeats),
                       params=sum(p.numel() for p in model.parameters()),
                       weights_sha256=repro.hash_state(model.state_dict()), weight_stats=measure.weight_stats(model))
        self.manifest["stages"][name] = {k: metrics[k] for k in ("weights_sha256", "accuracy", "loss", "size_bytes")}
        self.stages.append({"stage": name, "metrics": metrics})
        return metrics

    # --- outputs ---------------------------------------------------------------------------------
    def _summary(self, teacher_metrics: dict, seconds: float) -> dict:
        evaluated = {s["stage"]: s["metrics"] for s in self.stages if "metrics" in s}
        histories = {s["stage"]: s["history"] for s in self.stages if "history" in s}
        order = [s for s in ("teacher", "baseline", "distill", "prune", "quantize") if s in evaluated]
        rows, previous = [], None
        for name in order:
            m = evaluated[name]
            row = {"stage": name, "accuracy": m["accuracy"], "loss": m["loss"], "size_bytes": m["size_bytes"],
                   "latency_ms": m["latency_ms"], "params": m["params"], "weights_sha256": m["weights_sha256"],
                   "delta_vs_teacher": m["accuracy"] - teacher_metrics["accuracy"],
                   "delta_vs_previous": None if previous is None else m["accuracy"] - evaluated[previous]["accuracy"],
                   "size_ratio_vs_teacher": teacher_metrics["size_bytes"] / max(m["size_bytes"], 1)}
            rows.append(row)
            if name != "baseline":
                previous = name
        return {"stages": rows, "histories": histories,
                "weight_stats": {n: evaluated[n]["weight_stats"] for n in order},
                "skipped_steps": {s["stage"]: s["skipped_steps"] for s in self.stages if "skipped_steps" in s},
                "events": self.rt.events, "seconds": seconds, "output_dir": self.cfg.output_dir,
                "final_weights_sha256": rows[-1]["weights_sha256"] if rows else None}

    def _export(self):
        out = os.path.join(self.cfg.output_dir, "export")
        os.makedirs(out, exist_ok=True)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.student.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        checkpoint.atomic_save_safetensors(os.path.join(out, "student.safetensors"), state)
        modules = {n: type(m).__name__ for n, m in self.student.named_modules() if n}
        checkpoint.atomic_write_json(os.path.join(out, "manifest.json"), {
            "weights_sha256": repro.hash_state(state), "modules": modules, "config": self.cfg.to_dict(),
            "environment": self.manifest["environment"]})

    def _check_resume_matches(self, rt: Runtime):
        """--resume continues only the same run: same resolved config, the same data, the same process count.
        run.json holds that identity; checkpoints carry its hash (rt.run_id) and are refused without it."""
        path = os.path.join(rt.ckpt_dir, "run.json")
        identity = {"config": self.manifest["config"], "data_sha256": self.manifest["data_sha256"], "world": rt.world}
        identity = json.loads(json.dumps(identity))  # as run.json will read back
        rt.run_id = checkpoint.json_sha256(identity)
        if rt.resume:
            if os.path.exists(path):
                saved = _read_identity(path)
                if saved != identity:
                    raise checkpoint.CheckpointError(
                        f"--resume: {rt.out_dir} holds a run with another config, data or process count; "
                        f"use another output_dir or drop --resume")
            elif _has_checkpoints(rt.ckpt_dir):
                raise checkpoint.CheckpointError(
                    f"--resume: {path} is missing, so the checkpoints in {rt.ckpt_dir} cannot be matched to this "
                    f"config and data; drop --resume to start over (this deletes them)")
        if rt.main:
            for directory in (rt.out_dir, rt.ckpt_dir, os.path.join(rt.out_dir, "export")):
                checkpoint.remove_stale_tmp(directory)  # left by a run killed mid-write
            if not rt.resume and os.path.isdir(rt.ckpt_dir):
                import shutil

                shutil.rmtree(rt.ckpt_dir)  # a fresh run: stale checkpoints must not be picked up later
            os.makedirs(rt.ckpt_dir, exist_ok=True)
            checkpoint.atomic_write_json(path, identity)
        rt.barrier()


def _read_identity(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise checkpoint.CheckpointError(f"--resume: {path} is unreadable ({e}); drop --resume to start over") from None
    if not isinstance(saved, dict) or set(saved) != {"config", "data_sha256", "world"}:
        raise checkpoint.CheckpointError(f"--resume: {path} is not a fastdistill run identity (keys config, "
                                         f"data_sha256, world); drop --resume to start over")
    return saved


def _has_checkpoints(directory: str) -> bool:
    return os.path.isdir(directory) and any(n.endswith((".json", ".safetensors")) for n in os.listdir(directory))
