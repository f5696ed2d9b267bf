"""DistillationTrainer: a transformers.Trainer that trains the student on fastdistill's fused loss.

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                                  train_dataset=..., divergence="kl", temperature=2.0)
    trainer.train()

compute_loss is causal_lm_distill_loss (no [tokens, V] logits of either model). How it fits what
Trainer does around the loss:
- gradient accumulation: get_batch_samples counts the target tokens of all micro-batches of one
  optimizer step exactly as the loss masks them (shift, padding, ignore_index), and each micro-batch
  loss is divided by that count, so the accumulated gradient equals the one of the large batch;
- DDP (torchrun): with args.average_tokens_across_devices (Trainer's default) the count is summed
  over the processes and the loss multiplied by their number (DDP averages gradients), so the
  result equals one process on the global batch; otherwise each process normalizes by its own count;
- mixed precision (bf16/fp16): the whole loss runs under the accelerator's autocast, so both models
  compute in the autocast dtype and the fused loss takes their hidden states and heads in it;
- evaluation: eval_loss is the distillation loss; prediction_step returns no logits (they are never
  computed), so compute_metrics does not run;
- checkpoints: only the student is saved; the teacher is an attribute of the trainer, never a
  submodule of the student, so neither checkpoints nor the optimizer state hold it.
The teacher is moved to args.device when Trainer places the student there (not under FSDP, DeepSpeed
or model parallelism, nor when it was loaded with a device_map); its dtype is never changed (a bf16
teacher for an fp32 student is allowed).
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn
from transformers import Trainer

from fastdistill.hf.loss import causal_lm_distill_loss, shift_labels
from fastdistill.nn.fused_linear_distill_loss import FusedLinearDistillLoss

# Keyword options of FusedLinearDistillLoss that DistillationTrainer(...) accepts directly.
DISTILL_OPTIONS = frozenset(inspect.signature(FusedLinearDistillLoss.__init__).parameters) - {"self"}
_BATCH_KEYS = ("input_ids", "attention_mask", "labels")


def _distill_loss(distill_loss, options: dict) -> FusedLinearDistillLoss:
    if distill_loss is not None and options:
        raise ValueError(f"distill_loss: given together with the options {sorted(options)}; pass one or the other")
    if distill_loss is None:
        distill_loss = FusedLinearDistillLoss(**options)
    elif isinstance(distill_loss, dict):
        unknown = sorted(set(distill_loss) - DISTILL_OPTIONS)
        if unknown:
            raise ValueError(f"distill_loss: unknown options {unknown}; known: {sorted(DISTILL_OPTIONS)}")
        distill_loss = FusedLinearDistillLoss(**distill_loss)
    elif not isinstance(distill_loss, FusedLinearDistillLoss):
        raise TypeError(f"distill_loss: expected a fastdistill.FusedLinearDistillLoss, a dict of its options or "
                        f"None, got {type(distill_loss).__name__}")
    if distill_loss.options["reduction"] != "batchmean":
        raise ValueError(f"distill_loss: reduction must be 'batchmean' (the trainer divides by the token count of "
                         f"the accumulated batch), got {distill_loss.options['reduction']!r}")
    if distill_loss.options["num_items"] is not None:
        raise ValueError("distill_loss: num_items must be None; the trainer passes the token count of each "
                         "accumulated batch")
    return distill_loss


class DistillationTrainer(Trainer):
    """transformers.Trainer whose loss is fastdistill.hf.causal_lm_distill_loss(student, teacher, ...).

    `model` is the student (trained, saved); `teacher_model` any transformers *ForCausalLM (never
    trained, never saved). The distillation is configured by `distill_loss` (a
    fastdistill.FusedLinearDistillLoss or a dict of its options) or by those options as keywords
    (`divergence="jsd", beta=0.5, temperature=2.0, hard_weight=0.5, ...`); default: forward KL.
    logit_scale and softcap are read from each model's config, not given here. Batches hold input_ids,
    optionally attention_mask and labels (unshifted, like HF's; -100 ignored): labels are the hard
    targets when hard_weight > 0 (DataCollatorForLanguageModeling(mlm=False) makes them) and also
    mask positions out of the soft loss; without labels every non-padding next token is a target.
    Other batch entries go to both models' forwards.
    """

    # compute_loss divides by the target count of the whole accumulated batch (get_batch_samples).
    loss_is_scaled_for_ga = True

    def __init__(self, model: Optional[nn.Module] = None, args=None, *, teacher_model: Optional[nn.Module] = None,
                 distill_loss=None, **kwargs: Any):
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in DISTILL_OPTIONS}
        if not isinstance(teacher_model, nn.Module):
            raise TypeError(f"teacher_model: expected the teacher (a torch.nn.Module, e.g. a transformers "
                            f"*ForCausalLM), got {type(teacher_model).__name__}")
        if teacher_model is model:
            raise ValueError("teacher_model: is the student model itself; pass a separate teacher")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func: DistillationTrainer computes the distillation loss itself; "
                             "configure it with distill_loss or its options")
        self.distill_loss = _distill_loss(distill_loss, options)
        super().__init__(model, args, **kwargs)
        if self.args.label_smoothing_factor != 0:
            raise ValueError(f"args.label_smoothing_factor: not used by the distillation loss, got "
                             f"{self.args.label_smoothing_factor}; leave it at 0")
        if self.args.n_gpu > 1:
            raise ValueError(f"args.n_gpu: {self.args.n_gpu} GPUs in one process (torch.nn.DataParallel) is not "
                             f"supported; launch one process per GPU with torchrun")
        if self.place_model_on_device and getattr(teacher_model, "hf_device_map", None) is None:
            teacher_model = teacher_model.to(self.args.device)  # where Trainer puts the student; dtype unchanged
        self.teacher_model = teacher_model

    def _target_count(self, batch: dict) -> torch.Tensor:
        """The number of positions causal_lm_distill_loss counts in one micro-batch."""
        ids = batch["input_ids"]
        labels = batch.get("labels")
        targets = shift_labels(ids if labels is None else labels, batch.get("attention_mask"),
                               int(self.distill_loss.options["ignore_index"]))
        return (targets != self.distill_loss.options["ignore_index"]).sum()

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The micro-batches of one optimizer step and their total target count (global under
        average_tokens_across_devices), counted with the loss's own masking rule."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batch_samples or not all(isinstance(b, Mapping) and "input_ids" in b for b in batch_samples):
            return batch_samples, None  # compute_loss raises on a batch without input_ids
        count = sum(self._target_count(b).to(device) for b in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return batch_samples, count

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch=None):
        inputs = dict(inputs)
        input_ids, attention_mask, labels = (inputs.pop(k, None) for k in _BATCH_KEYS)
        if input_ids is None:
            raise ValueError(f"inputs: the batch has no input_ids (keys: {sorted(inputs)})")
        with self.accelerator.autocast():
            loss = causal_lm_distill_loss(model, self.teacher_model, input_ids, attention_mask, labels,
                                          loss=self.distill_loss, num_items=num_items_in_batch, **inputs)
        if (num_items_in_batch is not None and self.args.average_tokens_across_devices
                and self.accelerator.num_processes > 1):
            loss = loss * self.accelerator.num_processes  # the count is global; DDP averages the gradients
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model: nn.Module, inputs: dict, prediction_loss_only: bool,
                        ignore_keys: Optional[list] = None):
        """(distillation loss of the batch, None, None): no logits are ever computed."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
