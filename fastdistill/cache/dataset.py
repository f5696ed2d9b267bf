"""Reading a teacher cache: `TeacherCache`, a torch Dataset aligned with the token stream, whose
`collate` pads a batch of its items for a DataLoader (collate_topk / collate_sampled live in
fastdistill/cache/collate.py)."""
from __future__ import annotations

import bisect
import copy
import math
import operator
import os
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from fastdistill.cache import manifest as mf
from fastdistill.cache.collate import collate_sampled, collate_topk
from fastdistill.cache.manifest import TeacherCacheError
from fastdistill.cache.targets import TeacherTargets
from fastdistill.cache.writer import write_cache

__all__ = ["TeacherCache", "collate_sampled", "collate_topk"]

_OPEN_SHARDS = 4  # safe_open handles kept per process; a shuffled DataLoader hops between shards


class TeacherCache(Dataset):
    """Teacher targets cached on disk, one item per sequence of the token stream it was built from.
    Item i of a top-k cache (targets="topk") is a dict:
        input_ids      (L,)    int64     the tokens of dataset item i
        topk_logprobs  (L, k)  float16 | bfloat16   log_softmax(teacher_logits / T), top k, descending
        topk_indices   (L, k)  int32     their token ids
    and of a sampled cache (targets="sampled", see fastdistill.cache.sampling):
        input_ids         (L,)    int64
        sampled_logprobs  (L, k)  float16 | bfloat16   log_softmax(teacher_logits / T) at each draw
        sampled_indices   (L, k)  int32     k draws with replacement, ascending, duplicates kept
    `cache.collate` pads a list of items and adds a TeacherTargets (batch["teacher"]) that the losses
    check against their call (kind, temperature, vocabulary).
    Position t holds the teacher's distribution at position t (for a causal LM: over token t + 1),
    aligned with the student's logits at position t. Build one with `TeacherCache.build`.

    Opening checks the manifest, that every shard file exists and that its tensor shapes and dtypes
    agree with the manifest (headers only); `verify=True` also compares each file's sha256 and the
    manifest's own sha256 (so an edited vocab_size, count or shard hash is caught). expected_vocab,
    expected_k, expected_temperature and expected_targets ("topk" | "sampled") raise a
    TeacherCacheError naming the field when the cache differs.
    Shards are read lazily, by rows, through memory-mapped safetensors files.
    """

    def __init__(self, path: str, *, expected_vocab: Optional[int] = None, expected_k: Optional[int] = None,
                 expected_temperature: Optional[float] = None, expected_targets: Optional[str] = None,
                 verify: bool = False):
        self.path = os.fspath(path)
        if expected_targets is not None and expected_targets not in mf.TARGETS:
            raise ValueError(f"expected_targets: expected one of {mf.TARGETS} or None, got {expected_targets!r}")
        m = mf.read_manifest(self.path)
        if not m["complete"]:
            done = sum(s["num_sequences"] for s in m["shards"])
            raise TeacherCacheError(
                f"teacher cache {self.path} is incomplete ({len(m['shards'])} shards, {done} of "
                f"{m['num_sequences']} sequences written): its build was interrupted or is still running; "
                f"rerun TeacherCache.build (or `python -m fastdistill.cache build`) with the same arguments "
                f"to resume it")
        mf.check_complete_layout(m, self.path)
        if expected_vocab is not None and m["vocab_size"] != expected_vocab:
            raise TeacherCacheError(f"teacher cache {self.path}: vocab_size is {m['vocab_size']}, expected "
                                    f"{expected_vocab}")
        if expected_k is not None and m["k"] != expected_k:
            raise TeacherCacheError(f"teacher cache {self.path}: k is {m['k']}, expected {expected_k}")
        if expected_temperature is not None and not math.isclose(m["temperature"], expected_temperature, rel_tol=1e-6):
            raise TeacherCacheError(f"teacher cache {self.path}: temperature is {m['temperature']}, expected "
                                    f"{expected_temperature} (log-probabilities at one temperature are not those at "
                                    f"another)")
        if expected_targets is not None and mf.targets_of(m) != expected_targets:
            raise TeacherCacheError(f"teacher cache {self.path}: targets is {mf.targets_of(m)!r}, expected "
                                    f"{expected_targets!r}")
        if verify:
            mf.check_manifest_hash(m, self.path)
        self._manifest = m
        self._value_dtype = mf.VALUE_DTYPES[m["value_dtype"]]
        self._starts = [s["first_sequence"] for s in m["shards"]]
        for s in m["shards"]:
            self._check_shard(s, verify)
        self._offsets: dict[int, list[int]] = {}
        self._handles: OrderedDict = OrderedDict()

    @classmethod
    def open(cls, path: str, **kwargs) -> "TeacherCache":
        """Same as TeacherCache(path, ...)."""
        return cls(path, **kwargs)

    @staticmethod
    def build(path, teacher, dataset, *, targets: str = "topk", k: int = 64, temperature: float = 1.0,
              seed: int = 0, dtype=torch.float16, batch_size: int = 8, shard_size: int = 1024,
              teacher_name: Optional[str] = None, teacher_hash: Optional[str] = None, device=None,
              progress: bool = True, overwrite: bool = False) -> "TeacherCache":
        """Runs `teacher` over `dataset`, writes (or resumes) the cache in `path` and opens it.
        The arguments are those of fastdistill.cache.writer.write_cache, documented there
        (targets="topk" | "sampled"; seed: the sampling seed)."""
        write_cache(path, teacher, dataset, targets=targets, k=k, temperature=temperature, seed=seed, dtype=dtype,
                    batch_size=batch_size, shard_size=shard_size, teacher_name=teacher_name,
                    teacher_hash=teacher_hash, device=device, progress=progress, overwrite=overwrite)
        return TeacherCache(path)

    # -- checks -----------------------------------------------------------------------------------

    def _file(self, shard: dict) -> str:
        return os.path.join(self.path, shard["file"])

    def _check_shard(self, s: dict, verify: bool) -> None:
        file = self._file(s)
        if not os.path.isfile(file):
            raise TeacherCacheError(f"teacher cache {self.path}: shard file {s['file']} is missing (rerun build "
                                    f"with the same arguments to rewrite it)")
        if verify:
            digest = mf.sha256_file(file)
            if digest != s["sha256"]:
                raise TeacherCacheError(f"teacher cache {self.path}: shard file {s['file']} is corrupt: sha256 "
                                        f"{digest}, the manifest says {s['sha256']} (rerun build to rewrite it)")
        k, n, t = self.k, s["num_sequences"], s["num_tokens"]
        values_name, indices_name = mf.tensor_names(self.targets)
        want = {"input_ids": ((t,), "I32"), "offsets": ((n + 1,), "I64"),
                values_name: ((t, k), {"float16": "F16", "bfloat16": "BF16"}[self._manifest["value_dtype"]]),
                indices_name: ((t, k), "I32")}
        try:
            with safe_open(file, framework="pt") as f:
                keys = set(f.keys())
                got = {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
                       for name in want if name in keys}
        except Exception as e:  # safetensors raises its own error type for torn or foreign files
            raise TeacherCacheError(f"teacher cache {self.path}: shard file {s['file']} is unreadable ({e}); "
                                    f"rerun build to rewrite it") from None
        for name, (shape, dtype) in want.items():
            if name not in got:
                raise TeacherCacheError(f"teacher cache {self.path}: shard file {s['file']} has no tensor {name!r}")
            if got[name] != (shape, dtype):
                raise TeacherCacheError(f"teacher cache {self.path}: shard file {s['file']}: {name} is "
                                        f"{got[name][1]} {list(got[name][0])}, the manifest implies {dtype} "
                                        f"{list(shape)}")

    def verify(self) -> None:
        """Checks the manifest's sha256, re-hashes every shard file and compares with the manifest;
        raises TeacherCacheError."""
        mf.check_manifest_hash(self._manifest, self.path)
        for s in self._manifest["shards"]:
            self._check_shard(s, verify=True)

    # -- reading ----------------------------------------------------------------------------------

    def __getstate__(self):  # DataLoader workers under spawn pickle the dataset; handles don't pickle
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def _handle(self, shard_index: int):
        h = self._handles.get(shard_index)
        if h is None:
            h = safe_open(self._file(self._manifest["shards"][shard_index]), framework="pt")
            self._handles[shard_index] = h
            if len(self._handles) > _OPEN_SHARDS:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(shard_index)
        return h

    def _shard_offsets(self, shard_index: int) -> list[int]:
        offsets = self._offsets.get(shard_index)
        if offsets is None:
            s = self._manifest["shards"][shard_index]
            offsets = self._handle(shard_index).get_tensor("offsets").tolist()
            ok = (offsets[0] == 0 and offsets[-1] == s["num_tokens"]
                  and all(a <= b for a, b in zip(offsets, offsets[1:])))
            if not ok:
                raise TeacherCacheError(f"teacher cache {self.path}: shard file {s['file']} has offsets that do not "
                                        f"cover its {s['num_tokens']} tokens in order")
            self._offsets[shard_index] = offsets
        return offsets

    def __len__(self) -> int:
        return self._manifest["num_sequences"]

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        index = _as_index(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"TeacherCache index {index} out of range for {n} sequences")
        shard = bisect.bisect_right(self._starts, index) - 1
        offsets = self._shard_offsets(shard)
        j = index - self._starts[shard]
        lo, hi = offsets[j], offsets[j + 1]
        h = self._handle(shard)
        values_name, indices_name = mf.tensor_names(self.targets)
        # Slices read only these rows from the mmap; clone so no item pins the shard's pages.
        return {"input_ids": h.get_slice("input_ids")[lo:hi].to(torch.int64),
                values_name: h.get_slice(values_name)[lo:hi].clone(),
                indices_name: h.get_slice(indices_name)[lo:hi].clone()}

    def collate(self, batch: Sequence[dict], *, pad_id: int = 0, label_pad: int = -100) -> dict:
        """Pads a list of this cache's items (DataLoader(cache, collate_fn=cache.collate); a bound method
        of a picklable cache, so it travels to DataLoader workers): the keys of collate_topk (top-k) or
        collate_sampled (sampled), plus batch["teacher"], a TeacherTargets with this cache's kind,
        temperature, vocabulary and estimator, which the losses take in place of (logprobs, indices)
        and check against their call. Padding: top-k rows -inf, sampled rows id 0 at log-probability 0
        (see collate_sampled); either way mask them out with labels."""
        if self.targets == "topk":
            out = collate_topk(batch, pad_id=pad_id, label_pad=label_pad)
        else:
            out = collate_sampled(batch, pad_id=pad_id, label_pad=label_pad)
        values_name, indices_name = mf.tensor_names(self.targets)
        if out[values_name].shape[-1] != self.k:
            raise ValueError(f"batch: items have k={out[values_name].shape[-1]}, this cache has k={self.k} (items of "
                             f"another cache?)")
        sampling = self._manifest.get("sampling")
        out["teacher"] = TeacherTargets(self.targets, out[values_name], out[indices_name], self.temperature,
                                        self.vocab_size, None if sampling is None else sampling["estimator"])
        return out

    # -- metadata ---------------------------------------------------------------------------------

    @property
    def manifest(self) -> dict:
        """A copy of the manifest (see fastdistill/cache/manifest.py for the fields)."""
        return copy.deepcopy(self._manifest)

    @property
    def targets(self) -> str:
        """"topk" or "sampled" (a version-1 cache is "topk")."""
        return mf.targets_of(self._manifest)

    @property
    def sampling(self) -> Optional[dict]:
        """A sampled cache's {"method", "estimator", "seed", "device"}; None for top-k."""
        return copy.deepcopy(self._manifest.get("sampling"))

    @property
    def k(self) -> int:
        return self._manifest["k"]

    @property
    def temperature(self) -> float:
        return float(self._manifest["temperature"])

    @property
    def vocab_size(self) -> int:
        return self._manifest["vocab_size"]

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the stored log-probabilities (topk_logprobs / sampled_logprobs)."""
        return self._value_dtype

    @property
    def num_sequences(self) -> int:
        return self._manifest["num_sequences"]

    @property
    def num_tokens(self) -> int:
        return self._manifest["num_tokens"]

    @property
    def num_shards(self) -> int:
        return len(self._manifest["shards"])

    @property
    def teacher_name(self) -> str:
        return self._manifest["teacher_name"]

    @property
    def teacher_hash(self) -> str:
        return self._manifest["teacher_hash"]

    @property
    def bytes_per_token(self) -> int:
        """Bytes of the k values + int32 ids per token, top-k or sampled (k=64, float16: 64 * (2 + 4) = 384)."""
        return mf.bytes_per_token(self.k, self._manifest["value_dtype"])

    @property
    def full_vocab_bytes_per_token(self) -> int:
        """Bytes per token of the full distribution in the same dtype (vocab_size * 2)."""
        return mf.full_vocab_bytes_per_token(self.vocab_size, self._manifest["value_dtype"])

    @property
    def compression_ratio(self) -> float:
        """full_vocab_bytes_per_token / bytes_per_token."""
        return self.full_vocab_bytes_per_token / self.bytes_per_token

    def summary(self) -> str:
        return mf.summarize(self._manifest, self.path)

    def __repr__(self) -> str:
        return (f"TeacherCache({self.path!r}, targets={self.targets}, sequences={self.num_sequences}, "
                f"tokens={self.num_tokens}, k={self.k}, "
                f"temperature={self.temperature:g}, vocab_size={self.vocab_size}, "
                f"dtype={self._manifest['value_dtype']})")


def _as_index(index) -> int:
    """An int, a numpy integer or a 0-d integer tensor (what samplers hand out); bools, floats,
    strings and multi-element tensors are refused rather than truncated or parsed."""
    ok = not isinstance(index, (bool, str, bytes))
    if isinstance(index, torch.Tensor):
        ok = index.dim() == 0 and index.dtype != torch.bool and not (index.is_floating_point() or index.is_complex())
    if ok:
        try:
            return operator.index(index)
        except TypeError:  # floats, numpy bools, objects without __index__
            pass
    raise TypeError(f"index: expected an integer (int, numpy or 0-d torch integer), got {index!r} of type "
                    f"{type(index).__name__}")
