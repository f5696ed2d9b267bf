"""TeacherTargets: a batch of cached teacher targets that knows what it is (top-k or sampled, the
temperature and the vocabulary it was built with), so a loss can refuse targets that do not match the
call instead of computing a wrong number. TeacherCache.collate returns one under batch["teacher"].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

KINDS = ("topk", "sampled")
_LOSSES = {"topk": "topk_distill_loss / fused_linear_topk_distill_loss",
           "sampled": "sampled_distill_loss / fused_linear_sampled_distill_loss"}


@dataclass(frozen=True)
class TeacherTargets:
    """kind "topk": logprobs are the teacher's top-k log-probabilities (descending), indices their
    distinct ids. kind "sampled": k draws with replacement from the teacher's distribution (estimator
    "counts", see fastdistill.cache.sampling), ids sorted with duplicates, logprobs at each draw.
    Both at `temperature`, over a vocabulary of `vocab_size` ids."""
    kind: str
    logprobs: torch.Tensor
    indices: torch.Tensor
    temperature: float
    vocab_size: int
    estimator: Optional[str] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")

    @property
    def k(self) -> int:
        return self.logprobs.shape[-1]

    def to(self, *args, **kwargs) -> "TeacherTargets":
        """Both tensors moved like Tensor.to (a dtype applies to the log-probabilities only)."""
        dtype = next((a for a in args if isinstance(a, torch.dtype)), kwargs.get("dtype"))
        device_args = tuple(a for a in args if not isinstance(a, torch.dtype))
        device_kwargs = {key: v for key, v in kwargs.items() if key != "dtype"}
        logprobs = self.logprobs.to(*device_args, **device_kwargs)
        if dtype is not None:
            logprobs = logprobs.to(dtype)
        return replace(self, logprobs=logprobs, indices=self.indices.to(*device_args, **device_kwargs))


def unpack_targets(kind: str, logprobs, indices, *, temperature: float, vocab: int,
                   names: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs, indices) for a loss of `kind` called with `temperature` on a `vocab`-wide student.

    `logprobs` is a tensor (then `indices` is required) or a TeacherTargets (then `indices` must be
    None), whose kind, temperature and vocabulary must match the call: a ValueError names the argument
    `names[0]` otherwise."""
    if not isinstance(logprobs, TeacherTargets):
        if indices is None:
            raise TypeError(f"{names[1]}: required (the token ids of {names[0]}), unless {names[0]} is a "
                            f"TeacherTargets batch from TeacherCache.collate")
        return logprobs, indices
    t = logprobs
    if indices is not None:
        raise TypeError(f"{names[1]}: must be None when {names[0]} is a TeacherTargets (it holds the ids)")
    if t.kind != kind:
        raise ValueError(f"{names[0]}: got {t.kind} teacher targets (a cache built with targets={t.kind!r}), "
                         f"but this loss reads {kind} targets; use {_LOSSES[t.kind]}")
    if not math.isclose(float(t.temperature), float(temperature), rel_tol=1e-6):
        raise ValueError(f"{names[0]}: the targets were built at temperature {t.temperature}, this call uses "
                         f"temperature={temperature}; pass temperature={t.temperature} (log-probabilities at "
                         f"one temperature are not those at another)")
    if t.vocab_size != vocab:
        raise ValueError(f"{names[0]}: the targets come from a teacher with vocab_size {t.vocab_size}, the "
                         f"student has V = {vocab}")
    return t.logprobs, t.indices
