"""A tiny deterministic causal teacher, token datasets and file helpers for the teacher cache tests;
importable as `cache_fixtures:tiny_teacher` / `cache_fixtures:tiny_dataset` by the CLI tests
(tests/ on PYTHONPATH)."""
import json
import os

import torch

VOCAB = 97
DIM = 16


class TinyCausalTeacher(torch.nn.Module):
    """Embedding -> causal running mean over positions -> linear head. Position t sees tokens <= t
    only, so right padding does not change the real positions' logits. It computes in float64 and
    returns float32: the float64 rounding differences between batch shapes vanish in the cast, so
    batched and unbatched calls agree bitwise and tests can compare exactly."""

    def __init__(self, vocab: int = VOCAB, dim: int = DIM, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.head = torch.nn.Parameter(torch.randn(dim, vocab, generator=g) * 2.0)
        self.calls = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = self.embed.double()[ids]                                   # (B, L, D)
        steps = torch.arange(1, ids.shape[1] + 1, dtype=torch.float64).view(1, -1, 1)
        x = x.cumsum(dim=1) / steps                                    # causal mean
        return (x @ self.head.double()).float()                        # (B, L, V)


class FailingTeacher(torch.nn.Module):
    """Wraps a teacher and raises on call number `fail_at` (1-based): an interrupted build."""

    def __init__(self, teacher: torch.nn.Module, fail_at: int):
        super().__init__()
        self.teacher, self.fail_at, self.calls = teacher, fail_at, 0

    def forward(self, ids):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return self.teacher(ids)


def make_sequences(n: int = 23, seed: int = 1, vocab: int = VOCAB, max_len: int = 17, empty: bool = True):
    """n variable-length 1-D int64 sequences (lengths 1..max_len; one empty one when `empty`)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    if empty and n > 3:
        lengths[3] = 0
    return [torch.randint(0, vocab, (n_i,), generator=g) for n_i in lengths]


def tiny_teacher():
    """Factory (no required arguments): the CLI calls it to get the teacher."""
    return TinyCausalTeacher()


tiny_teacher_instance = TinyCausalTeacher()

tiny_dataset = make_sequences()  # a list: the CLI uses it as is


def tiny_dataset_gen():
    """Generator function: the CLI calls it and reads the result into a list."""
    yield from make_sequences()


def expected_topk(teacher, seq, k, temperature, dtype):
    """The oracle: the teacher on the sequence alone, log_softmax(logits / T), top k."""
    if seq.numel() == 0:
        return torch.empty((0, k), dtype=dtype), torch.empty((0, k), dtype=torch.int32)
    logprobs = torch.log_softmax(teacher(seq[None])[0].float() / temperature, dim=-1)
    values, indices = logprobs.topk(k, dim=-1)
    return values.to(dtype), indices.to(torch.int32)


def file_state(path):
    """(inode, mtime_ns, bytes) of a file: os.replace of a rewrite changes the inode."""
    st = os.stat(path)
    with open(path, "rb") as f:
        return st.st_ino, st.st_mtime_ns, f.read()


def edit_manifest(path, fn):
    """Loads a cache's manifest.json, applies fn to the dict, writes it back (corruption tests)."""
    file = os.path.join(path, "manifest.json")
    with open(file) as f:
        m = json.load(f)
    fn(m)
    with open(file, "w") as f:
        json.dump(m, f)
