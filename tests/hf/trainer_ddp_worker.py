"""Run by tests/hf/test_trainer_ddp.py under torchrun (2 gloo processes on CPU): DistillationTrainer on a
global batch of 4 split over the ranks, and on every rank the same 2 SGD steps by hand in one process
on the whole batch. Rank 0 saves both weight sets and the logged losses per case to argv[1]."""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf.test_trainer import (_args, _padded_examples, _sgd_by_hand, _tokenizer,  # noqa: E402
                             _variable_length_examples)
from hf.tiny_models import tiny_llama  # noqa: E402
from transformers import DataCollatorForLanguageModeling  # noqa: E402

import fastdistill  # noqa: E402
from fastdistill.hf import DistillationTrainer  # noqa: E402

CASES = {  # name: (per-device batch, gradient accumulation, hard labels from the collator, options)
    "mask_only_ga2": (1, 2, False, dict(divergence="jsd", beta=0.3)),
    "collator_hard_labels": (2, 1, True, dict(hard_weight=0.5, temperature=2.0)),
}


def main(out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    results = {}
    for name, (bs, ga, hard, options) in CASES.items():
        student, teacher = tiny_llama(97, seed=0), tiny_llama(97, seed=1, hidden_size=48)
        collator = DataCollatorForLanguageModeling(_tokenizer(), mlm=False) if hard else None
        examples = _variable_length_examples() if hard else _padded_examples()
        full = collator(examples) if collator else {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
        ref, ref_losses = _sgd_by_hand(student, teacher, full, 2, 2.0, fastdistill.FusedLinearDistillLoss(**options))
        trained = copy.deepcopy(student)
        trainer = DistillationTrainer(trained, _args(os.path.join(out_dir, name), per_device_train_batch_size=bs,
                                                     gradient_accumulation_steps=ga, num_train_epochs=2),
                                      teacher_model=teacher, data_collator=collator, train_dataset=examples, **options)
        assert trainer.args.world_size == 2, trainer.args.world_size
        trainer.train()
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        results[name] = dict(start=student.state_dict(), trained=trained.state_dict(), ref=ref.state_dict(),
                             logged=logged, ref_losses=ref_losses)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
