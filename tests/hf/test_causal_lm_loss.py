"""causal_lm_distill_loss == HF logits + fastdistill.distill_loss by hand: loss and student gradients."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from hf.tiny_models import (batch, tiny_cohere, tiny_gemma2, tiny_gpt2, tiny_granite, tiny_llama,  # noqa: E402
                            tiny_qwen3)

import fastdistill  # noqa: E402
from fastdistill.hf import causal_lm_distill_loss  # noqa: E402


def _targets(labels, mask):
    """HF's shift, written out: position t predicts labels[t + 1]; padding at t or t + 1 is ignored."""
    out = torch.full_like(labels, -100)
    b, t = labels.shape
    for i in range(b):
        for j in range(t - 1):
            if mask is None or (mask[i, j] and mask[i, j + 1]):
                out[i, j] = labels[i, j + 1]
    return out


def _by_hand(student, teacher, ids, mask, labels=None, num_items=None, **options):
    logits = student(input_ids=ids, attention_mask=mask).logits
    was = teacher.training
    teacher.eval()
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits.to(logits.dtype)
    teacher.train(was)
    vs, vt = logits.shape[-1], t_logits.shape[-1]  # the smaller vocabulary padded with -inf logits
    logits = F.pad(logits, (0, max(vt - vs, 0)), value=-float("inf"))
    t_logits = F.pad(t_logits, (0, max(vs - vt, 0)), value=-float("inf"))
    targets = _targets(ids if labels is None else labels, mask)
    return fastdistill.distill_loss(logits.float(), t_logits.float(), labels=targets, num_items=num_items,
                                    **options)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(make_student, make_teacher, *, labels=None, pad=True, num_items=None, rtol=1e-4, atol=1e-6, **options):
    ids, mask = batch(pad=pad)
    mask = mask if pad else None
    results = []
    for fused in (True, False):
        student, teacher = make_student(), make_teacher()
        if fused:
            loss_fn = fastdistill.FusedLinearDistillLoss(**options)
            loss = causal_lm_distill_loss(student, teacher, ids, mask, labels, loss=loss_fn, num_items=num_items)
        else:
            loss = _by_hand(student, teacher, ids, mask, labels, num_items=num_items, **options)
        (loss.sum() if loss.dim() else loss).backward()
        results.append((loss.detach(), _grads(student)))
        assert not any(p.grad is not None for p in teacher.parameters())
    (fl, fg), (rl, rg) = results
    torch.testing.assert_close(fl, rl, rtol=rtol, atol=atol)
    assert fg.keys() == rg.keys() and len(fg) > 10
    for name in fg:
        torch.testing.assert_close(fg[name], rg[name], rtol=rtol, atol=atol, msg=name)
    return fl


def test_kl_with_padding_and_a_wider_teacher():
    loss = _compare(lambda: tiny_llama(seed=1), lambda: tiny_llama(seed=2, hidden_size=48))
    assert loss > 0


def test_hard_weight_labels_and_temperature():
    ids, _ = batch()
    labels = ids.clone()
    labels[0, 3:6] = -100  # e.g. a masked prompt
    _compare(lambda: tiny_qwen3(seed=1), lambda: tiny_llama(seed=2), labels=labels, temperature=2.0, hard_weight=0.5,
             soft_weight=0.7)


def test_softcapped_teacher_and_scaled_student_jsd():
    # Gemma-2 teacher (softcap 0.5) and Cohere student (logit_scale 3): each model's own logit options
    _compare(lambda: tiny_cohere(seed=1), lambda: tiny_gemma2(seed=2), divergence="jsd", beta=0.3)


def test_granite_student_reverse_kl_sum_without_padding():
    _compare(lambda: tiny_granite(seed=1), lambda: tiny_gemma2(seed=2), pad=False, divergence="reverse_kl",
             reduction="sum")


def test_different_vocabularies_pad_with_minus_inf():
    # student V=101 > teacher V=97: the teacher gives the extra tokens probability 0 (-inf logits);
    # forward KL is finite in this direction
    loss = _compare(lambda: tiny_llama(vocab=101, seed=1), lambda: tiny_llama(vocab=97, seed=2))
    assert torch.isfinite(loss)


def test_num_items_overrides_the_mean_and_rows_with_none():
    _compare(lambda: tiny_gpt2(seed=1).eval(), lambda: tiny_llama(seed=2), num_items=torch.tensor(50))
    _compare(lambda: tiny_llama(seed=1), lambda: tiny_llama(seed=2), num_items=37, divergence="tvd")
    ids, mask = batch()
    rows = causal_lm_distill_loss(tiny_llama(seed=1), tiny_llama(seed=2), ids, mask,
                                  loss=fastdistill.FusedLinearDistillLoss(reduction="none"))
    assert rows.shape == ids.shape and rows[1, -4:].eq(0).all() and rows[:, -1].eq(0).all()


def test_bf16_teacher_for_an_fp32_student():
    # teacher and student may differ in dtype: each model's logits are computed in its own dtype
    _compare(lambda: tiny_llama(seed=1), lambda: tiny_llama(seed=2).to(torch.bfloat16), rtol=1e-3, atol=1e-5)


def test_teacher_modes_restored_and_student_modes_kept():
    student, teacher = tiny_llama(seed=1), tiny_llama(seed=2)
    teacher.train()
    teacher.model.layers[0].eval()
    seen = []
    teacher.model.layers[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    ids, mask = batch()
    causal_lm_distill_loss(student, teacher, ids, mask).backward()
    assert seen == [False]  # the teacher ran in eval mode
    assert teacher.training and not teacher.model.layers[0].training and teacher.model.layers[1].training
    assert student.training


def test_under_autocast_heads_run_in_the_autocast_dtype():
    ids, mask = batch()
    student, teacher = tiny_llama(seed=1), tiny_llama(seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = causal_lm_distill_loss(student, teacher, ids, mask)
        ref = _by_hand(tiny_llama(seed=1), tiny_llama(seed=2), ids, mask)
    loss.backward()
    assert student.lm_head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=1e-3)


class _CastingLinear(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x.to(self.weight.dtype))


def test_bad_inputs():
    ids, mask = batch()
    student, teacher = tiny_llama(seed=1), tiny_llama(seed=2)
    with pytest.raises(ValueError, match=r"^labels: expected shape \(3, 9\) like input_ids"):
        causal_lm_distill_loss(student, teacher, ids, mask, labels=ids[:, 1:])
    with pytest.raises(ValueError, match=r"^attention_mask: expected shape \(3, 9\)"):
        causal_lm_distill_loss(student, teacher, ids, mask[:, :-1])
    with pytest.raises(ValueError, match=r"^input_ids: expected an integer tensor of shape \(batch, sequence\)"):
        causal_lm_distill_loss(student, teacher, ids[0])
    with pytest.raises(ValueError, match=r"^loss: softcap come from the models' configs"):
        causal_lm_distill_loss(student, teacher, ids, loss=fastdistill.FusedLinearDistillLoss(softcap=5.0))
    with pytest.raises(TypeError, match=r"^loss: expected a fastdistill.FusedLinearDistillLoss"):
        causal_lm_distill_loss(student, teacher, ids, loss=fastdistill.DistillLoss())
    with pytest.raises(ValueError, match=r"^teacher: its output head is on meta and the student's on cpu"):
        causal_lm_distill_loss(student, tiny_llama(seed=2).to("meta"), ids)
    half = tiny_llama(seed=2)
    half.lm_head = _CastingLinear(32, 97, bias=False).to(torch.float64)  # a head that casts its input
    with pytest.raises(TypeError, match=r"^teacher: its final hidden states are torch.float32 and its output head "
                                        r"torch.float64; cast the whole model"):
        causal_lm_distill_loss(student, half, ids)
    from transformers import LlamaModel

    with pytest.raises(ValueError, match=r"^teacher: LlamaModel has no output head"):
        causal_lm_distill_loss(student, LlamaModel(teacher.config), ids)
    with pytest.raises(ValueError, match=r"^labels: expected every label in \[0, 97\)|^labels: "):
        causal_lm_distill_loss(student, teacher, ids, labels=ids + 200)
