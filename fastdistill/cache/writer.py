"""Writing a teacher cache: run the teacher over a token dataset, keep k targets per position (its
top k log-probabilities, or k seeded draws from its distribution), write them in shards with a
manifest; resume an interrupted build.

`write_cache` writes the files only; `TeacherCache.build` (= `build_cache`) calls it and opens the
result. This module imports no reader, so reading and writing do not import each other."""
from __future__ import annotations

import json
import math
import numbers
import os
import re
from typing import Callable, Optional

import torch

from fastdistill.cache import manifest as mf
from fastdistill.cache.manifest import TeacherCacheError
from fastdistill.cache.sampling import ESTIMATOR, METHOD, sample_teacher_targets, sequence_seed


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return int(value)


def _as_ids(item, index: int) -> torch.Tensor:
    """Dataset item -> 1-D int64 CPU tensor, with a clear error naming the item."""
    ids = item if isinstance(item, torch.Tensor) else torch.as_tensor(item)
    if ids.dim() != 1:
        raise ValueError(f"dataset[{index}]: expected a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"dataset[{index}]: expected integer token ids, got {ids.dtype}")
    ids = ids.to("cpu", torch.int64)
    if ids.numel() and (ids.min() < 0 or ids.max() > torch.iinfo(torch.int32).max):
        raise ValueError(f"dataset[{index}]: token ids must be in [0, 2**31), got range "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    return ids


def _teacher_identity(teacher, teacher_name, teacher_hash):
    if teacher_name is None:
        teacher_name = type(teacher).__name__ if isinstance(teacher, torch.nn.Module) else \
            getattr(teacher, "__qualname__", type(teacher).__name__)
    if teacher_hash is None:
        if not isinstance(teacher, torch.nn.Module):
            raise ValueError("teacher_hash: required when the teacher is not an nn.Module (pass a string that "
                             "identifies its weights, e.g. a checkpoint's sha256); it guards resumed builds")
        teacher_hash = mf.module_hash(teacher)
    if not isinstance(teacher_name, str) or not isinstance(teacher_hash, str) or not teacher_hash:
        raise TypeError("teacher_name / teacher_hash: expected non-empty strings")
    return teacher_name, teacher_hash


def _default_device(teacher, device):
    if device is not None:
        return torch.device(device)
    if isinstance(teacher, torch.nn.Module):
        for t in (*teacher.parameters(), *teacher.buffers()):
            return t.device
    return torch.device("cpu")


def _logits_of(output, batch: torch.Tensor) -> torch.Tensor:
    """The teacher's output -> (B, L, V) logits; accepts a tensor, an object with .logits (Hugging
    Face model outputs) or a tuple whose first element is the logits."""
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"teacher: expected it to return floating-point logits (B, L, V), got {type(logits).__name__}"
                        + (f" {logits.dtype}" if isinstance(logits, torch.Tensor) else ""))
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(batch.shape):
        raise ValueError(f"teacher: returned logits of shape {tuple(logits.shape)} for a token batch of shape "
                         f"{tuple(batch.shape)}; expected (B, L, V) = ({batch.shape[0]}, {batch.shape[1]}, V)")
    return logits


def _check_finite(values: torch.Tensor, index: int) -> None:
    """Refuses NaN and +inf log-probabilities. NaN or +inf anywhere in a row's logits (or all of them
    -inf) makes its log_softmax NaN, and topk ranks NaN first, so the top-k values show it. -inf is
    kept: a masked vocabulary entry has probability 0, and topk_distill_loss accepts -inf teacher
    log-probabilities (fewer than k finite entries), as collate_topk's padding does."""
    bad = torch.isnan(values) | (values == math.inf)
    if bad.any():
        position = int(bad.any(-1).nonzero()[0, 0])
        raise ValueError(f"teacher: non-finite log-probabilities for dataset[{index}] at position {position} (NaN or "
                         f"+inf in its logits / temperature); the cache refuses them (-inf, a masked entry, is kept)")


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        pass


def _progress_bar(enabled: bool, total: int, initial: int):
    """A tqdm bar, or a silent stand-in when disabled or when tqdm (a `pipeline` extra) is not installed."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            return _NoBar()
        return tqdm(total=total, initial=initial, unit="seq", desc="teacher cache")
    return _NoBar()


class _Run:
    """State of one build call: the plan, the manifest being written, the teacher."""

    def __init__(self, path, teacher, items, lengths, m, on_disk, batch_size, device, progress):
        self.path, self.teacher, self.items, self.lengths, self.m = path, teacher, items, lengths, m
        self.on_disk = on_disk  # the manifest found in `path`, or None
        self.batch_size, self.device, self.progress = batch_size, device, progress
        self.value_dtype = mf.VALUE_DTYPES[m["value_dtype"]]

    def plan(self):
        n, size = self.m["num_sequences"], self.m["shard_size"]
        for index, first in enumerate(range(0, n, size)):
            count = min(size, n - first)
            yield {"file": mf.shard_name(index), "first_sequence": first, "num_sequences": count,
                   "num_tokens": sum(self.lengths[first:first + count])}

    def is_done(self, planned: dict, recorded: Optional[dict]) -> bool:
        """A recorded shard is kept only if it matches the plan and its file's sha256 matches."""
        if recorded is None or any(recorded[key] != planned[key] for key in planned):
            return False
        file = os.path.join(self.path, planned["file"])
        return os.path.isfile(file) and mf.sha256_file(file) == recorded["sha256"]

    def _targets(self, seqs: list[torch.Tensor], first: int):
        """Teacher forward on one right-padded batch (dataset items first, first + 1, ...); per sequence
        log_softmax(logits / T).topk(k), or k draws seeded by the sequence's index alone."""
        k, temperature = self.m["k"], self.m["temperature"]
        lens = [s.numel() for s in seqs]
        out = [None] * len(seqs)
        live = [i for i, n in enumerate(lens) if n > 0]  # empty sequences never reach the teacher
        if live:
            width = max(lens)
            batch = torch.zeros((len(live), width), dtype=torch.int64)  # pad id 0: any valid id works
            for row, i in enumerate(live):
                batch[row, :lens[i]] = seqs[i]
            logits = _logits_of(self.teacher(batch.to(self.device)), batch)
            vocab = logits.shape[-1]
            if k > vocab:
                raise ValueError(f"k={k} is larger than the teacher's vocabulary size V={vocab}")
            if self.m["vocab_size"] is None:
                self.m["vocab_size"] = vocab
            elif self.m["vocab_size"] != vocab:
                raise TeacherCacheError(f"teacher cache {self.path}: vocab_size mismatch: the cache has "
                                        f"{self.m['vocab_size']}, the teacher returns V={vocab}; pass "
                                        f"overwrite=True to start over")
            for row, i in enumerate(live):
                if self.m["targets"] == "sampled":
                    values, indices = self._draw(logits[row, :lens[i]], first + i)
                else:
                    logprobs = torch.log_softmax(logits[row, :lens[i]].float() / temperature, dim=-1)
                    values, indices = logprobs.topk(k, dim=-1, sorted=True)
                    _check_finite(values, first + i)
                out[i] = (values.to(self.value_dtype).cpu(), indices.to(torch.int32).cpu())
        for i, n in enumerate(lens):
            if n == 0:
                out[i] = (torch.empty((0, k), dtype=self.value_dtype), torch.empty((0, k), dtype=torch.int32))
        return out

    def _draw(self, logits: torch.Tensor, index: int):
        """k draws per position of dataset item `index`, from a generator seeded by (seed, index) on the
        device recorded in the manifest: the same draws whatever the batch or the order of (re)builds."""
        device = self.m["sampling"]["device"]
        if logits.device.type != device:
            raise ValueError(f"teacher: returned logits on {logits.device}, but this build draws on {device} (the "
                             f"device recorded in the manifest); pass device= the device of the teacher's output")
        generator = torch.Generator(device=logits.device).manual_seed(sequence_seed(self.m["sampling"]["seed"], index))
        try:
            return sample_teacher_targets(logits, self.m["k"], self.m["temperature"], generator=generator)
        except ValueError as e:  # a row without a distribution: name the item and position like top-k does
            row = re.search(r"row (\d+)", str(e))
            if row is None:
                raise
            raise ValueError(f"teacher: non-finite log-probabilities for dataset[{index}] at position {row[1]} (NaN "
                             f"or +inf in its logits / temperature, or all of them -inf); the cache refuses them") \
                from None

    def write_shard(self, planned: dict, bar) -> dict:
        first, count = planned["first_sequence"], planned["num_sequences"]
        seqs = [_as_ids(self.items[i], i) for i in range(first, first + count)]
        for i, s in zip(range(first, first + count), seqs):
            if s.numel() != self.lengths[i]:
                raise TeacherCacheError(f"dataset[{i}] has {s.numel()} tokens now, {self.lengths[i]} when it was "
                                        f"hashed: the dataset must return the same items on every pass")
        values, indices = [], []
        for lo in range(0, count, self.batch_size):
            for v, ix in self._targets(seqs[lo:lo + self.batch_size], first + lo):
                values.append(v)
                indices.append(ix)
            bar.update(len(seqs[lo:lo + self.batch_size]))
        offsets = torch.zeros(count + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor([s.numel() for s in seqs], dtype=torch.int64).cumsum(0)
        values_name, indices_name = mf.tensor_names(self.m["targets"])
        tensors = {"input_ids": torch.cat(seqs).to(torch.int32), "offsets": offsets,
                   values_name: torch.cat(values).contiguous(), indices_name: torch.cat(indices).contiguous()}
        # One metadata key: safetensors writes a multi-key metadata map in random order, and the
        # same inputs must give the same shard bytes (resume checks, reproducible hashes).
        info = {"format": mf.FORMAT, "format_version": mf.FORMAT_VERSION, "first_sequence": first,
                "num_sequences": count, "k": self.m["k"], "temperature": self.m["temperature"],
                "targets": self.m["targets"]}
        if self.m["sampling"] is not None:
            info["sampling_seed"] = self.m["sampling"]["seed"]
        meta = {"fastdistill": json.dumps(info, sort_keys=True)}
        file = os.path.join(self.path, planned["file"])
        mf.atomic_write(file, lambda tmp: mf.save_safetensors(tensors, tmp, metadata=meta))
        return {**planned, "sha256": mf.sha256_file(file)}

    def run(self) -> None:
        recorded = {s["file"]: s for s in self.m["shards"]}
        plan = list(self.plan())
        done = {p["file"] for p in plan if self.is_done(p, recorded.get(p["file"]))}
        self.m["shards"] = [recorded[p["file"]] for p in plan if p["file"] in done]
        self.m["complete"] = len(done) == len(plan)
        if self.m != mf.without_hash(self.on_disk) or mf.HASH_KEY not in self.on_disk:
            mf.write_manifest(self.path, self.m)  # also drops records of shards that failed the check
        finished = sum(p["num_sequences"] for p in plan if p["file"] in done)
        with _progress_bar(self.progress, self.m["num_sequences"], finished) as bar:
            for p in plan:
                if p["file"] in done:
                    continue
                self.m["shards"].append(self.write_shard(p, bar))
                self.m["shards"].sort(key=lambda s: s["first_sequence"])
                self.m["complete"] = len(self.m["shards"]) == len(plan)
                mf.write_manifest(self.path, self.m)


def _prepare_dir(path: str, overwrite: bool) -> Optional[dict]:
    """Creates the directory; returns the existing manifest to resume from, or None."""
    os.makedirs(path, exist_ok=True)
    if overwrite:
        # The manifest goes first: an interruption mid-cleanup then leaves no cache, not a wrong one.
        names = sorted(os.listdir(path), key=lambda name: name != mf.MANIFEST_NAME)
        for name in names:
            if mf.is_cache_file(name) and os.path.isfile(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
        return None
    for name in os.listdir(path):  # temporary files of a build killed mid-write (one build per directory)
        if name.startswith(mf.TMP_PREFIX) and os.path.isfile(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    if not os.path.exists(os.path.join(path, mf.MANIFEST_NAME)):
        return None
    try:
        return mf.read_manifest(path)
    except TeacherCacheError as e:
        raise TeacherCacheError(f"{e}; cannot resume this build: pass overwrite=True to start over") from None


def write_cache(path, teacher: Callable[[torch.Tensor], torch.Tensor], dataset, *, targets: str = "topk",
                k: int = 64, temperature: float = 1.0, seed: int = 0, dtype=torch.float16, batch_size: int = 8,
                shard_size: int = 1024, teacher_name: Optional[str] = None, teacher_hash: Optional[str] = None,
                device=None, progress: bool = True, overwrite: bool = False) -> None:
    """Runs `teacher` over every sequence of `dataset` and caches k targets per position: its top-k
    log-probabilities (targets="topk") or k draws from its distribution (targets="sampled").

    teacher      callable mapping an int64 (B, L) token batch to logits (B, L, V) (a tensor, a
                 Hugging Face output with .logits, or a tuple starting with the logits). An nn.Module
                 is put in eval mode for the build (its mode is restored after); calls run under
                 torch.inference_mode. The teacher is not moved: batches go to `device`, by default
                 the device of the module's first parameter, else the CPU.
    dataset      item i is a 1-D integer tensor (or list) of token ids, any length (0 included);
                 anything with len() and indexing, or an iterable (materialized into a list).
                 It is read twice (once to hash the token stream) and must return the same items.
    targets      "topk": log_softmax(logits.float() / temperature).topk(k), sorted descending.
                 "sampled" (RS-KD, estimator "counts", see fastdistill.cache.sampling): k draws with
                 replacement from softmax(logits.float() / temperature), ids ascending with duplicates,
                 and the log-probability of each draw. Sequence i draws with its own generator,
                 seeded by sequence_seed(seed, i) on the device of the teacher's logits, so its draws
                 depend on neither batch_size nor the order shards are (re)built; the manifest records
                 the seed, the estimator and that device type (other devices draw other ids).
    k, temperature, dtype   k targets per position (k <= V), values cast to dtype (torch.float16 or
                 torch.bfloat16), ids int32: k * (2 + 4) bytes per token for either target type.
    seed         the sampling seed (targets="sampled" only; a top-k cache ignores it).
    batch_size   sequences per teacher call. Shorter sequences are padded on the right (with id 0)
                 and the padding is dropped: a causal teacher gives the same logits at the real
                 positions. A non-causal teacher (bidirectional attention) would see the padding: use
                 batch_size=1 or sequences of equal length.
    shard_size   sequences per shard file; a resumed build redoes at most one unfinished shard.
    teacher_name, teacher_hash   identify the teacher in the manifest. For an nn.Module the hash
                 defaults to the sha256 of its state_dict; other callables must pass teacher_hash.
    overwrite    delete an existing cache in `path` (manifest and shard files only) and start over.

    If `path` holds a cache built with the same targets, k, temperature, dtype, teacher hash, token
    stream, shard size (and sampling seed and device type), the build resumes: shard files whose
    sha256 matches the manifest are kept untouched (each is re-hashed to check), missing or corrupt
    ones are (re)written, with the same bytes (sampled draws included). Different parameters raise a
    TeacherCacheError naming the field (e.g. "sampling.seed mismatch"), unless no shard was finished yet.
    A teacher returning NaN or +inf logits is refused (ValueError naming the item and position); -inf
    logits (masked vocabulary entries) are allowed and may appear as -inf top-k values.
    `TeacherCache.build` (= `build_cache`) calls this and returns the finished cache, opened for reading.
    """
    path = os.fspath(path)
    if targets not in mf.TARGETS:
        raise ValueError(f"targets: expected one of {mf.TARGETS}, got {targets!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
    k = _positive_int("k", k)
    batch_size = _positive_int("batch_size", batch_size)
    shard_size = _positive_int("shard_size", shard_size)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    value_dtype = mf.value_dtype_name(dtype)
    if not callable(teacher):
        raise TypeError(f"teacher: expected a callable (B, L) token ids -> (B, L, V) logits, got "
                        f"{type(teacher).__name__}")
    teacher_name, teacher_hash = _teacher_identity(teacher, teacher_name, teacher_hash)
    items = dataset if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__") else list(dataset)

    hasher, lengths = mf.TokenStreamHasher(), []
    for i in range(len(items)):
        ids = _as_ids(items[i], i)
        hasher.update(ids)
        lengths.append(ids.numel())
    if sum(lengths) == 0:
        raise ValueError(f"dataset: no tokens to cache ({len(lengths)} sequences, all empty)")

    import fastdistill

    device = _default_device(teacher, device)
    sampling = None
    if targets == "sampled":
        sampling = {"method": METHOD, "estimator": ESTIMATOR, "seed": int(seed), "device": device.type}
    wanted = {"format": mf.FORMAT, "format_version": mf.FORMAT_VERSION, "targets": targets, "sampling": sampling,
              "k": k, "temperature": float(temperature),
              "vocab_size": None, "teacher_name": teacher_name, "teacher_hash": teacher_hash,
              "value_dtype": value_dtype, "num_sequences": len(lengths), "num_tokens": sum(lengths),
              "shard_size": shard_size, "token_stream_hash": hasher.hexdigest(), "shards": [], "complete": False,
              "fastdistill_version": getattr(fastdistill, "__version__", None)}
    existing = _prepare_dir(path, overwrite)
    if existing is not None and existing["shards"]:  # saved work: resume it, or refuse to mix
        have, want = mf.build_fields(existing), mf.build_fields(wanted)
        for key in mf.BUILD_KEYS:
            if have[key] != want[key]:
                raise TeacherCacheError(f"teacher cache {path}: {key} mismatch: the cache was built with "
                                        f"{have[key]!r}, this build asks for {want[key]!r}; pass "
                                        f"overwrite=True to start over (or use another directory)")
        wanted.update(vocab_size=existing["vocab_size"], shards=existing["shards"])

    run = _Run(path, teacher, items, lengths, wanted, existing, batch_size, device, progress)
    was_training = isinstance(teacher, torch.nn.Module) and teacher.training
    if isinstance(teacher, torch.nn.Module):
        teacher.eval()
    try:
        with torch.inference_mode():
            run.run()
    finally:
        if was_training:
            teacher.train()
