"""The teacher cache's on-disk format: manifest schema, validation, hashes, atomic writes, summary.

A cache directory holds `manifest.json` and shards `shard-00000.safetensors`, ... Each shard holds
a contiguous run of sequences:
    input_ids      (tokens,)      int32   the sequences' tokens, concatenated
    offsets        (seqs + 1,)    int64   sequence j is input_ids[offsets[j]:offsets[j + 1]]
    topk_logprobs  (tokens, k)    float16 | bfloat16   log_softmax(logits / T), top k, descending
    topk_indices   (tokens, k)    int32   their token ids
or, in a cache built with targets="sampled" (format_version 2), in place of the topk_* tensors:
    sampled_logprobs (tokens, k)  float16 | bfloat16   log_softmax(logits / T) at each draw
    sampled_indices  (tokens, k)  int32   k draws with replacement from softmax(logits / T), ascending
The manifest's `targets` ("topk" | "sampled") says which; a sampled cache's `sampling` records the
method, the estimator, the seed and the device type the draws were made on (fastdistill/cache/sampling.py).
A version-1 manifest (no `targets`) is a top-k cache.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from fastdistill.cache import sampling

FORMAT = "fastdistill.teacher_cache"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)  # version 1: top-k caches before sampled targets (no `targets` key)
TARGETS = ("topk", "sampled")
MANIFEST_NAME = "manifest.json"
TMP_PREFIX = ".tmp-"
HASH_KEY = "manifest_sha256"  # sha256 of the manifest's other fields: TeacherCache(verify=True) checks it
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
INDEX_BYTES = 4  # int32 token ids

# Parameters a resumed build must share with the cache on disk (vocab_size is checked once the
# teacher has produced logits); "sampling.<key>" are fields of the sampling record (see build_fields).
BUILD_KEYS = ("targets", "k", "temperature", "value_dtype", "teacher_hash", "token_stream_hash", "num_sequences",
              "num_tokens", "shard_size", "sampling.method", "sampling.estimator", "sampling.seed",
              "sampling.device")

_TOP_KEYS = {"format": str, "format_version": int, "k": int, "temperature": float, "vocab_size": (int, type(None)),
             "teacher_name": str, "teacher_hash": str, "value_dtype": str, "num_sequences": int, "num_tokens": int,
             "shard_size": int, "token_stream_hash": str, "shards": list, "complete": bool}
_SAMPLING_KEYS = {"method": str, "estimator": str, "seed": int, "device": str}
_SHARD_KEYS = {"file": str, "first_sequence": int, "num_sequences": int, "num_tokens": int, "sha256": str}


class TeacherCacheError(ValueError):
    """A teacher cache on disk is missing, corrupt, incomplete or does not match what was asked for."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def is_cache_file(name: str) -> bool:
    """Files a build owns (and `overwrite=True` may delete); anything else in the directory is left alone."""
    return (name == MANIFEST_NAME or name.startswith(TMP_PREFIX)
            or (name.startswith("shard-") and name.endswith(".safetensors")))


def value_dtype_name(dtype) -> str:
    """'float16' | 'bfloat16' from a torch dtype or a name ('fp16', 'bf16' accepted)."""
    aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = aliases.get(dtype, dtype)
    else:
        raise TypeError(f"dtype: expected torch.float16 or torch.bfloat16, got {dtype!r}")
    if name not in VALUE_DTYPES:
        raise ValueError(f"dtype: top-k values are stored as float16 or bfloat16, got {dtype}")
    return name


def targets_of(m: dict) -> str:
    """"topk" | "sampled"; a version-1 manifest has no `targets` and is a top-k cache."""
    return m.get("targets", "topk")


def tensor_names(targets: str) -> tuple[str, str]:
    """The shard (and item) names of the log-probabilities and ids: topk_* or sampled_*."""
    return f"{targets}_logprobs", f"{targets}_indices"


def build_fields(m: dict) -> dict:
    """BUILD_KEYS -> value, read from a manifest of any version (absent sampling fields are None)."""
    sampling = m.get("sampling") or {}
    return {key: (sampling.get(key.split(".", 1)[1]) if key.startswith("sampling.") else
                  targets_of(m) if key == "targets" else m[key]) for key in BUILD_KEYS}


def bytes_per_token(k: int, value_dtype: str) -> int:
    """Stored bytes per token for the k values and their int32 ids (input ids not counted); the same
    for top-k and sampled targets."""
    return k * (VALUE_DTYPES[value_dtype].itemsize + INDEX_BYTES)


def full_vocab_bytes_per_token(vocab_size: int, value_dtype: str) -> int:
    """What caching the full distribution would cost per token, in the same value dtype."""
    return vocab_size * VALUE_DTYPES[value_dtype].itemsize


# ---------------------------------------------------------------------------------------------
# Hashes

def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())  # any dtype, bf16 included, without a copy


def module_hash(module: torch.nn.Module) -> str:
    """sha256 over the state_dict in sorted key order: each key, dtype and shape, then the raw bytes."""
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        h.update(f"{key}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode())
        h.update(_tensor_bytes(t))
    return "sha256:" + h.hexdigest()


class TokenStreamHasher:
    """sha256 over the sequences in order: each one's length (int64 LE), then its ids (int64 LE).
    Lengths are hashed so that [1, 2], [3] and [1], [2, 3] differ."""

    def __init__(self):
        self._h = hashlib.sha256()

    def update(self, ids: torch.Tensor) -> None:
        self._h.update(int(ids.numel()).to_bytes(8, "little", signed=True))
        self._h.update(_tensor_bytes(ids.to(torch.int64)))

    def hexdigest(self) -> str:
        return "sha256:" + self._h.hexdigest()


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Atomic writes: temp file in the same directory, fsync, os.replace, fsync the directory.

def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None], tmp: str | None = None) -> None:
    """Calls write(tmp) and moves the result to `path` only once it is complete on disk, so a crash
    leaves either the old file or the new one, never a torn one; a failed write (ENOSPC) removes tmp.
    tmp: the temporary file's path (default: a fresh TMP_PREFIX file next to `path`)."""
    directory = os.path.dirname(os.path.abspath(path))
    if tmp is None:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".part", dir=directory)
        os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """safetensors' save_file with its I/O failures raised as OSError (errno kept): safetensors reports a
    full or read-only disk as SafetensorError("... I/O error: No space left on device (os error 28)")."""
    try:
        save_file(tensors, path, metadata=metadata)
    except OSError:
        raise
    except Exception as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), path) from None


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest without its HASH_KEY, in canonical JSON (sorted keys, no whitespace)."""
    body = {k: v for k, v in manifest.items() if k != HASH_KEY}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def without_hash(manifest):
    return None if manifest is None else {k: v for k, v in manifest.items() if k != HASH_KEY}


def check_manifest_hash(m: dict, path: str) -> None:
    """Any edit of the manifest after its build (a vocab_size, a count, a shard's sha256) is refused."""
    where = f"teacher cache manifest {os.path.join(path, MANIFEST_NAME)}"
    if HASH_KEY not in m:
        raise TeacherCacheError(f"{where}: no {HASH_KEY} (written by an older fastdistill), so it cannot be verified; "
                                f"rebuild with overwrite=True")
    if manifest_digest(m) != m[HASH_KEY]:
        raise TeacherCacheError(f"{where}: was edited or is corrupt: its sha256 {manifest_digest(m)} differs from its "
                                f"{HASH_KEY} {m[HASH_KEY]} (rebuild with overwrite=True)")


def write_manifest(directory: str, manifest: dict) -> None:
    body = json.loads(json.dumps(without_hash(manifest)))  # hash what a reader will parse
    text = json.dumps({**body, HASH_KEY: manifest_digest(body)}, indent=2) + "\n"

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(os.path.join(directory, MANIFEST_NAME), write)


# ---------------------------------------------------------------------------------------------
# Reading and validation

def _check_fields(obj: Any, schema: dict, where: str) -> None:
    if not isinstance(obj, dict):
        raise TeacherCacheError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key, types in schema.items():
        if key not in obj:
            raise TeacherCacheError(f"{where}: missing key {key!r}")
        value = obj[key]
        if types is float and isinstance(value, int) and not isinstance(value, bool):
            continue  # JSON writes 1.0 as 1.0, but hand-edited manifests may say 1
        bad_bool = isinstance(value, bool) and types is not bool
        if bad_bool or not isinstance(value, types):
            want = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
            raise TeacherCacheError(f"{where}: key {key!r} should be {want}, got {value!r}")


def validate_manifest(m: Any, path: str) -> dict:
    """Structure and internal consistency; raises TeacherCacheError naming the problem."""
    where = f"teacher cache manifest {path}"
    if isinstance(m, dict) and m.get("format") not in (None, FORMAT):
        raise TeacherCacheError(f"{where}: format is {m.get('format')!r}, expected {FORMAT!r}")
    if isinstance(m, dict) and "format_version" in m and m["format_version"] not in READ_VERSIONS:
        raise TeacherCacheError(f"{where}: unsupported format_version {m['format_version']!r} (this fastdistill "
                                f"reads versions {READ_VERSIONS}); rebuild the cache with build(..., overwrite=True)")
    _check_fields(m, _TOP_KEYS, where)
    _check_targets(m, where)
    if m["value_dtype"] not in VALUE_DTYPES:
        raise TeacherCacheError(f"{where}: value_dtype {m['value_dtype']!r} is not one of {sorted(VALUE_DTYPES)}")
    if m["k"] < 1 or m["shard_size"] < 1 or m["num_sequences"] < 0 or m["num_tokens"] < 0:
        raise TeacherCacheError(f"{where}: k and shard_size must be >= 1 and counts >= 0")
    if not (math.isfinite(m["temperature"]) and m["temperature"] > 0):
        raise TeacherCacheError(f"{where}: temperature must be > 0, got {m['temperature']}")
    if m["vocab_size"] is not None and m["vocab_size"] < m["k"]:
        raise TeacherCacheError(f"{where}: vocab_size {m['vocab_size']} is smaller than k {m['k']}")
    if HASH_KEY in m and not isinstance(m[HASH_KEY], str):
        raise TeacherCacheError(f"{where}: key {HASH_KEY!r} should be str, got {m[HASH_KEY]!r}")
    for i, s in enumerate(m["shards"]):
        _check_fields(s, _SHARD_KEYS, f"{where}: shards[{i}]")
        if os.path.basename(s["file"]) != s["file"] or not is_cache_file(s["file"]):
            raise TeacherCacheError(f"{where}: shards[{i}] file {s['file']!r} is not a shard file name")
    return m


def _check_targets(m: dict, where: str) -> None:
    """`targets` (required from version 2) and, for sampled targets, a `sampling` record this
    fastdistill can read: the draws' method and estimator are the ones the sampled losses implement."""
    if m["format_version"] == 1:
        if "targets" in m or "sampling" in m:
            raise TeacherCacheError(f"{where}: format_version 1 has no targets/sampling keys (version 2 does)")
        return
    if "targets" not in m:
        raise TeacherCacheError(f"{where}: missing key 'targets'")
    if m["targets"] not in TARGETS:
        raise TeacherCacheError(f"{where}: targets {m['targets']!r} is not one of {TARGETS}")
    if m["targets"] == "topk":
        if m.get("sampling") is not None:
            raise TeacherCacheError(f"{where}: a top-k cache has no sampling record, got {m['sampling']!r}")
        return
    _check_fields(m.get("sampling"), _SAMPLING_KEYS, f"{where}: sampling")
    for key, known in (("method", sampling.METHOD), ("estimator", sampling.ESTIMATOR)):
        if m["sampling"][key] != known:
            raise TeacherCacheError(f"{where}: sampling {key} {m['sampling'][key]!r} is not one this fastdistill "
                                    f"reads ({known!r})")


def read_manifest(path: str) -> dict:
    """The manifest of the cache directory `path`, validated but not required to be complete."""
    file = os.path.join(path, MANIFEST_NAME)
    if not os.path.isdir(path):
        raise TeacherCacheError(f"teacher cache {path}: no such directory")
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise TeacherCacheError(f"teacher cache {path}: {MANIFEST_NAME} not found (not a teacher cache, or its "
                                f"build never started)") from None
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise TeacherCacheError(f"teacher cache manifest {file}: not valid JSON ({e})") from None
    return validate_manifest(m, file)


def check_complete_layout(m: dict, path: str) -> None:
    """A complete manifest's shards must tile [0, num_sequences) in order and sum to num_tokens."""
    where = f"teacher cache manifest {os.path.join(path, MANIFEST_NAME)}"
    if m["vocab_size"] is None:
        raise TeacherCacheError(f"{where}: vocab_size is null in a complete cache")
    next_seq = tokens = 0
    for i, s in enumerate(m["shards"]):
        if s["first_sequence"] != next_seq or s["num_sequences"] < 0 or s["num_tokens"] < 0:
            raise TeacherCacheError(f"{where}: shards[{i}] ({s['file']}) starts at sequence {s['first_sequence']}, "
                                    f"expected {next_seq}")
        next_seq += s["num_sequences"]
        tokens += s["num_tokens"]
    if next_seq != m["num_sequences"] or tokens != m["num_tokens"]:
        raise TeacherCacheError(f"{where}: shards hold {next_seq} sequences / {tokens} tokens, the manifest says "
                                f"{m['num_sequences']} / {m['num_tokens']}")


# ---------------------------------------------------------------------------------------------
# Summary

def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def summarize(m: dict, path: str) -> str:
    """Human-readable summary of a manifest (complete or not)."""
    done_seqs = sum(s["num_sequences"] for s in m["shards"])
    n_shards = -(-m["num_sequences"] // m["shard_size"])
    state = ("complete" if m["complete"] else
             f"INCOMPLETE: {len(m['shards'])}/{n_shards} shards, {done_seqs}/{m['num_sequences']} sequences "
             f"(rerun build with the same arguments to resume)")
    bpt = bytes_per_token(m["k"], m["value_dtype"])
    kind = targets_of(m)
    label = "top-k" if kind == "topk" else "sampled"
    lines = [f"teacher cache {path}: {state}",
             f"  teacher       {m['teacher_name']} ({m['teacher_hash']})",
             f"  sequences     {m['num_sequences']:,} in {n_shards} shards of <= {m['shard_size']:,}",
             f"  tokens        {m['num_tokens']:,}"]
    if kind == "topk":
        lines.append(f"  targets       topk: k={m['k']} at temperature {m['temperature']:g}, {m['value_dtype']} values "
                     f"+ int32 ids")
    else:
        s = m["sampling"]
        lines.append(f"  targets       sampled: k={m['k']} draws per position at temperature {m['temperature']:g}, "
                     f"{m['value_dtype']} log-probabilities + int32 ids")
        lines.append(f"  sampling      {s['method']}, estimator {s['estimator']}, seed {s['seed']}, drawn on "
                     f"{s['device']}")
    if m["vocab_size"] is None:
        lines.append(f"  bytes/token   {bpt:,} B ({label}); vocab size not known yet")
    else:
        full = full_vocab_bytes_per_token(m["vocab_size"], m["value_dtype"])
        lines.append(f"  vocab size    {m['vocab_size']:,}")
        lines.append(f"  bytes/token   {bpt:,} B ({label}) vs {full:,} B (full vocab, {m['value_dtype']}): "
                     f"{full / bpt:.1f}x smaller")
    lines.append(f"  {label + ' data':<13} {_size(bpt * m['num_tokens'])} for all tokens")
    return "\n".join(lines)
