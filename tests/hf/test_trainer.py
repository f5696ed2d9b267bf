"""DistillationTrainer: the updates and losses Trainer produces equal causal_lm_distill_loss on the whole
batch, with gradient accumulation, hard labels from DataCollatorForLanguageModeling, bf16 autocast,
evaluation, checkpoints (student only) and resume_from_checkpoint."""
import copy
import os

import pytest
import torch

pytest.importorskip("transformers")

from hf.tiny_models import batch, tiny_llama  # noqa: E402
from transformers import DataCollatorForLanguageModeling, TrainingArguments  # noqa: E402

import fastdistill  # noqa: E402
from fastdistill.hf import DistillationTrainer, causal_lm_distill_loss  # noqa: E402

V = 97
LENGTHS = (9, 4, 7, 3)  # every micro-batch split has its own target count


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True, optim="sgd",
                learning_rate=2.0, lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no",
                logging_steps=1, seed=0, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


def _tokenizer():
    """A word-level tokenizer over "0".."95" plus <pad>: what DataCollatorForLanguageModeling needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(V - 1)} | {"<pad>": V - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def _variable_length_examples(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, V - 1, (n,), generator=g).tolist()} for n in LENGTHS]


def _padded_examples():
    """Fixed-length rows with right and left padding, attention_mask only (no labels)."""
    ids, mask = batch(vocab=V, b=4, t=9, seed=3)
    mask[3, 4:] = 0
    return [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(4)]


def _sgd_by_hand(student, teacher, full_batch, steps, lr, loss):
    """`steps` SGD steps of causal_lm_distill_loss on the whole batch, outside Trainer."""
    student = copy.deepcopy(student).train()
    losses = []
    for _ in range(steps):
        out = causal_lm_distill_loss(student, teacher, full_batch["input_ids"], full_batch.get("attention_mask"),
                                     full_batch.get("labels"), loss=loss)
        student.zero_grad()
        out.backward()
        with torch.no_grad():
            for p in student.parameters():
                p -= lr * p.grad
        losses.append(out.item())
    return student, losses


def _deltas(model, start):
    return {n: p.detach() - start[n] for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", ["collator_hard_labels", "attention_mask_only"])
def test_gradient_accumulation_equals_the_large_batch(tmp_path, case):
    """2 micro-batches x GA 2 and 1 batch of 4 both give the by-hand large-batch SGD update and loss,
    though the micro-batches hold different numbers of target tokens."""
    student, teacher = tiny_llama(V, seed=0), tiny_llama(V, seed=1, hidden_size=48)
    if case == "collator_hard_labels":
        collator = DataCollatorForLanguageModeling(_tokenizer(), mlm=False)
        examples, options = _variable_length_examples(), dict(hard_weight=0.5, temperature=2.0)
    else:
        collator = None
        examples, options = _padded_examples(), dict(divergence="jsd", beta=0.3)
    full = collator(examples) if collator else {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
    assert case != "collator_hard_labels" or (full["labels"] == -100).any()
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    ref, ref_losses = _sgd_by_hand(student, teacher, full, 2, 2.0, fastdistill.FusedLinearDistillLoss(**options))
    for bs, ga in ((4, 1), (2, 2)):
        trained = copy.deepcopy(student)
        args = _args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, num_train_epochs=2)
        trainer = DistillationTrainer(model=trained, teacher_model=teacher, data_collator=collator,
                                      train_dataset=examples, args=args, **options)
        trainer.train()
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        torch.testing.assert_close(logged, ref_losses, rtol=1e-4, atol=1e-6, msg=f"bs {bs} ga {ga}")
        got, want = _deltas(trained, start), _deltas(ref, start)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-6, msg=f"bs {bs} ga {ga}: {name}")
    assert max(w.abs().max() for w in want.values()) > 1e-3  # the steps moved the weights


def test_evaluate_and_predict_give_the_distillation_loss(tmp_path):
    student, teacher = tiny_llama(V, seed=0), tiny_llama(V, seed=1, hidden_size=48)
    examples = _padded_examples()
    full = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
    trainer = DistillationTrainer(student, _args(tmp_path, per_device_eval_batch_size=4), teacher_model=teacher,
                                  eval_dataset=examples, distill_loss={"divergence": "reverse_kl", "temperature": 1.5})
    want = causal_lm_distill_loss(student.eval(), teacher, full["input_ids"], full["attention_mask"],
                                  loss=fastdistill.FusedLinearDistillLoss(divergence="reverse_kl", temperature=1.5))
    assert trainer.evaluate()["eval_loss"] == pytest.approx(want.item(), rel=1e-5)
    pred = trainer.predict(examples)
    assert pred.predictions is None  # no logits are computed
    assert pred.metrics["test_loss"] == pytest.approx(want.item(), rel=1e-5)


def test_bf16_mixed_precision(tmp_path):
    """bf16=True on CPU: both models and the fused loss run under bf16 autocast (the loss equals the
    by-hand one under torch.autocast, not the fp32 one); a bf16 teacher with an fp32 student trains,
    the student keeps fp32 weights and the teacher stays bf16."""
    student, teacher = tiny_llama(V, seed=0), tiny_llama(V, seed=1, hidden_size=48)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)  # a confident teacher: a loss far from 0, where bf16 rounding shows
    teacher.to(torch.bfloat16)
    examples = _padded_examples()
    full = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
    trainer = DistillationTrainer(student, _args(tmp_path, bf16=True, per_device_train_batch_size=2,
                                                 per_device_eval_batch_size=4, max_steps=2, optim="adamw_torch",
                                                 learning_rate=1e-2),
                                  teacher_model=teacher, train_dataset=examples, eval_dataset=examples)
    ids, mask = full["input_ids"], full["attention_mask"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = causal_lm_distill_loss(student.eval(), teacher, ids, mask).item()
    fp32 = causal_lm_distill_loss(student, teacher.float(), ids, mask).item()
    teacher.to(torch.bfloat16)
    got = trainer.evaluate()["eval_loss"]
    assert got == pytest.approx(want, rel=1e-6)
    assert abs(got - fp32) > 1e-4 * abs(fp32)  # the bf16 path really ran (fp32: 7e-4 away)
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer.train()
    assert all(h["loss"] == h["loss"] and h["loss"] > 0 for h in trainer.state.log_history if "loss" in h)
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert any(not torch.equal(p, start[n]) for n, p in student.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in trainer.teacher_model.parameters())


def _examples8():
    ids, _ = batch(vocab=V, b=8, t=8, seed=5)
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(8)]


def test_checkpoints_hold_only_the_student_and_resume_matches(tmp_path):
    from safetensors.torch import load_file

    student0, teacher = tiny_llama(V, seed=0), tiny_llama(V, seed=1, hidden_size=48)
    args = dict(per_device_train_batch_size=2, max_steps=4, save_strategy="steps", save_steps=2,
                optim="adamw_torch", learning_rate=1e-2, lr_scheduler_type="linear")
    hard = 0.25  # labels in the batch: hard targets mixed in
    full_run = copy.deepcopy(student0)
    DistillationTrainer(full_run, _args(tmp_path / "full", **args), teacher_model=teacher,
                        train_dataset=_examples8(), hard_weight=hard).train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved.keys() == student0.state_dict().keys()
    assert all(saved[k].shape == v.shape for k, v in student0.state_dict().items())
    assert not any("teacher" in f for f in os.listdir(ckpt))
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(list(student0.parameters()))

    resumed = copy.deepcopy(student0)
    DistillationTrainer(resumed, _args(tmp_path / "full", **args), teacher_model=teacher,
                        train_dataset=_examples8(), hard_weight=hard).train(resume_from_checkpoint=str(ckpt))
    for (name, p), q in zip(full_run.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(full_run.parameters(), student0.parameters()))


def test_bad_arguments(tmp_path):
    student, teacher = tiny_llama(V, seed=0), tiny_llama(V, seed=1)
    args = _args(tmp_path)
    with pytest.raises(TypeError, match="^teacher_model"):
        DistillationTrainer(student, args)
    with pytest.raises(ValueError, match="^teacher_model"):
        DistillationTrainer(student, args, teacher_model=student)
    with pytest.raises(ValueError, match="^distill_loss"):
        DistillationTrainer(student, args, teacher_model=teacher, distill_loss=fastdistill.FusedLinearDistillLoss(),
                            temperature=2.0)
    with pytest.raises(ValueError, match="^distill_loss: reduction"):
        DistillationTrainer(student, args, teacher_model=teacher, reduction="sum")
    with pytest.raises(ValueError, match="^distill_loss: unknown"):
        DistillationTrainer(student, args, teacher_model=teacher, distill_loss={"temprature": 2.0})
    with pytest.raises(TypeError, match="^distill_loss"):
        DistillationTrainer(student, args, teacher_model=teacher, distill_loss=torch.nn.KLDivLoss())
    with pytest.raises(ValueError, match="^compute_loss_func"):
        DistillationTrainer(student, args, teacher_model=teacher, compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(ValueError, match="^args.label_smoothing_factor"):
        DistillationTrainer(student, _args(tmp_path, label_smoothing_factor=0.1), teacher_model=teacher)
    trainer = DistillationTrainer(student, args, teacher_model=teacher, divergence="jsd", beta=0.2)
    assert trainer.distill_loss.options["divergence"] == "jsd" and trainer.distill_loss.options["beta"] == 0.2


def test_teacher_placement(tmp_path, monkeypatch):
    """The teacher is moved to args.device like the student, never cast; one loaded with a device_map
    (accelerate-dispatched, maybe over several devices) is left where it is."""
    student, teacher = tiny_llama(V, seed=0), tiny_llama(V, seed=1).to(torch.bfloat16)
    moves = []
    real_to = type(teacher).to
    monkeypatch.setattr(type(teacher), "to", lambda self, *a, **k: moves.append((self, a, k)) or real_to(self, *a, **k))
    trainer = DistillationTrainer(student, _args(tmp_path), teacher_model=teacher)
    assert [(m, a, k) for m, a, k in moves if m is teacher] == [(teacher, (trainer.args.device,), {})]
    assert trainer.teacher_model is teacher and teacher.dtype == torch.bfloat16
    moves.clear()
    teacher.hf_device_map = {"": "cpu"}
    DistillationTrainer(student, _args(tmp_path), teacher_model=teacher)
    assert not [m for m, _, _ in moves if m is teacher]


@pytest.mark.gpu
def test_teacher_goes_to_the_student_device(tmp_path):
    student, teacher = tiny_llama(V, seed=0), tiny_llama(V, seed=1).to(torch.bfloat16)
    trainer = DistillationTrainer(student, _args(tmp_path, use_cpu=False, max_steps=1, per_device_train_batch_size=4),
                                  teacher_model=teacher, train_dataset=_padded_examples())
    assert trainer.teacher_model.device.type == "cuda" and trainer.teacher_model.dtype == torch.bfloat16
    trainer.train()
