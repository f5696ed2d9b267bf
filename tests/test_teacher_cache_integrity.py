"""Teacher cache at its boundaries: non-finite teacher outputs, index types, an edited manifest."""
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from cache_fixtures import VOCAB, TinyCausalTeacher, edit_manifest, make_sequences  # noqa: E402
from fastdistill.cache import TeacherCache, TeacherCacheError, read_manifest  # noqa: E402
from fastdistill.cache import manifest as mf  # noqa: E402

K = 4


def build(path, teacher=None, seqs=None, **kw):
    kw = {"k": K, "batch_size": 4, "shard_size": 5, "progress": False, **kw}
    return TeacherCache.build(path, teacher if teacher is not None else TinyCausalTeacher(),
                              seqs if seqs is not None else make_sequences(n=12), **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("cache")))


class Poisoned(TinyCausalTeacher):
    """The tiny teacher with one logit replaced in the batch that holds dataset item `item`."""

    def __init__(self, value, item, position, entry=3):
        super().__init__()
        self.value, self.item, self.position, self.entry, self.seen = value, item, position, entry, 0

    def forward(self, ids):
        logits = super().forward(ids)
        first, self.seen = self.seen, self.seen + ids.shape[0]
        if first <= self.item < self.seen:
            logits[self.item - first, self.position, self.entry] = self.value
        return logits


# --- non-finite teacher log-probabilities --------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_and_plus_inf_logits_are_refused(tmp_path, value):
    seqs = [torch.arange(5) + 1 for _ in range(6)]  # equal lengths: batches of 4 hold items 0-3, 4-5
    with pytest.raises(ValueError, match=r"teacher: non-finite log-probabilities for dataset\[5\] at position 2"):
        build(tmp_path, Poisoned(value, item=5, position=2), seqs, shard_size=6)
    assert read_manifest(str(tmp_path))["shards"] == []  # nothing of the poisoned shard was recorded


def test_all_minus_inf_row_is_refused(tmp_path):
    class Dead(TinyCausalTeacher):
        def forward(self, ids):
            logits = super().forward(ids)
            logits[0, 1] = -math.inf  # no finite logit: no distribution at this position
            return logits

    with pytest.raises(ValueError, match=r"dataset\[0\] at position 1"):
        build(tmp_path, Dead(), [torch.arange(4)])


def test_minus_inf_logits_are_masked_entries_and_kept(tmp_path):
    class Masked(TinyCausalTeacher):
        def forward(self, ids):
            logits = super().forward(ids)
            logits[..., 2:] = -math.inf  # only ids 0 and 1 are allowed: fewer finite entries than k
            return logits

    cache = build(tmp_path, Masked(), [torch.arange(3), torch.arange(2)])
    values = cache[0]["topk_logprobs"].float()
    assert torch.isfinite(values[:, :2]).all() and torch.isneginf(values[:, 2:]).all()
    assert set(cache[0]["topk_indices"][:, :2].flatten().tolist()) <= {0, 1}
    assert torch.allclose(values[:, :2].exp().sum(-1), torch.ones(3), atol=1e-2)


# --- index types ---------------------------------------------------------------------------------

@pytest.mark.parametrize("index", [1.7, 1.0, "1", b"1", True, np.True_, torch.tensor(True), torch.tensor(1.0),
                                   torch.tensor([1]), np.float64(1.0), None])
def test_non_integer_index_is_refused(built, index):
    with pytest.raises(TypeError, match=r"^index: expected an integer .*got "):
        built[index]


@pytest.mark.parametrize("index", [3, -2, np.int64(3), np.uint8(3), np.array(3), torch.tensor(3),
                                   torch.tensor(3, dtype=torch.int32)])
def test_integer_scalars_are_accepted(built, index):
    expected = built[int(index) % len(built)]
    assert torch.equal(built[index]["input_ids"], expected["input_ids"])


# --- the manifest's own hash ---------------------------------------------------------------------

def test_edited_vocab_size_is_caught_by_verify(tmp_path):
    build(tmp_path)
    TeacherCache(tmp_path, verify=True)  # an untouched cache verifies
    edit_manifest(tmp_path, lambda m: m.update(vocab_size=VOCAB + 1))
    assert TeacherCache(tmp_path).vocab_size == VOCAB + 1  # opening without verify reads headers only
    with pytest.raises(TeacherCacheError, match="manifest.json: was edited or is corrupt"):
        TeacherCache(tmp_path, verify=True)
    with pytest.raises(TeacherCacheError, match="was edited"):
        TeacherCache(tmp_path).verify()


@pytest.mark.parametrize("edit", [
    lambda m: m.update(teacher_name="other"),
    lambda m: m.update(temperature=1),  # same value, another spelling: still not what was written
    lambda m: m["shards"][0].update(sha256="0" * 64),
    lambda m: m.pop(mf.HASH_KEY),
])
def test_any_manifest_edit_is_caught_by_verify(tmp_path, edit):
    build(tmp_path)
    edit_manifest(tmp_path, edit)
    with pytest.raises(TeacherCacheError, match=f"was edited|no {mf.HASH_KEY}"):
        TeacherCache(tmp_path, verify=True)


def test_resumed_build_keeps_the_manifest_hash(tmp_path):
    seqs = make_sequences(n=12)
    build(tmp_path, seqs=seqs)
    os.remove(tmp_path / "shard-00001.safetensors")
    build(tmp_path, seqs=seqs)  # rewrites the shard and the manifest
    TeacherCache(tmp_path, verify=True)


def test_rerun_removes_temporary_files_of_a_killed_build(tmp_path):
    seqs = make_sequences(n=12)
    build(tmp_path, seqs=seqs)
    os.remove(tmp_path / "shard-00002.safetensors")
    for name in (f"{mf.TMP_PREFIX}abc.part", f"{mf.TMP_PREFIX}x1y2.part"):  # what a kill mid-write leaves
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / "notes.tmp").write_text("mine")
    build(tmp_path, seqs=seqs)
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "notes.tmp"] + [mf.shard_name(i) for i in range(3)]


def test_full_disk_is_a_one_line_cli_error(tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk as SafetensorError after a partial write: an OSError for the CLI."""
    from safetensors import SafetensorError

    from fastdistill.cache import __main__ as cli

    def full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(mf, "save_file", full)
    out = str(tmp_path / "cache")
    argv = ["build", "--teacher", "cache_fixtures:tiny_teacher", "--data", "cache_fixtures:tiny_dataset", "--out", out,
            "--k", "4", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err, err
    assert sorted(os.listdir(out)) == ["manifest.json"]  # no torn shard, no temporary file


def _cache_imports(path: str) -> set[str]:
    """Modules of fastdistill.cache that a file imports, at any level (function-local imports included)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module == "fastdistill.cache":
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastdistill.cache."):
            names.add(node.module.split(".")[2])
    return names


def test_cache_modules_have_no_import_cycle():
    """writer <- dataset <- build: the old build.py <-> dataset.py cycle (a lazy import inside build_cache) is gone."""
    import fastdistill.cache as package

    root = os.path.dirname(package.__file__)
    modules = {f[:-3] for f in os.listdir(root) if f.endswith(".py") and f not in ("__init__.py", "__main__.py")}
    graph = {m: _cache_imports(os.path.join(root, m + ".py")) & modules for m in modules}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, (*seen, n))) for n in graph[start])

    assert not [m for m in modules if reaches(m, m)], graph
