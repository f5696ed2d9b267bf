"""fastdistill.hf: fused distillation losses for Hugging Face transformers models (extra `fastdistill[hf]`).

    final_hidden_states(model, **inputs) -> (hidden, HeadSpec)   final hidden states + output head, no logits
    causal_lm_distill_loss(student, teacher, input_ids, ...)    the fused loss of two causal LMs on a batch
    DistillationTrainer                                          a transformers.Trainer subclass (lazy import)

`import fastdistill` never imports this package; importing it imports neither transformers nor trl
(the functions use only the models they are given); DistillationTrainer imports transformers.
"""
from fastdistill.hf.heads import HeadSpec, apply_logit_options, final_hidden_states
from fastdistill.hf.loss import causal_lm_distill_loss, shift_labels

_LAZY = {"DistillationTrainer": "fastdistill.hf.trainer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastdistill.hf' has no attribute {name!r}")


__all__ = ["DistillationTrainer", "HeadSpec", "apply_logit_options", "causal_lm_distill_loss", "final_hidden_states",
           "shift_labels"]
