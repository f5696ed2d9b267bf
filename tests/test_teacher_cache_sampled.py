"""TeacherCache with sampled (RS-KD) targets: seeded draws, byte-identical rebuilds, manifest v2 (and v1
caches), resume guards, integrity, expected_* checks, cache.collate's TeacherTargets into the losses."""
import json
import os
import pickle
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(__file__))  # cache_fixtures

from cache_fixtures import VOCAB, TinyCausalTeacher, edit_manifest, make_sequences  # noqa: E402
from fastdistill.cache import TeacherCache, TeacherCacheError, collate_sampled, collate_topk  # noqa: E402
from fastdistill.cache import __main__ as cli  # noqa: E402
from fastdistill.cache import manifest as mf  # noqa: E402
from fastdistill.cache import sampling  # noqa: E402
from fastdistill.cache.targets import TeacherTargets  # noqa: E402
from fastdistill.ops.topk_distill_loss import topk_distill_loss  # noqa: E402

K, T, SEED = 8, 1.5, 3


def build(path, teacher=None, seqs=None, **kw):
    kw = {"targets": "sampled", "k": K, "temperature": T, "seed": SEED, "batch_size": 4, "shard_size": 5,
          "progress": False, **kw}
    return TeacherCache.build(path, teacher if teacher is not None else TinyCausalTeacher(),
                              seqs if seqs is not None else make_sequences(), **kw)


def shard_bytes(path):
    names = sorted(n for n in os.listdir(path) if n.startswith("shard-"))
    return {n: open(os.path.join(path, n), "rb").read() for n in names}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A complete sampled cache (23 sequences, one empty, 5 shards) for read-only tests."""
    path = str(tmp_path_factory.mktemp("sampled"))
    return build(path), make_sequences()


@pytest.fixture(scope="module")
def built_topk(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("topk"))
    return build(path, targets="topk", temperature=1.0)


# --- the draws -----------------------------------------------------------------------------------

def test_draws_match_the_sampler_with_the_sequence_seed(built):
    cache, seqs = built
    teacher = TinyCausalTeacher()
    assert cache.targets == "sampled" and len(cache) == len(seqs)
    for i, seq in enumerate(seqs):
        item = cache[i]
        assert sorted(item) == ["input_ids", "sampled_indices", "sampled_logprobs"]
        assert torch.equal(item["input_ids"], seq)
        assert item["sampled_logprobs"].dtype == torch.float16 and item["sampled_indices"].dtype == torch.int32
        if seq.numel() == 0:
            assert item["sampled_logprobs"].shape == (0, K)
            continue
        g = torch.Generator().manual_seed(sampling.sequence_seed(SEED, i))
        values, ids = sampling.sample_teacher_targets(teacher(seq[None])[0], K, T, generator=g)
        assert torch.equal(item["sampled_indices"], ids.to(torch.int32)), i
        assert torch.equal(item["sampled_logprobs"], values.to(torch.float16)), i
        assert (item["sampled_indices"][:, 1:] >= item["sampled_indices"][:, :-1]).all()  # ascending, dups kept


def test_manifest_records_targets_and_sampling(built):
    cache, _ = built
    m = cache.manifest
    assert m["format_version"] == mf.FORMAT_VERSION == 2 and m["targets"] == "sampled"
    assert m["sampling"] == {"method": sampling.METHOD, "estimator": sampling.ESTIMATOR, "seed": SEED, "device": "cpu"}
    assert cache.sampling == m["sampling"] and cache.sampling is not cache.sampling  # a copy
    with safe_open(os.path.join(cache.path, m["shards"][0]["file"]), "pt") as f:
        assert set(f.keys()) == {"input_ids", "offsets", "sampled_logprobs", "sampled_indices"}
        meta = json.loads(f.metadata()["fastdistill"])
        assert (meta["targets"], meta["sampling_seed"]) == ("sampled", SEED)
    TeacherCache(cache.path, verify=True)
    text = cache.summary()
    for part in ("sampled: k=8 draws", f"estimator {sampling.ESTIMATOR}", f"seed {SEED}", "drawn on cpu",
                 f"{K * 6} B (sampled)"):
        assert part in text, text
    assert cache.bytes_per_token == K * (2 + 4) and "targets=sampled" in repr(cache)


def test_same_seed_same_bytes_at_any_batch_size_other_seed_differs(tmp_path, built):
    cache, seqs = built
    one = build(tmp_path / "b1", batch_size=1)
    assert shard_bytes(one.path) == shard_bytes(cache.path)
    other = build(tmp_path / "s4", seed=SEED + 1)
    assert shard_bytes(other.path) != shard_bytes(cache.path)
    assert any(not torch.equal(other[i]["sampled_indices"], cache[i]["sampled_indices"]) for i in range(len(seqs)))


def test_resume_after_deleting_a_shard_rewrites_the_same_bytes(tmp_path):
    teacher, seqs = TinyCausalTeacher(), make_sequences()
    build(tmp_path, teacher, seqs)
    before = shard_bytes(tmp_path)
    os.remove(tmp_path / "shard-00002.safetensors")
    teacher.calls = 0
    build(tmp_path, teacher, seqs, batch_size=2)  # another batch size: the draws do not depend on it
    assert teacher.calls == 3  # only the deleted shard (5 sequences in batches of 2) was recomputed
    assert shard_bytes(tmp_path) == before
    TeacherCache(tmp_path, verify=True)


@pytest.mark.parametrize("kwargs,field", [
    ({"seed": SEED + 1}, "sampling.seed"),
    ({"targets": "topk"}, "targets"),
])
def test_resume_with_another_seed_or_target_type_names_the_field(tmp_path, kwargs, field):
    seqs = make_sequences()
    build(tmp_path, seqs=seqs)
    os.remove(tmp_path / "shard-00001.safetensors")
    with pytest.raises(TeacherCacheError, match=rf"{field} mismatch: the cache was built with"):
        build(tmp_path, seqs=seqs, **kwargs)


def test_topk_cache_resumed_as_sampled_names_targets(tmp_path):
    seqs = make_sequences()
    build(tmp_path, seqs=seqs, targets="topk")
    os.remove(tmp_path / "shard-00001.safetensors")
    with pytest.raises(TeacherCacheError, match="targets mismatch: the cache was built with 'topk'"):
        build(tmp_path, seqs=seqs)


# --- integrity -----------------------------------------------------------------------------------

def test_verify_catches_a_tampered_sampled_shard(tmp_path):
    build(tmp_path)
    file = tmp_path / "shard-00001.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF  # tensor data: the header still parses
    file.write_bytes(bytes(data))
    TeacherCache(tmp_path)
    with pytest.raises(TeacherCacheError, match="shard-00001.safetensors is corrupt: sha256"):
        TeacherCache(tmp_path, verify=True)


def test_sampled_shard_headers_are_checked(tmp_path):
    build(tmp_path)
    file = str(tmp_path / "shard-00000.safetensors")
    with safe_open(file, "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    tensors["sampled_indices"] = tensors["sampled_indices"].long()
    save_file(tensors, file)
    with pytest.raises(TeacherCacheError, match=r"sampled_indices is I64 \[\d+, 8\], the manifest implies I32"):
        TeacherCache(tmp_path)
    tensors["topk_indices"] = tensors.pop("sampled_indices").int()  # a top-k name in a sampled cache
    save_file(tensors, file)
    with pytest.raises(TeacherCacheError, match="has no tensor 'sampled_indices'"):
        TeacherCache(tmp_path)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.pop("targets"), "missing key 'targets'"),
    (lambda m: m.update(targets="random"), "targets 'random' is not one of"),
    (lambda m: m["sampling"].update(estimator="importance"), "sampling estimator 'importance' is not one"),
    (lambda m: m["sampling"].pop("seed"), "sampling: missing key 'seed'"),
    (lambda m: m.update(sampling=None), "sampling: expected a JSON object"),
    (lambda m: m.update(format_version=3), "unsupported format_version 3"),
])
def test_manifest_targets_and_sampling_are_validated(tmp_path, edit, message):
    build(tmp_path, seqs=make_sequences(n=4))
    edit_manifest(tmp_path, edit)
    with pytest.raises(TeacherCacheError, match=message):
        TeacherCache(tmp_path)


@pytest.mark.parametrize("kwargs,message", [
    ({"expected_targets": "topk"}, "targets is 'sampled', expected 'topk'"),
    ({"expected_temperature": 1.0}, f"temperature is {T}, expected 1.0"),
    ({"expected_k": K + 1}, f"k is {K}, expected {K + 1}"),
    ({"expected_vocab": VOCAB - 1}, f"vocab_size is {VOCAB}, expected {VOCAB - 1}"),
])
def test_expected_mismatch_names_the_field(built, kwargs, message):
    with pytest.raises(TeacherCacheError, match=message):
        TeacherCache(built[0].path, **kwargs)


def test_expected_matches_and_bad_expected_targets(built):
    path = built[0].path
    TeacherCache(path, expected_targets="sampled", expected_temperature=T, expected_k=K, expected_vocab=VOCAB)
    TeacherCache.open(path, expected_targets="sampled")
    with pytest.raises(ValueError, match="expected_targets: expected one of"):
        TeacherCache(path, expected_targets="sample")


def test_version_1_cache_opens_as_topk_and_resumes(tmp_path):
    teacher, seqs = TinyCausalTeacher(), make_sequences(n=9)
    build(tmp_path, teacher, seqs, targets="topk", temperature=1.0)

    def to_v1(m):  # what the version-1 writer wrote: no targets / sampling keys
        del m["targets"], m["sampling"]
        m["format_version"] = 1
        m[mf.HASH_KEY] = mf.manifest_digest(m)

    edit_manifest(tmp_path, to_v1)
    cache = TeacherCache(tmp_path, expected_targets="topk", verify=True)
    assert (cache.targets, cache.sampling, cache.manifest["format_version"]) == ("topk", None, 1)
    assert sorted(cache[0]) == ["input_ids", "topk_indices", "topk_logprobs"]
    assert cache.collate([cache[0], cache[1]])["teacher"].kind == "topk"
    assert "targets       topk: k=8" in cache.summary()
    teacher.calls = 0
    resumed = build(tmp_path, teacher, seqs, targets="topk", temperature=1.0)  # same parameters: nothing to redo
    assert teacher.calls == 0 and resumed.manifest["format_version"] == 2 and resumed.targets == "topk"
    with pytest.raises(TeacherCacheError, match="format_version 1 has no targets"):
        edit_manifest(tmp_path, lambda m: m.update(format_version=1))
        TeacherCache(tmp_path)


# --- collate and the losses ----------------------------------------------------------------------

def test_collate_of_a_sampled_cache(built):
    cache, seqs = built
    collate = pickle.loads(pickle.dumps(cache.collate))  # what DataLoader workers receive
    batches = list(DataLoader(cache, batch_size=4, collate_fn=collate))
    batch = batches[0]  # items 0-3, item 3 empty
    t = batch["teacher"]
    assert isinstance(t, TeacherTargets) and t.kind == "sampled" and t.estimator == sampling.ESTIMATOR
    assert (t.temperature, t.vocab_size, t.k) == (T, VOCAB, K)
    assert t.logprobs is batch["sampled_logprobs"] and t.indices is batch["sampled_indices"]
    pad = batch["attention_mask"] == 0
    assert pad[3].all() and (batch["labels"][pad] == -100).all()
    assert (batch["sampled_logprobs"][pad] == 0).all() and (batch["sampled_indices"][pad] == 0).all()
    n = seqs[0].numel()
    assert torch.equal(batch["sampled_indices"][0, :n], cache[0]["sampled_indices"])
    assert sum(b["input_ids"].shape[0] for b in batches) == len(seqs)


def test_collate_topk_refuses_sampled_items_and_the_reverse(built, built_topk):
    cache, _ = built
    with pytest.raises(ValueError, match=r"collate_topk: item 0 holds sampled teacher targets.*cache\.collate"):
        collate_topk([cache[0]])
    with pytest.raises(ValueError, match="collate_sampled: item 0 holds topk teacher targets"):
        collate_sampled([built_topk[0]])
    with pytest.raises(ValueError, match="collate_sampled: item 0 holds topk"):
        cache.collate([built_topk[0]])
    assert collate_sampled([cache[0]])["sampled_logprobs"].shape == (1, cache[0]["input_ids"].numel(), K)


def test_topk_loss_takes_teacher_targets_of_a_topk_cache(built_topk):
    batch = built_topk.collate([built_topk[i] for i in range(4)])
    t = batch["teacher"]
    assert t.kind == "topk" and t.estimator is None and t.temperature == 1.0
    B, L = batch["input_ids"].shape
    student = torch.randn(B, L, VOCAB, generator=torch.Generator().manual_seed(0), requires_grad=True)
    got = topk_distill_loss(student, t, labels=batch["labels"], tail="bucket")
    want = topk_distill_loss(student, batch["topk_logprobs"], batch["topk_indices"], labels=batch["labels"],
                             tail="bucket")
    assert torch.equal(got, want) and torch.isfinite(got)
    with pytest.raises(TypeError, match="teacher_topk_indices: must be None"):
        topk_distill_loss(student, t, batch["topk_indices"])
    with pytest.raises(TypeError, match="teacher_topk_indices: required"):
        topk_distill_loss(student, batch["topk_logprobs"])
    with pytest.raises(ValueError, match="teacher_topk_logprobs: the targets were built at temperature 1.0"):
        topk_distill_loss(student, t, labels=batch["labels"], temperature=2.0)
    wide = torch.randn(B, L, VOCAB + 3)
    message = f"teacher_topk_logprobs: .*vocab_size {VOCAB}, the student has V = {VOCAB + 3}"
    with pytest.raises(ValueError, match=message):
        topk_distill_loss(wide, t, labels=batch["labels"])


def test_topk_loss_refuses_sampled_targets(built):
    cache, _ = built
    batch = cache.collate([cache[0], cache[1]])
    student = torch.randn(*batch["input_ids"].shape, VOCAB)
    with pytest.raises(ValueError, match="teacher_topk_logprobs: got sampled teacher targets"):
        topk_distill_loss(student, batch["teacher"], labels=batch["labels"], temperature=T)


def test_sampled_loss_takes_the_collated_targets_and_the_pad_is_harmless(built):
    from fastdistill.ops.sampled_distill_loss import sampled_distill_loss

    cache, _ = built
    batch = cache.collate([cache[i] for i in range(4)])  # item 3 is empty: a row of padding only
    student = torch.randn(*batch["input_ids"].shape, VOCAB, generator=torch.Generator().manual_seed(2))
    got = sampled_distill_loss(student, batch["teacher"], labels=batch["labels"], temperature=T, backend="reference")
    want = sampled_distill_loss(student, batch["sampled_logprobs"], batch["sampled_indices"], labels=batch["labels"],
                                temperature=T, backend="reference")
    assert torch.equal(got, want) and torch.isfinite(got)
    unmasked = sampled_distill_loss(student, batch["teacher"], temperature=T, backend="reference", reduction="none")
    assert torch.isfinite(unmasked).all()  # padded rows counted by mistake give numbers, not NaN
    with pytest.raises(ValueError, match="temperature"):
        sampled_distill_loss(student, batch["teacher"], labels=batch["labels"], temperature=1.0, backend="reference")


def test_topk_loss_with_group_checks_the_summed_vocabulary(built_topk, tmp_path):
    """Local slices with group=: the targets' vocabulary is compared with the sum of the slices' widths
    (one process, world size 1)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        batch = built_topk.collate([built_topk[0], built_topk[1]])
        student = torch.randn(*batch["input_ids"].shape, VOCAB, generator=torch.Generator().manual_seed(1))
        got = topk_distill_loss(student, batch["teacher"], labels=batch["labels"], group=dist.group.WORLD)
        want = topk_distill_loss(student, batch["topk_logprobs"], batch["topk_indices"], labels=batch["labels"])
        torch.testing.assert_close(got, want)
        with pytest.raises(ValueError, match=f"the student has V = {VOCAB - 1}"):
            topk_distill_loss(student[..., 1:], batch["teacher"], labels=batch["labels"], group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


# --- build arguments and the command line --------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"targets": "sample"}, "targets: expected one of"),
    ({"seed": -1}, "seed: expected an integer >= 0"),
    ({"seed": 1.5}, "seed: expected an integer >= 0"),
    ({"seed": True}, "seed: expected an integer >= 0"),
])
def test_bad_build_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(tmp_path, **kwargs)


def test_nan_logits_are_refused_naming_item_and_position(tmp_path):
    class Poisoned(TinyCausalTeacher):
        def forward(self, ids):
            logits = super().forward(ids)
            logits[1, 2, 5] = float("nan")
            return logits

    seqs = [torch.arange(4) + 1 for _ in range(3)]
    with pytest.raises(ValueError, match=r"teacher: non-finite log-probabilities for dataset\[1\] at position 2"):
        build(tmp_path, Poisoned(), seqs)


def test_logits_on_another_device_than_recorded_are_refused(tmp_path):
    module = TinyCausalTeacher()
    with pytest.raises(ValueError, match="teacher: returned logits on meta, but this build draws on cpu"):
        build(tmp_path, lambda ids: module(ids).to("meta"), make_sequences(n=3), teacher_hash="x")


def test_cli_build_sampled_and_info(tmp_path, capsys):
    out = str(tmp_path / "c")
    argv = ["build", "--teacher", "cache_fixtures:tiny_teacher", "--data", "cache_fixtures:tiny_dataset", "--out", out,
            "--targets", "sampled", "--k", "4", "--seed", "5", "--no-progress"]
    assert cli.main(argv) == 0
    cache = TeacherCache(out, expected_targets="sampled", verify=True)
    assert cache.sampling["seed"] == 5 and cache.k == 4
    capsys.readouterr()
    assert cli.main(["info", out]) == 0
    text = capsys.readouterr().out
    assert "targets       sampled: k=4 draws" in text and "seed 5" in text and "24 B (sampled)" in text
