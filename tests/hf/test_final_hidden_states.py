"""final_hidden_states: the logits rebuilt from (hidden, head) equal each model's own, without [B, T, V]."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from hf.tiny_models import ARCHITECTURES, batch, tiny_gemma2, tiny_granite, tiny_llama  # noqa: E402

from fastdistill.hf import HeadSpec, apply_logit_options, final_hidden_states  # noqa: E402
from fastdistill.hf.heads import logit_options  # noqa: E402

# `import fastdistill` importing no transformers/trl/accelerate is checked in a fresh process by
# tests/hf/test_fsdp2.py (its worker), which starts one anyway.


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_rebuilt_logits_equal_the_models(arch):
    model = ARCHITECTURES[arch]().eval()  # eval: GPT-2's dropout would differ between the two forwards
    ids, mask = batch()
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    hidden, head = final_hidden_states(model, input_ids=ids, attention_mask=mask)
    hook.remove()
    assert shapes == [(3, 1, model.config.vocab_size)]  # the head saw one position per sequence only
    assert hidden.shape == (*ids.shape, head.weight.shape[1])
    want = model(input_ids=ids, attention_mask=mask).logits
    got = apply_logit_options(F.linear(hidden, head.weight, head.bias), head.logit_scale, head.softcap)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    expected = {"gemma2": (1.0, 0.5), "cohere": (3.0, None), "granite": (4.0, None)}.get(arch, (1.0, None))
    assert (head.logit_scale, head.softcap) == expected
    if arch == "gpt2":
        assert head.weight is model.transformer.wte.weight  # tied embedding
    # the options change the logits of these tiny models: dropping them would be caught
    if arch in ("gemma2", "cohere", "granite"):
        assert not torch.allclose(F.linear(hidden, head.weight, head.bias), want, atol=1e-3)


def test_hidden_states_carry_gradients_and_head_is_the_parameter():
    model = tiny_llama()
    ids, mask = batch()
    hidden, head = final_hidden_states(model, input_ids=ids, attention_mask=mask)
    assert isinstance(head, HeadSpec) and head.weight is model.lm_head.weight and head.module is model.lm_head
    F.linear(hidden, head.weight).square().sum().backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None and model.lm_head.weight.grad is not None


def test_hyperclovax_multiplies_where_granite_divides():
    from transformers import HyperCLOVAXConfig

    cfg = HyperCLOVAXConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, logits_scaling=0.25)
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids, mask = batch()
    hidden, head = final_hidden_states(model, input_ids=ids, attention_mask=mask)
    assert head.logit_scale == 0.25
    assert logit_options(tiny_granite(logits_scaling=0.25))[0] == 4.0
    want = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(apply_logit_options(F.linear(hidden, head.weight), 0.25, None), want)


def test_no_output_head_and_non_linear_head():
    from transformers import LlamaModel

    base = LlamaModel(tiny_llama().config)
    ids, _ = batch()
    with pytest.raises(ValueError, match=r"^model: LlamaModel has no output head"):
        final_hidden_states(base, input_ids=ids)
    model = tiny_llama()
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(TypeError, match=r"^model: the output head of LlamaForCausalLM is a Sequential"):
        final_hidden_states(model, input_ids=ids)


def test_unknown_logit_config_attribute_raises():
    model = tiny_llama()
    model.config.output_logit_bias_scale = 2.0  # unknown to fastdistill: never silently ignored
    with pytest.raises(ValueError, match=r"^model: LlamaForCausalLM's config has output_logit_bias_scale=2.0"):
        final_hidden_states(model, input_ids=batch()[0])


class _Doubled(torch.nn.Module):
    """A causal LM whose forward scales its logits with nothing in its config saying so."""

    def __init__(self, inner, factor=2.0, calls=1, use_head=True):
        super().__init__()
        self.inner, self.factor, self.calls, self.use_head = inner, factor, calls, use_head

    def get_output_embeddings(self):
        return self.inner.lm_head

    def forward(self, input_ids, use_cache=False, **kw):
        h = self.inner.model(input_ids=input_ids, use_cache=use_cache).last_hidden_state
        if not self.use_head:
            return type("Out", (), {"logits": F.linear(h, self.inner.lm_head.weight)})()
        for _ in range(self.calls):
            logits = self.inner.lm_head(h) * self.factor
        return type("Out", (), {"logits": logits})()


def test_unknown_logit_post_processing_raises_once_checked():
    ids = batch()[0]
    with pytest.raises(ValueError, match=r"^model: _Doubled's logits differ from its head's output"):
        final_hidden_states(_Doubled(tiny_llama()), input_ids=ids)
    hidden, _ = final_hidden_states(_Doubled(tiny_llama(), factor=1.0), input_ids=ids)  # the same, unscaled: fine
    assert hidden.shape == (*ids.shape, 32)
    with pytest.raises(ValueError, match=r"called its output head 2 times"):
        final_hidden_states(_Doubled(tiny_llama(), factor=1.0, calls=2), input_ids=ids)
    with pytest.raises(ValueError, match=r"called its output head 0 times"):
        final_hidden_states(_Doubled(tiny_llama(), use_head=False), input_ids=ids)


def test_logits_options_of_inputs_are_refused():
    with pytest.raises(ValueError, match=r"^model_inputs: labels is not accepted"):
        final_hidden_states(tiny_llama(), input_ids=batch()[0], labels=batch()[0])


def test_gemma2_cap_is_read_from_config():
    assert logit_options(tiny_gemma2(softcap=7.0)) == (1.0, 7.0)


def test_distillation_trainer_is_imported_lazily():
    import fastdistill.hf as hf

    assert hf.DistillationTrainer.__name__ == "DistillationTrainer"
    assert hf.DistillationTrainer.__module__ == "fastdistill.hf.trainer"
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        hf.Nope


@pytest.mark.slow
def test_every_causal_lm_config_of_transformers_is_known():
    """Default configs of all transformers causal LMs pass the allow-list (guards IGNORED/HANDLED when
    transformers adds attributes), and the families get the rule their forwards apply."""
    import warnings

    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from fastdistill.hf.heads import config_logit_options

    seen = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            try:
                config = CONFIG_MAPPING[model_type]()
            except Exception:  # a config that cannot be built with defaults
                continue
            seen[model_type] = config_logit_options(config, model_type)
    assert len(seen) > 150
    assert seen["llama"] == (1.0, None) and seen["gemma2"][1] == 30.0
    assert seen["granite"][0] == 1.0 / CONFIG_MAPPING["granite"]().logits_scaling
    assert seen["hyperclovax"][0] == CONFIG_MAPPING["hyperclovax"]().logits_scaling
    assert seen["cohere"][0] == CONFIG_MAPPING["cohere"]().logit_scale
