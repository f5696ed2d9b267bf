"""fastdistill.cache: a teacher logit cache for offline distillation.

Run the teacher once over a token dataset, keep k targets per position (at temperature T): its
top-k log-probabilities and token ids (targets="topk"), or k seeded draws from its distribution with
their log-probabilities (targets="sampled", RS-KD: unbiased, see fastdistill.cache.sampling), and
train students from the cache without the teacher:

    from fastdistill.cache import TeacherCache

    cache = TeacherCache.build("cache/", teacher, token_dataset, targets="sampled", k=64, seed=0,
                               temperature=1.0, dtype=torch.float16, shard_size=1024)
    print(cache.summary())          # 384 B/token for k=64 fp16 vs 2 * V for the full distribution
    cache = TeacherCache("cache/", expected_vocab=V, expected_targets="sampled")
    loader = DataLoader(cache, batch_size=8, shuffle=True, collate_fn=cache.collate)
    for batch in loader:            # input_ids, attention_mask, labels, sampled_logprobs,
        ...                         # sampled_indices, teacher (a TeacherTargets for the loss)

Also a command line: `python -m fastdistill.cache build ...` and `python -m fastdistill.cache info DIR`.
The format (manifest.json + safetensors shards) is described in fastdistill/cache/manifest.py.
"""
from fastdistill.cache.build import build_cache
from fastdistill.cache.collate import collate_sampled, collate_topk
from fastdistill.cache.dataset import TeacherCache
from fastdistill.cache.manifest import FORMAT_VERSION, TeacherCacheError, read_manifest
from fastdistill.cache.targets import TeacherTargets

__all__ = ["TeacherCache", "TeacherCacheError", "TeacherTargets", "build_cache", "collate_sampled", "collate_topk",
           "read_manifest", "FORMAT_VERSION"]
