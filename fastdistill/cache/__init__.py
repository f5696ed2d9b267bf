"""fastdistill.cache: a teacher logit cache for offline distillation.

Run the teacher once over a token dataset, keep only the top-k log-probabilities of each position
(at temperature T) and their token ids, and train students from the cache without the teacher:

    from fastdistill.cache import TeacherCache, collate_topk

    cache = TeacherCache.build("cache/", teacher, token_dataset, k=64, temperature=1.0,
                               dtype=torch.float16, shard_size=1024)
    print(cache.summary())          # 384 B/token for k=64 fp16 vs 2 * V for the full distribution
    loader = DataLoader(TeacherCache("cache/", expected_vocab=V), batch_size=8, shuffle=True,
                        collate_fn=collate_topk)
    for batch in loader:            # input_ids, attention_mask, labels, topk_logprobs, topk_indices
        ...

Also a command line: `python -m fastdistill.cache build ...` and `python -m fastdistill.cache info DIR`.
The format (manifest.json + safetensors shards) is described in fastdistill/cache/manifest.py.
"""
from fastdistill.cache.build import build_cache
from fastdistill.cache.dataset import TeacherCache, collate_topk
from fastdistill.cache.manifest import FORMAT_VERSION, TeacherCacheError, read_manifest

__all__ = ["TeacherCache", "TeacherCacheError", "build_cache", "collate_topk", "read_manifest", "FORMAT_VERSION"]
