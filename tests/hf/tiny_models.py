"""Tiny random-config transformers causal LMs for the fastdistill.hf tests (no downloads)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)


def _build(config, seed: int, dtype=torch.float32):
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.to(dtype)


def tiny_llama(vocab: int = 97, seed: int = 0, tie: bool = False, **kw):
    from transformers import LlamaConfig

    return _build(LlamaConfig(vocab_size=vocab, tie_word_embeddings=tie, **{**_COMMON, **kw}), seed)


def tiny_qwen2(vocab: int = 97, seed: int = 0, **kw):
    from transformers import Qwen2Config

    return _build(Qwen2Config(vocab_size=vocab, tie_word_embeddings=False, **{**_COMMON, **kw}), seed)


def tiny_qwen3(vocab: int = 97, seed: int = 0, **kw):
    from transformers import Qwen3Config

    return _build(Qwen3Config(vocab_size=vocab, head_dim=8, tie_word_embeddings=False, **{**_COMMON, **kw}), seed)


def tiny_gemma2(vocab: int = 97, seed: int = 0, softcap: float = 0.5, **kw):
    """A small final_logit_softcapping so that the cap visibly changes random-init logits."""
    from transformers import Gemma2Config

    return _build(Gemma2Config(vocab_size=vocab, head_dim=8, final_logit_softcapping=softcap, sliding_window=8,
                               **{**_COMMON, **kw}), seed)


def tiny_gpt2(vocab: int = 97, seed: int = 0, **kw):
    """GPT-2: lm_head tied to the token embedding."""
    from transformers import GPT2Config

    return _build(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                     eos_token_id=2, **kw), seed)


def tiny_cohere(vocab: int = 97, seed: int = 0, logit_scale: float = 3.0, **kw):
    from transformers import CohereConfig

    return _build(CohereConfig(vocab_size=vocab, logit_scale=logit_scale, bos_token_id=1, eos_token_id=2,
                                      **{**_COMMON, **kw}), seed)


def tiny_granite(vocab: int = 97, seed: int = 0, logits_scaling: float = 0.25, **kw):
    from transformers import GraniteConfig

    return _build(GraniteConfig(vocab_size=vocab, logits_scaling=logits_scaling, **{**_COMMON, **kw}), seed)


ARCHITECTURES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "qwen3": tiny_qwen3, "gemma2": tiny_gemma2,
                 "gpt2": tiny_gpt2, "cohere": tiny_cohere, "granite": tiny_granite}


def batch(vocab: int = 97, b: int = 3, t: int = 9, seed: int = 0, pad: bool = True):
    """input_ids (b, t) and an attention_mask with right padding in row 1 and left padding in row 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad and b > 2:
        mask[1, t - 3:] = 0
        mask[2, :2] = 0
    return ids, mask
