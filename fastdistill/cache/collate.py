"""Padding TeacherCache items into batches: `collate_topk` for top-k items, `collate_sampled` for
sampled ones (TeacherCache.collate adds a TeacherTargets to either, see fastdistill/cache/dataset.py)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from fastdistill.cache.manifest import tensor_names

_OTHER = {"topk": "sampled", "sampled": "topk"}
_USE = {"topk": "collate_topk", "sampled": "collate_sampled"}


def pad_items(batch: Sequence[dict], kind: str, *, pad_id: int, pad_logprob: float, label_pad: int,
              who: str) -> dict:
    """Right-pads items holding `kind` targets (see collate_topk for the keys); `who` names the caller
    in errors."""
    if len(batch) == 0:
        raise ValueError(f"{who}: empty batch")
    values_name, indices_name = tensor_names(kind)
    for b, item in enumerate(batch):
        if values_name not in item:
            other = tensor_names(_OTHER[kind])[0]
            if other in item:
                raise ValueError(f"{who}: item {b} holds {_OTHER[kind]} teacher targets ({other}), not {kind} ones; "
                                 f"use the cache's own collate (DataLoader(cache, collate_fn=cache.collate)) or "
                                 f"{_USE[_OTHER[kind]]}")
            raise ValueError(f"{who}: item {b} has no {values_name!r} (not a TeacherCache item)")
    lengths = [item["input_ids"].shape[0] for item in batch]
    B, L = len(batch), max(lengths)
    first = batch[0][values_name]
    k = first.shape[-1]
    input_ids = torch.full((B, L), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((B, L), dtype=torch.int64)
    logprobs = torch.full((B, L, k), pad_logprob, dtype=first.dtype)
    indices = torch.zeros((B, L, k), dtype=torch.int32)
    for b, (item, n) in enumerate(zip(batch, lengths)):
        if item[values_name].shape[-1] != k:
            raise ValueError(f"{who}: item {b} has k={item[values_name].shape[-1]}, item 0 has k={k}")
        input_ids[b, :n] = item["input_ids"]
        attention_mask[b, :n] = 1
        logprobs[b, :n] = item[values_name]
        indices[b, :n] = item[indices_name]
    labels = input_ids.masked_fill(attention_mask == 0, label_pad)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            values_name: logprobs, indices_name: indices}


def collate_topk(batch: Sequence[dict], *, pad_id: int = 0, pad_logprob: float = -math.inf,
                 label_pad: int = -100) -> dict:
    """Pads a list of top-k TeacherCache items on the right into one batch, for DataLoader(collate_fn=...):
        input_ids       (B, L) int64   padded with pad_id
        attention_mask  (B, L) int64   1 on real tokens, 0 on padding
        labels          (B, L) int64   input_ids with label_pad (-100) on padding, unshifted as
                                       Hugging Face causal LMs expect (they shift internally); as
                                       the ignore mask of a per-position loss it lines up with
                                       topk_logprobs; as next-token targets use labels[:, 1:]
                                       against logits[:, :-1]
        topk_logprobs   (B, L, k)      padded with pad_logprob (-inf: no probability mass)
        topk_indices    (B, L, k) int32 padded with 0
    Use functools.partial(collate_topk, pad_id=...) for other pad values. Mask padded positions out
    of the loss (attention_mask == 0 or labels == -100): their top-k rows carry no distribution.
    Items of a sampled cache are refused: use collate_sampled, or the cache's own `cache.collate`."""
    return pad_items(batch, "topk", pad_id=pad_id, pad_logprob=pad_logprob, label_pad=label_pad, who="collate_topk")


def collate_sampled(batch: Sequence[dict], *, pad_id: int = 0, label_pad: int = -100) -> dict:
    """collate_topk for the items of a sampled cache: the same keys with sampled_logprobs and
    sampled_indices (B, L, k). Padded positions hold k draws of id 0 with log-probability 0.0 (a point
    mass at id 0), a valid target rather than -inf, which the sampled losses read as a bad draw (NaN):
    an unmasked padded row gives a finite value, never NaN. Mask padded rows out of the loss with labels
    (label_pad) as for top-k."""
    return pad_items(batch, "sampled", pad_id=pad_id, pad_logprob=0.0, label_pad=label_pad, who="collate_sampled")
