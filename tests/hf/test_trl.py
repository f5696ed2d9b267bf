"""fastdistill.hf.trl: TRL 1.16's distillation trainers on the fused linear loss give TRL's own loss.

Oracles: TRL's functions (`_chunked_divergence_loss`, `GKDTrainer.generalized_jsd_loss`, the trainers'
loss methods) on the same inputs, and `generalized_jsd_loss` in float64 on materialized logits, which is
exact where TRL's float32 paths round. Tiny random Llama models and a character tokenizer built in code.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402
from trl.trainer.distillation_trainer import _chunked_divergence_loss  # noqa: E402

from fastdistill.hf.trl import (FastDistillDistillationTrainer, FastDistillGKDTrainer,  # noqa: E402
                                fused_chunked_divergence_loss, fused_generalized_jsd_loss, trl_head_options,
                                trl_loss_options)

BETAS = [0.0, 0.5, 1.0, 0.2]
V = 29  # <pad>, <eos>, a-z, space


def _tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, **{chr(97 + i): 2 + i for i in range(26)}, " ": 28}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _llama(hidden: int, seed: int, **extra) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      eos_token_id=1, bos_token_id=None, initializer_range=0.3)  # far apart: divergence ~1
    for key, value in extra.items():  # head options TRL reads from the config (Llama itself ignores them)
        setattr(cfg, key, value)
    return LlamaForCausalLM(cfg)


def _oracle(hs, ws, bs, ht, wt, mask, beta, T, s_scale=1.0, s_cap=None, t_scale=1.0, t_cap=None, num_items=None):
    """TRL's generalized JSD in float64 on materialized, transformed logits (the exact value)."""
    def logits(h, w, b, scale, cap):
        z = (h.double() @ w.double().t() + (0 if b is None else b.double())) * scale
        return z if cap is None else cap * torch.tanh(z / cap)
    labels = torch.where(mask != 0, 0, -100)
    return GKDTrainer.generalized_jsd_loss(logits(hs, ws, bs, s_scale, s_cap), logits(ht, wt, None, t_scale, t_cap),
                                           labels, beta=beta, temperature=T, num_items_in_batch=num_items)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused op made by fastdistill.hf.trl (so a test cannot pass on TRL's own loss)."""
    import fastdistill.hf.trl as module

    calls, op = [], module.fused_linear_distill_loss
    monkeypatch.setattr(module, "fused_linear_distill_loss", lambda *a, **k: calls.append(1) or op(*a, **k))
    return calls


def test_beta_mapping_table():
    assert trl_loss_options(0.0, 2.0) == dict(divergence="kl", beta=0.0, temperature=2.0, scale_t2=False)
    assert trl_loss_options(1) == dict(divergence="reverse_kl", beta=1.0, temperature=1.0, scale_t2=False)
    assert trl_loss_options(0.3, 0.5) == dict(divergence="jsd", beta=0.3, temperature=0.5, scale_t2=False)
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="^beta:"):
            trl_loss_options(bad)
    with pytest.raises(ValueError, match="^temperature:"):
        trl_loss_options(0.5, 0.0)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("caps", [(None, None), (4.0, None), (None, 3.0)], ids=["nocap", "scap", "tcap"])
def test_chunked_divergence_loss_equals_trl(beta, caps):
    """Drop-in for TRL's _chunked_divergence_loss: loss, entropy sum, count and student gradients, with a
    completion mask, bias, per-model logit scales, softcaps, temperature 1.7, several chunks."""
    g = torch.Generator().manual_seed(int(beta * 10) + 7)
    B, K, Hs, Ht = 3, 6, 16, 24
    hs = torch.randn(B, K, Hs, generator=g).requires_grad_()
    ws = (torch.randn(V, Hs, generator=g) * 0.8).requires_grad_()
    bs = torch.randn(V, generator=g).requires_grad_()
    ht, wt = torch.randn(B, K, Ht, generator=g), torch.randn(V, Ht, generator=g) * 0.8
    mask = torch.ones(B, K, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    opts = dict(student_lm_head_bias=bs, student_logit_scale=1.3, teacher_logit_scale=0.7,
                student_final_logit_softcapping=caps[0], teacher_final_logit_softcapping=caps[1], temperature=1.7)
    for num_items in (None, torch.tensor(25.0)):
        trl_loss, trl_entropy, trl_n = _chunked_divergence_loss(hs, ht, ws, wt, mask, beta,
                                                                num_items_in_batch=num_items, **opts)
        ours, entropy, n = fused_chunked_divergence_loss(hs, ht, ws, wt, mask, beta, num_items_in_batch=num_items,
                                                         chunk_size=4, backend="cpu", **opts)
        exact = _oracle(hs, ws, bs, ht, wt, mask, beta, 1.7, 1.3, caps[0], 0.7, caps[1], num_items)
        assert int(n) == int(trl_n) == 11
        torch.testing.assert_close(ours.double(), exact, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(ours, trl_loss, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(entropy, trl_entropy, rtol=1e-5, atol=1e-5)
        for mine, theirs, oracle in zip(_grads(ours, (hs, ws, bs)), _grads(trl_loss, (hs, ws, bs)),
                                        _grads(exact, (hs, ws, bs))):
            torch.testing.assert_close(mine, oracle, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_chunked_divergence_loss_triton_backend_and_no_entropy():
    g = torch.Generator().manual_seed(3)
    hs, ws = torch.randn(2, 5, 8, generator=g).requires_grad_(), torch.randn(V, 8, generator=g).requires_grad_()
    ht, wt = torch.randn(2, 5, 8, generator=g), torch.randn(V, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ours, entropy, _ = fused_chunked_divergence_loss(hs, ht, ws, wt, mask, 0.5, temperature=2.0, backend="triton",
                                                     log_entropy=False)
    exact = _oracle(hs, ws, None, ht, wt, mask, 0.5, 2.0)
    torch.testing.assert_close(ours.double(), exact, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(_grads(ours, (ws,))[0], _grads(exact, (ws,))[0], rtol=1e-4, atol=1e-6)
    assert torch.isnan(entropy)


@pytest.mark.parametrize("beta", BETAS)
def test_generalized_jsd_loss_equals_gkd(beta):
    g = torch.Generator().manual_seed(11)
    hs, ws = torch.randn(2, 7, 12, generator=g).requires_grad_(), torch.randn(V, 12, generator=g).requires_grad_()
    ht, wt = torch.randn(2, 7, 20, generator=g), torch.randn(V, 20, generator=g)
    labels = torch.randint(0, V, (2, 7), generator=g)
    labels[0, :3] = -100
    for kw in (dict(temperature=0.8), dict(reduction="sum"), dict(num_items_in_batch=20)):
        theirs = GKDTrainer.generalized_jsd_loss(hs.double() @ ws.double().t(), ht.double() @ wt.double().t(),
                                                 labels, beta=beta, **kw)
        ours = fused_generalized_jsd_loss(hs, ws, ht, wt, labels, beta=beta, backend="cpu", chunk_size=5, **kw)
        torch.testing.assert_close(ours.double(), theirs, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(_grads(ours, (hs,))[0], _grads(theirs, (hs,))[0], rtol=1e-4, atol=1e-6)


def test_bad_input_names_the_argument():
    h, w = torch.randn(2, 3, 8), torch.randn(V, 8)
    with pytest.raises(ValueError, match="^reduction:"):
        fused_generalized_jsd_loss(h, w, h, w, reduction="mean")
    with pytest.raises(ValueError, match="^labels:"):
        fused_generalized_jsd_loss(h, w, h, w, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="^chunk_size:"):
        fused_chunked_divergence_loss(h, h, w, w, torch.ones(2, 3), 0.5, chunk_size=0)
    with pytest.raises(ValueError, match="^beta:"):
        fused_chunked_divergence_loss(h, h, w, w, torch.ones(2, 3), 1.5)
    with pytest.raises(ValueError, match="^completion_mask:"):
        fused_chunked_divergence_loss(h, h, w, w, torch.ones(2, 4), 0.5)
    with pytest.raises(TypeError, match="^backend:"):
        FastDistillDistillationTrainer(model=None, backend=None)
    with pytest.raises(ValueError, match="^chunk_size:"):
        FastDistillGKDTrainer(model=None, chunk_size=-1)


def test_head_options_read_like_trl():
    class Cfg:
        model_type = "granite"
        logits_scaling = 4.0
    assert trl_head_options(Cfg()) == (0.25, None)
    Cfg.model_type = "hyperclovax"
    assert trl_head_options(Cfg()) == (4.0, None)
    Cfg.logit_scale, Cfg.final_logit_softcapping = 0.5, 30.0
    assert trl_head_options(Cfg()) == (0.5, 30.0)


def _distill_trainer(cls, beta, output_dir, **kw):
    args = DistillationConfig(output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=2,
                              max_completion_length=4, temperature=1.5, beta=beta, logging_steps=1, report_to=[],
                              save_strategy="no", learning_rate=1.0, optim="sgd", use_cpu=True, seed=3)
    student = _llama(32, 0, logit_scale=1.25)
    teacher = _llama(48, 1, final_logit_softcapping=3.0)
    prompts = Dataset.from_dict({"prompt": ["abc", "hello w", "xyz q", "the cat"]})
    return cls(model=student, teacher_model=teacher, args=args, train_dataset=prompts, processing_class=_tokenizer(),
               **kw)


@pytest.mark.parametrize("beta", BETAS)
def test_distillation_trainer_compute_loss_equals_trl(beta, tmp_path, fused_calls):
    """TRL's and our trainer's _compute_loss on one constructed batch (left-padded prompts, completions
    with a completion mask), the same models: loss, metric inputs and every student gradient."""
    ours = _distill_trainer(FastDistillDistillationTrainer, beta, tmp_path, backend="cpu", chunk_size=3)
    theirs = _distill_trainer(DistillationTrainer, beta, tmp_path)
    theirs.model, theirs.teacher_model = ours.model, ours.teacher_model
    inputs = {"prompt_ids": torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]]),
              "prompt_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),
              "completion_ids": torch.tensor([[11, 12, 1, 0, 0], [13, 14, 15, 16, 17]]),
              "completion_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    params = [p for p in ours.model.parameters() if p.requires_grad]
    for num_items in (None, torch.tensor(11.0)):
        a_loss, a_entropy, a_n = ours._compute_loss(ours.model, inputs, num_items)
        assert fused_calls and fused_calls.pop()
        b_loss, b_entropy, b_n = theirs._compute_loss(theirs.model, inputs, num_items)
        assert not fused_calls
        assert int(a_n) == int(b_n) == 8 and a_loss.item() > 0.05  # far-apart models: the loss is not ~0
        torch.testing.assert_close(a_loss, b_loss, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(a_entropy, b_entropy, rtol=1e-5, atol=1e-5)
        for mine, trl_grad in zip(_grads(a_loss, params), _grads(b_loss, params)):
            torch.testing.assert_close(mine, trl_grad, rtol=1e-4, atol=1e-6)


def test_distillation_trainer_trains_like_trl(tmp_path, fused_calls):
    """Two steps of train() with on-policy generation: same logged losses, metrics and weights as TRL's."""
    runs = {}
    for name, cls, kw in (("trl", DistillationTrainer, {}), ("ours", FastDistillDistillationTrainer, {})):
        trainer = _distill_trainer(cls, 0.5, tmp_path / name, **kw)
        trainer.train()
        runs[name] = trainer
        assert len(fused_calls) == (2 if name == "ours" else 0)
    logs = [[row for row in t.state.log_history if "loss" in row] for t in runs.values()]
    assert len(logs[0]) == len(logs[1]) == 2
    for trl_row, our_row in zip(*logs):
        assert trl_row["num_tokens"] == our_row["num_tokens"]  # the same completions were sampled
        for key in ("loss", "entropy", "grad_norm", "completions/mean_length"):
            assert our_row[key] == pytest.approx(trl_row[key], rel=1e-4), key
    trl_params = dict(runs["trl"].model.named_parameters())
    for name, p in runs["ours"].model.named_parameters():
        torch.testing.assert_close(p, trl_params[name], rtol=1e-4, atol=1e-6)


def test_distillation_trainer_without_entropy_logs_none(tmp_path):
    trainer = _distill_trainer(FastDistillDistillationTrainer, 1.0, tmp_path, log_entropy=False)
    trainer.args.max_steps = 1
    trainer.train()
    row = next(r for r in trainer.state.log_history if "loss" in r)
    assert row["entropy"] is None and row["loss"] > 0


def _gkd_trainer(cls, output_dir, bf16, **kw):
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, prompt in ((9, 3), (6, 2), (8, 4), (7, 1)):
        ids = torch.randint(2, V, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})

    def collate(batch):  # right padding; labels -100 on prompts and padding
        width = max(len(r["input_ids"]) for r in batch)
        pad = [width - len(r["input_ids"]) for r in batch]
        return {"input_ids": torch.tensor([r["input_ids"] + [0] * p for r, p in zip(batch, pad)]),
                "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * p for r, p in zip(batch, pad)]),
                "labels": torch.tensor([r["labels"] + [-100] * p for r, p in zip(batch, pad)])}
    args = GKDConfig(output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=2, lmbda=0.0, beta=0.3,
                     temperature=1.5, logging_steps=1, report_to=[], save_strategy="no", learning_rate=1.0,
                     optim="sgd", use_cpu=True, seed=3, bf16=bf16)
    data = Dataset.from_list(rows)
    return cls(model=_llama(32, 0), teacher_model=_llama(48, 1), args=args, train_dataset=data, eval_dataset=data,
               processing_class=_tokenizer(), data_collator=collate, **kw)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_gkd_trainer_trains_and_evaluates_like_trl(bf16, tmp_path, fused_calls):
    """GKDTrainer (off-policy steps, lmbda=0): same losses, weights and eval_loss as TRL's own. bf16=True
    (TRL's default): both models run under bf16 autocast in both trainers; TRL rounds the logits to bf16,
    fastdistill keeps them in float32 from the bf16 GEMM inputs, hence the looser tolerance."""
    rel = 2e-2 if bf16 else 1e-4
    runs = {}
    for name, cls, kw in (("trl", GKDTrainer, {}), ("ours", FastDistillGKDTrainer, {"backend": "cpu"})):
        trainer = _gkd_trainer(cls, tmp_path / name, bf16, **kw)
        trainer.train()
        runs[name] = (trainer, trainer.evaluate()["eval_loss"])
        assert len(fused_calls) == (3 if name == "ours" else 0)  # 2 train steps, 1 eval batch
    logs = [[row for row in t.state.log_history if "loss" in row] for t, _ in runs.values()]
    assert len(logs[0]) == 2 and logs[0][0]["loss"] > 0.05
    for trl_row, our_row in zip(*logs):
        assert our_row["loss"] == pytest.approx(trl_row["loss"], rel=rel)
        assert our_row["grad_norm"] == pytest.approx(trl_row["grad_norm"], rel=rel)
    assert runs["ours"][1] == pytest.approx(runs["trl"][1], rel=rel)
    trl_params = dict(runs["trl"][0].model.named_parameters())
    for name, p in runs["ours"][0].model.named_parameters():
        torch.testing.assert_close(p, trl_params[name], rtol=rel, atol=1e-3 if bf16 else 1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.4])
def test_gkd_compute_loss_with_heads_that_differ(beta, tmp_path, fused_calls):
    """A Cohere student (logit_scale 3) and a Gemma-2 teacher (final_logit_softcapping 0.5), which GKDTrainer
    sees through their own logits: loss and student gradients equal TRL's compute_loss on one batch."""
    from hf.tiny_models import batch, tiny_cohere, tiny_gemma2

    ours = _gkd_trainer(FastDistillGKDTrainer, tmp_path, False, backend="cpu")
    theirs = _gkd_trainer(GKDTrainer, tmp_path, False)
    for trainer in (ours, theirs):
        trainer.model, trainer.teacher_model, trainer.beta = tiny_cohere(V, seed=0), tiny_gemma2(V, seed=1), beta
    theirs.model.load_state_dict(ours.model.state_dict())
    theirs.teacher_model.load_state_dict(ours.teacher_model.state_dict())
    ids, mask = batch(V)
    labels = torch.where(mask.bool(), ids, -100)
    labels[0, :4] = -100  # a prompt
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    a, b = ours.compute_loss(ours.model, inputs), theirs.compute_loss(theirs.model, inputs)
    assert len(fused_calls) == 1
    assert a.item() > 0.01  # the capped teacher is near uniform, the scaled student is not
    torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    for mine, trl_grad in zip(_grads(a, list(ours.model.parameters())), _grads(b, list(theirs.model.parameters()))):
        torch.testing.assert_close(mine, trl_grad, rtol=1e-4, atol=1e-6)


def test_fully_masked_batch_is_an_exact_zero():
    """A rank whose completions are all masked (TRL: 0 / clamp(0, min=1)): zero loss and gradients, no NaN."""
    hs, ws = torch.randn(2, 3, 8, requires_grad=True), torch.randn(V, 8, requires_grad=True)
    loss, entropy, n = fused_chunked_divergence_loss(hs, torch.randn(2, 3, 8), ws, torch.randn(V, 8),
                                                     torch.zeros(2, 3), 0.5, backend="cpu")
    loss.backward()
    assert loss.item() == 0.0 and entropy.item() == 0.0 and int(n) == 0
    assert not hs.grad.any() and not ws.grad.any()


def test_bf16_hidden_states_with_float32_heads_compute_in_bf16_like_trl():
    """TRL's dtype rule without autocast: each head computes in its hidden states' dtype (an FSDP2
    teacher's gathered float32 master weight meets bf16 hidden states), so the weights are rounded to bf16."""
    g = torch.Generator().manual_seed(5)
    hs = torch.randn(2, 6, 16, generator=g).bfloat16().requires_grad_()
    ht = torch.randn(2, 6, 16, generator=g).bfloat16()
    ws, wt = torch.randn(V, 16, generator=g).requires_grad_(), torch.randn(V, 16, generator=g)
    mask = torch.ones(2, 6)
    theirs = _chunked_divergence_loss(hs, ht, ws, wt, mask, 0.5, temperature=1.5)[0]
    ours = fused_chunked_divergence_loss(hs, ht, ws, wt, mask, 0.5, temperature=1.5, backend="cpu")[0]
    exact_fp32_heads = _oracle(hs, ws, None, ht, wt, mask, 0.5, 1.5)
    assert abs(theirs.item() - exact_fp32_heads.item()) > 1e-4 * exact_fp32_heads.item()  # the rule matters here
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-6)
    for mine, trl_grad in zip(_grads(ours, (hs, ws)), _grads(theirs, (hs, ws))):
        torch.testing.assert_close(mine, trl_grad, rtol=1e-2, atol=1e-3)
