"""fastdistill.cache: teacher top-k cache round trip, collate, sizes, resume, corruption, CLI."""
import json
import math
import os
import pickle
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(__file__))  # cache_fixtures, also imported by the CLI subprocesses

from cache_fixtures import (VOCAB, FailingTeacher, TinyCausalTeacher, edit_manifest, expected_topk,  # noqa: E402
                            file_state, make_sequences)
from fastdistill.cache import TeacherCache, TeacherCacheError, collate_topk, read_manifest  # noqa: E402
from fastdistill.cache import manifest as mf  # noqa: E402

K = 8


def build(path, teacher=None, seqs=None, **kw):
    kw = {"k": K, "batch_size": 4, "shard_size": 5, "progress": False, **kw}
    return TeacherCache.build(path, teacher if teacher is not None else TinyCausalTeacher(),
                              seqs if seqs is not None else make_sequences(), **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One complete float16 cache (23 sequences, one empty, 5 shards of <= 5) shared by read-only tests."""
    path = str(tmp_path_factory.mktemp("cache"))
    teacher, seqs = TinyCausalTeacher(), make_sequences()
    return build(path, teacher, seqs), teacher, seqs


# --- round trip ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,temperature", [(torch.float16, 1.0), (torch.bfloat16, 2.5)])
def test_round_trip_matches_teacher(tmp_path, dtype, temperature):
    teacher, seqs = TinyCausalTeacher(), make_sequences()
    cache = build(tmp_path, teacher, seqs, dtype=dtype, temperature=temperature)
    assert len(cache) == len(seqs) == 23 and cache.num_shards == 5  # 23 = 4 * 5 + 3
    assert cache.num_tokens == sum(s.numel() for s in seqs)
    assert (cache.k, cache.temperature, cache.vocab_size, cache.dtype) == (K, temperature, VOCAB, dtype)
    for i, seq in enumerate(seqs):
        item = cache[i]
        assert item["input_ids"].dtype == torch.int64 and torch.equal(item["input_ids"], seq)
        assert item["topk_logprobs"].dtype == dtype and item["topk_indices"].dtype == torch.int32
        values, indices = expected_topk(teacher, seq, K, temperature, dtype)
        assert torch.equal(item["topk_logprobs"], values), i
        assert torch.equal(item["topk_indices"], indices), i
        if seq.numel():
            assert (item["topk_logprobs"][:, :-1] >= item["topk_logprobs"][:, 1:]).all()  # descending
            assert (item["topk_logprobs"] <= 0).all()
    assert torch.equal(cache[-1]["input_ids"], seqs[-1])
    with pytest.raises(IndexError):
        cache[len(seqs)]
    assert [x["input_ids"].numel() for x in cache] == [s.numel() for s in seqs]  # iteration stops


def test_manifest_fields(built):
    cache, teacher, seqs = built
    m = cache.manifest
    assert m["format_version"] == mf.FORMAT_VERSION and m["complete"] is True
    assert (m["targets"], m["sampling"], cache.targets, cache.sampling) == ("topk", None, "topk", None)
    assert (m["k"], m["temperature"], m["vocab_size"], m["value_dtype"]) == (K, 1.0, VOCAB, "float16")
    assert m["teacher_name"] == "TinyCausalTeacher" and m["teacher_hash"] == mf.module_hash(teacher)
    assert (m["num_sequences"], m["num_tokens"]) == (len(seqs), sum(s.numel() for s in seqs))
    hasher = mf.TokenStreamHasher()
    for s in seqs:
        hasher.update(s)
    assert m["token_stream_hash"] == hasher.hexdigest()
    first = 0
    for j, s in enumerate(m["shards"]):
        assert s["file"] == f"shard-{j:05d}.safetensors" and s["first_sequence"] == first
        assert s["num_tokens"] == sum(x.numel() for x in seqs[first:first + s["num_sequences"]])
        assert s["sha256"] == mf.sha256_file(os.path.join(cache.path, s["file"]))
        with safe_open(os.path.join(cache.path, s["file"]), "pt") as f:
            assert json.loads(f.metadata()["fastdistill"])["first_sequence"] == first
            assert f.get_tensor("input_ids").dtype == torch.int32
            assert f.get_tensor("offsets").tolist()[-1] == s["num_tokens"]
        first += s["num_sequences"]
    assert [s["num_sequences"] for s in m["shards"]] == [5, 5, 5, 5, 3]
    assert read_manifest(cache.path) == m


def test_token_stream_hash_sees_boundaries():
    a, b = mf.TokenStreamHasher(), mf.TokenStreamHasher()
    for s in ([1, 2], [3]):
        a.update(torch.tensor(s))
    for s in ([1], [2, 3]):
        b.update(torch.tensor(s))
    assert a.hexdigest() != b.hexdigest()


def test_module_hash_is_deterministic_and_sees_weights():
    a, b, c = TinyCausalTeacher(seed=0), TinyCausalTeacher(seed=0), TinyCausalTeacher(seed=1)
    assert mf.module_hash(a) == mf.module_hash(b) != mf.module_hash(c)
    assert mf.module_hash(a) != mf.module_hash(a.to(torch.bfloat16))  # dtype and bf16 bytes hashed


def test_teacher_runs_in_eval_and_inference_mode_and_mode_is_restored(tmp_path):
    seen = []

    class Probe(TinyCausalTeacher):
        def forward(self, ids):
            seen.append((self.training, torch.is_inference_mode_enabled(), ids.dtype))
            return super().forward(ids)

    teacher = Probe().train()
    build(tmp_path, teacher)
    assert seen and all(s == (False, True, torch.int64) for s in seen)
    assert teacher.training


def test_function_teacher_with_hash_and_hf_style_output(tmp_path):
    module = TinyCausalTeacher()

    class Output:
        def __init__(self, logits):
            self.logits = logits

    def teacher(ids):
        return Output(module(ids))

    seqs = make_sequences(n=6)
    with pytest.raises(ValueError, match="teacher_hash: required"):
        build(tmp_path, teacher, seqs)
    cache = build(tmp_path, teacher, seqs, teacher_hash="ckpt-v1", teacher_name="tiny", batch_size=1)
    assert (cache.teacher_name, cache.teacher_hash) == ("tiny", "ckpt-v1")
    values, indices = expected_topk(module, seqs[0], K, 1.0, torch.float16)
    assert torch.equal(cache[0]["topk_logprobs"], values) and torch.equal(cache[0]["topk_indices"], indices)


# --- collate, DataLoader, sizes ------------------------------------------------------------------

def test_collate_and_dataloader(built):
    cache, _, seqs = built
    loader = DataLoader(cache, batch_size=4, shuffle=True, collate_fn=collate_topk,
                        generator=torch.Generator().manual_seed(0))
    seen = {}
    for batch in loader:
        B, L = batch["input_ids"].shape
        assert batch["topk_logprobs"].shape == (B, L, K) and batch["topk_logprobs"].dtype == torch.float16
        assert batch["topk_indices"].shape == (B, L, K) and batch["topk_indices"].dtype == torch.int32
        for b in range(B):
            n = int(batch["attention_mask"][b].sum())
            ids = batch["input_ids"][b, :n]
            assert (batch["input_ids"][b, n:] == 0).all() and (batch["labels"][b, n:] == -100).all()
            assert torch.equal(batch["labels"][b, :n], ids)
            assert (batch["topk_logprobs"][b, n:] == -math.inf).all() and (batch["topk_indices"][b, n:] == 0).all()
            match = [i for i, s in enumerate(seqs) if torch.equal(s, ids) and i not in seen]
            seen[match[0]] = batch["topk_logprobs"][b, :n]
            assert torch.equal(seen[match[0]], cache[match[0]]["topk_logprobs"])
    assert sorted(seen) == list(range(len(seqs)))
    custom = collate_topk([cache[0], cache[3]], pad_id=5, pad_logprob=0.0)
    assert (custom["input_ids"][1] == 5).all() and (custom["topk_logprobs"][1] == 0).all()  # item 3 is empty


def test_pickles_for_dataloader_workers(built):
    cache, _, seqs = built
    cache[7]  # opens a shard handle, which must not travel
    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone[7]["topk_logprobs"], cache[7]["topk_logprobs"])


def test_bytes_per_token(tmp_path):
    cache = build(tmp_path, k=64, seqs=make_sequences(n=4))
    assert cache.bytes_per_token == 64 * (2 + 4) == 384
    assert cache.full_vocab_bytes_per_token == VOCAB * 2
    assert cache.compression_ratio == pytest.approx(VOCAB * 2 / 384)
    text = cache.summary()
    assert "384 B (top-k)" in text and f"{VOCAB * 2} B (full vocab" in text and "complete" in text
    assert mf.bytes_per_token(64, "bfloat16") == 384 and mf.bytes_per_token(16, "float16") == 96
    assert mf.full_vocab_bytes_per_token(128256, "float16") == 256512  # a Llama-3 vocabulary: 668x


# --- interrupted builds and resume ---------------------------------------------------------------

def test_interrupted_build_resumes_without_rewriting_finished_shards(tmp_path):
    seqs = make_sequences()
    teacher = TinyCausalTeacher()
    crashing = FailingTeacher(teacher, fail_at=6)  # batch_size 2, shard_size 4: two calls per shard
    path = str(tmp_path / "interrupted")
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(path, crashing, seqs, batch_size=2, shard_size=4)
    m = read_manifest(path)
    assert m["complete"] is False and [s["file"] for s in m["shards"]] == [mf.shard_name(0), mf.shard_name(1)]
    assert not [n for n in os.listdir(path) if n.startswith(mf.TMP_PREFIX)]  # no torn temp files left
    with pytest.raises(TeacherCacheError, match=r"incomplete.*rerun.*resume"):
        TeacherCache(path)
    finished = {s["file"]: file_state(os.path.join(path, s["file"])) for s in m["shards"]}

    resumed = FailingTeacher(teacher, fail_at=-1)  # same state_dict, so the same teacher hash
    cache = build(path, resumed, seqs, batch_size=2, shard_size=4)
    assert resumed.calls == 2 * 6 - 4  # 6 shards of <= 4; the first two were not recomputed
    for name, state in finished.items():
        assert file_state(os.path.join(path, name)) == state
    assert cache.manifest["complete"] is True

    reference = build(str(tmp_path / "whole"), teacher, seqs, batch_size=2, shard_size=4)
    assert [s["sha256"] for s in cache.manifest["shards"]] == [s["sha256"] for s in reference.manifest["shards"]]
    for i in range(len(seqs)):
        for key in ("input_ids", "topk_logprobs", "topk_indices"):
            assert torch.equal(cache[i][key], reference[i][key])


def test_rerun_rewrites_missing_and_corrupt_shards_only(tmp_path):
    teacher, seqs = TinyCausalTeacher(), make_sequences()
    cache = build(tmp_path, teacher, seqs)
    files = [os.path.join(tmp_path, s["file"]) for s in cache.manifest["shards"]]
    before = [file_state(f) for f in files]

    manifest = file_state(os.path.join(tmp_path, mf.MANIFEST_NAME))
    teacher.calls = 0
    build(tmp_path, teacher, seqs)  # complete and intact: nothing to do, nothing written
    assert teacher.calls == 0 and [file_state(f) for f in files] == before
    assert file_state(os.path.join(tmp_path, mf.MANIFEST_NAME)) == manifest

    os.remove(files[1])
    with open(files[3], "r+b") as f:  # flip one byte of tensor data: same size, wrong sha256
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    teacher.calls = 0
    build(tmp_path, teacher, seqs)
    after = [file_state(f) for f in files]
    for j in (0, 2, 4):
        assert after[j] == before[j]
    # Both rewritten with the same bytes. The deleted shard's inode may be handed out again to its new file,
    # so only the corrupt one (replaced while it still existed) is checked for a new inode.
    assert after[1][2] == before[1][2]
    assert after[3][2] == before[3][2] and after[3][0] != before[3][0]
    assert teacher.calls > 0
    TeacherCache(tmp_path, verify=True)


@pytest.mark.parametrize("change,field", [
    ({"k": K + 1}, "k"),
    ({"temperature": 2.0}, "temperature"),
    ({"dtype": torch.bfloat16}, "value_dtype"),
    ({"shard_size": 7}, "shard_size"),
    ({"teacher": TinyCausalTeacher(seed=3)}, "teacher_hash"),
    ({"seqs": make_sequences(seed=9)}, "token_stream_hash"),
])
def test_resume_with_different_parameters_names_the_field(tmp_path, change, field):
    build(tmp_path)
    with pytest.raises(TeacherCacheError, match=rf"{field} mismatch.*overwrite=True"):
        build(tmp_path, **change)
    cache = build(tmp_path, overwrite=True, **change)
    assert cache.manifest["complete"]


def test_overwrite_keeps_foreign_files(tmp_path):
    build(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    cache = build(tmp_path, k=4, shard_size=30, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine" and cache.num_shards == 1
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "notes.txt", "shard-00000.safetensors"]


# --- opening: errors -----------------------------------------------------------------------------

def test_missing_or_corrupt_manifest(tmp_path):
    with pytest.raises(TeacherCacheError, match="no such directory"):
        TeacherCache(tmp_path / "nowhere")
    with pytest.raises(TeacherCacheError, match="manifest.json not found"):
        TeacherCache(tmp_path)
    build(tmp_path)
    good = (tmp_path / "manifest.json").read_text()

    (tmp_path / "manifest.json").write_text(good[:-20])
    with pytest.raises(TeacherCacheError, match="not valid JSON"):
        TeacherCache(tmp_path)
    with pytest.raises(TeacherCacheError, match="cannot resume.*overwrite=True"):
        build(tmp_path)

    cases = [(lambda m: m.pop("vocab_size"), "missing key 'vocab_size'"),
             (lambda m: m["shards"][2].pop("sha256"), r"shards\[2\]: missing key 'sha256'"),
             (lambda m: m.update(format_version=99), "unsupported format_version 99"),
             (lambda m: m.update(format="something.else"), "format is 'something.else'"),
             (lambda m: m.update(k="8"), "key 'k' should be int"),
             (lambda m: m.update(num_tokens=m["num_tokens"] + 1), "the manifest says"),
             (lambda m: m["shards"][0].update(file="../x"), "not a shard file name")]
    for fn, message in cases:
        (tmp_path / "manifest.json").write_text(good)
        edit_manifest(tmp_path, fn)
        with pytest.raises(TeacherCacheError, match=message):
            TeacherCache(tmp_path)


def test_expected_vocab_and_k(built):
    cache, _, _ = built
    assert TeacherCache.open(cache.path, expected_vocab=VOCAB, expected_k=K).k == K
    with pytest.raises(TeacherCacheError, match=f"vocab_size is {VOCAB}, expected 50257"):
        TeacherCache.open(cache.path, expected_vocab=50257)
    with pytest.raises(TeacherCacheError, match=f"k is {K}, expected 64"):
        TeacherCache.open(cache.path, expected_k=64)


def test_missing_shard_file_is_named(tmp_path):
    build(tmp_path)
    os.remove(tmp_path / "shard-00002.safetensors")
    with pytest.raises(TeacherCacheError, match="shard file shard-00002.safetensors is missing"):
        TeacherCache(tmp_path)


def test_truncated_and_corrupt_shards(tmp_path):
    build(tmp_path)
    shard = tmp_path / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-50])  # truncated: the header no longer matches the file
    with pytest.raises(TeacherCacheError, match="shard file shard-00001.safetensors is unreadable"):
        TeacherCache(tmp_path)
    with pytest.raises(TeacherCacheError, match="shard-00001.safetensors is corrupt: sha256"):
        TeacherCache(tmp_path, verify=True)
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit of data flipped
    TeacherCache(tmp_path)  # headers are fine; only the hash can tell
    with pytest.raises(TeacherCacheError, match="shard-00001.safetensors is corrupt: sha256"):
        TeacherCache(tmp_path, verify=True)
    with pytest.raises(TeacherCacheError, match="corrupt"):
        TeacherCache(tmp_path).verify()


def test_shard_shapes_must_match_manifest(tmp_path):
    build(tmp_path)
    file = os.path.join(tmp_path, "shard-00000.safetensors")
    with safe_open(file, "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    tensors["topk_logprobs"] = tensors["topk_logprobs"][:, :-1].contiguous()  # k - 1 columns
    save_file(tensors, file)
    with pytest.raises(TeacherCacheError, match=rf"shard-00000.safetensors: topk_logprobs is F16 \[\d+, {K - 1}\], "
                                                rf"the manifest implies F16 \[\d+, {K}\]"):
        TeacherCache(tmp_path)
    del tensors["offsets"]
    save_file(tensors, file)
    with pytest.raises(TeacherCacheError, match="has no tensor 'offsets'"):
        TeacherCache(tmp_path)


# --- build: argument errors ----------------------------------------------------------------------

def test_k_larger_than_vocab(tmp_path):
    with pytest.raises(ValueError, match=f"k=200 is larger than the teacher's vocabulary size V={VOCAB}"):
        build(tmp_path, k=200)
    assert read_manifest(str(tmp_path))["shards"] == []
    assert build(tmp_path, k=K).k == K  # nothing was finished: new parameters need no overwrite=True


def test_vocab_change_under_the_same_teacher_hash(tmp_path):
    module, seqs = TinyCausalTeacher(), make_sequences()
    build(tmp_path, lambda ids: module(ids), seqs, teacher_hash="v1")
    os.remove(tmp_path / "shard-00004.safetensors")
    message = f"vocab_size mismatch: the cache has {VOCAB}, the teacher returns V=50"
    with pytest.raises(TeacherCacheError, match=message):
        build(tmp_path, lambda ids: module(ids)[..., :50], seqs, teacher_hash="v1")


@pytest.mark.parametrize("kwargs,message", [
    ({"k": 0}, "k: expected an integer >= 1"),
    ({"batch_size": 1.5}, "batch_size: expected an integer >= 1"),
    ({"temperature": 0.0}, "temperature: expected a finite number > 0"),
    ({"dtype": torch.float32}, "dtype: top-k values are stored as float16 or bfloat16"),
    ({"seqs": [torch.zeros(2, 3, dtype=torch.long)]}, r"dataset\[0\]: expected a 1-D tensor"),
    ({"seqs": [torch.ones(3)]}, r"dataset\[0\]: expected integer token ids"),
    ({"seqs": [torch.tensor([1, -2])]}, r"dataset\[0\]: token ids must be in"),
    ({"seqs": [torch.zeros(0, dtype=torch.long)]}, "dataset: no tokens"),
    ({"teacher": lambda ids: torch.zeros(ids.shape[0], 3), "teacher_hash": "x"}, "teacher: returned logits of shape"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build(tmp_path, **kwargs)
