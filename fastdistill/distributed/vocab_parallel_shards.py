"""Which process group a vocabulary-sharded call runs over, and where this rank's slice of the vocabulary starts.

Two ways in: DTensors placed Shard(vocab dim) on a 1-D device mesh (torch's ColwiseParallel on the output head
gives Shard(-1) logits and Shard(0) weights), or plain local slices plus `group=`. Slices are contiguous and
in group-rank order (rank r holds ids [start_r, start_r + V_r)); the V_r may differ (uneven splits).

One all-reduce of a [world, n] int64 table per call (and one host sync to read it) gives every rank the same view of
the split (the local vocabulary sizes: V, this rank's start) and of what must agree between ranks (sizes of the
other dimensions, a checksum of labels and top-k ids), so that every check involving more than one rank raises the
same error on all ranks instead of on one while the others wait in a collective.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from fastdistill.distributed.vocab_parallel_route import is_dtensor


@dataclass(frozen=True)
class VocabShards:
    group: object
    rank: int
    world: int
    vocab: int  # V, the whole vocabulary
    start: int  # this rank's first id
    local: int  # this rank's number of ids
    widest: int  # the largest slice: chunk sizes derive from it, so every rank runs the same chunks

    def all_reduce_(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(t, op=op, group=self.group)
        return t


def _check_mesh(name: str, t, dim: int, mesh) -> None:
    if t.device_mesh.ndim != 1:
        raise ValueError(f"{name}: a DTensor on a {t.device_mesh.ndim}-D device mesh; vocabulary-parallel losses "
                         f"take a 1-D mesh (for other layouts pass tensor.to_local() and group=<the vocabulary "
                         f"group>)")
    if mesh is not None and t.device_mesh != mesh:
        raise ValueError(f"{name}: on device mesh {t.device_mesh}, the other sharded tensors on {mesh}")
    placement = t.placements[0]
    if dim is None:
        if not placement.is_replicate():
            raise ValueError(f"{name}: expected a replicated DTensor (placement Replicate()), got {placement!r}")
    elif not (placement.is_shard() and placement.dim % t.dim() == dim % t.dim()):
        raise ValueError(f"{name}: expected placement Shard({dim}) (sharded along the vocabulary), got {placement!r}")


def _check_group(group) -> None:
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("group: this rank is not a member of the group")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a torch.distributed.ProcessGroup, got {type(group).__name__}")


def _resolve_group(sharded, group):
    """The process group: the DTensors' mesh group (checked against group= when both are given) or group=."""
    first_name, first = sharded[0][:2]
    if group is not None:
        _check_group(group)
    if is_dtensor(first):
        _check_mesh(first_name, first, sharded[0][2], None)
        mesh = first.device_mesh
        mesh_group = mesh.get_group()
        if group is not None:
            mine, theirs = dist.get_process_group_ranks(group), dist.get_process_group_ranks(mesh_group)
            if mine != theirs:
                raise ValueError(f"group: holds ranks {mine}, but {first_name}'s device mesh holds ranks {theirs}")
        return mesh_group, mesh
    if group is None:
        raise TypeError(f"{first_name}: a plain tensor and group is None: vocabulary-parallel calls take DTensors "
                        f"placed Shard(-1), or local slices plus group=")
    return group, None


def localize(sharded: list, replicated: list, group) -> tuple[VocabShards, list, list]:
    """(VocabShards, local sharded tensors, local replicated tensors), None where the input is None.

    sharded: (name, tensor or None, vocab dim) of the tensors split along the vocabulary; every one holds the
    same slice as the first on each rank. replicated: (name, tensor or None) of tensors every rank holds whole.
    DTensors become their local tensors through to_local(), which is differentiable: gradients come back as
    DTensors with the inputs' placements."""
    present = [s for s in sharded if s[1] is not None]
    for name, t in [s[:2] for s in present] + [r for r in replicated if r[1] is not None]:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    kinds = [is_dtensor(t) for _, t, _ in present]
    if any(kinds) and not all(kinds):
        plain, dt = present[kinds.index(False)][0], present[kinds.index(True)][0]
        raise TypeError(f"{plain}: a plain tensor, but {dt} is a DTensor: pass every vocabulary-sharded tensor as a "
                        f"DTensor, or all of them as local slices with group=")
    group, mesh = _resolve_group(present, group)
    for name, t, dim in present:
        if mesh is not None:
            _check_mesh(name, t, dim, mesh)
    local_replicated = []
    for name, t in replicated:
        if t is not None and is_dtensor(t):
            if mesh is None:
                raise TypeError(f"{name}: a DTensor, but the vocabulary-sharded tensors are plain local slices")
            _check_mesh(name, t, None, mesh)
            t = t.to_local()
        local_replicated.append(t)
    local_sharded = [t.to_local() if mesh is not None else t for _, t, _ in present]
    if not dist.is_initialized():
        raise RuntimeError("group: torch.distributed is not initialized")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    sizes = [t.shape[dim] if t.dim() else 0 for t, (_, _, dim) in zip(local_sharded, present)]
    device = local_sharded[0].device
    same = _same_everywhere(present, local_sharded, [(r[0], t) for r, t in zip(replicated, local_replicated)])
    table = torch.zeros(world, len(sizes) + len(same), dtype=torch.int64, device=device)
    table[rank, :len(sizes)] = torch.tensor(sizes, dtype=torch.int64)
    if same:
        table[rank, len(sizes):] = torch.stack([value.to(device) for _, value in same])
    dist.all_reduce(table, group=group)
    rows = table.tolist()
    _check_table(present, [r[:len(sizes)] for r in rows], mesh is not None)
    _check_same(same, [r[len(sizes):] for r in rows])
    own = [r[0] for r in rows]
    shards = VocabShards(group=group, rank=rank, world=world, vocab=sum(own), start=sum(own[:rank]),
                         local=own[rank], widest=max(own))
    locals_iter = iter(local_sharded)
    return shards, [None if s[1] is None else next(locals_iter) for s in sharded], local_replicated


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """An int64 fingerprint of integer data, position-weighted (wraps around; computed on the tensor's device, read
    with the size table: no extra sync)."""
    flat = t.reshape(-1).to(torch.int64)
    return (flat * torch.arange(1, flat.numel() + 1, device=flat.device)).sum()


def _same_everywhere(sharded, local_sharded, replicated) -> list:
    """(what, int64 scalar) that must agree on every rank: the non-vocabulary size of each sharded tensor (rows of
    logits, H of a head), the size of each replicated tensor, a checksum of the integer ones (labels, top-k ids) and
    the float64 bits of sum |x| of the float ones (hidden states, top-k log-probabilities).
    Every rank of a vocabulary-parallel call must see the same tokens; a head sharded over data-parallel ranks
    (FSDP2's DTensor Shard(0) outside forward) looks alike but is not, and would otherwise give a silently wrong
    loss."""
    out = []
    for (name, _, dim), t in zip(sharded, local_sharded):
        out.append(((name, "size differs"), torch.tensor(t.numel() // max(t.shape[dim], 1) if t.dim() else 0)))
    for name, t in replicated:
        if t is None:
            continue
        out.append(((name, "size differs"), torch.tensor(t.numel())))
        if t.is_floating_point():  # float64 bits of sum |t| (accumulated in float64, no float64 copy of t)
            total = t.detach().abs().nansum(dtype=torch.float64)  # NaN padding rows: skipped
            out.append(((name, "values differ (sum |x|)"), total.reshape(1).view(torch.int64)[0]))
        else:
            out.append(((name, "values differ"), _checksum(t)))
    return out


def _as_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _agree(what: str, a: int, b: int) -> bool:
    """Integers exactly; float fingerprints within 1e-6 relative (replicated activations are bitwise equal in
    tensor parallel, different tokens differ by far more)."""
    if "sum |x|" not in what:
        return a == b
    x, y = _as_float(a), _as_float(b)
    if x == y or (math.isnan(x) and math.isnan(y)):  # also inf
        return True
    return abs(x - y) <= 1e-6 * max(abs(x), abs(y))


def _check_same(same, rows) -> None:
    for i, ((name, what), _) in enumerate(same):
        for rank, row in enumerate(rows):
            if not _agree(what, row[i], rows[0][i]):
                raise ValueError(f"{name}: its {what} between rank 0 and rank {rank}: every rank of a "
                                 f"vocabulary-parallel call needs the same tokens (tensor parallel). A head sharded "
                                 f"over data-parallel ranks (FSDP2's DTensor Shard(0) outside forward) is not "
                                 f"vocabulary parallel: run the loss inside the model's forward "
                                 f"(fastdistill.distributed.run_in_forward)")


def _check_table(sharded, rows, dtensors: bool) -> None:
    """The same verdict on every rank: no rank holds an empty slice (the single-process checks refuse V = 0
    and would raise on that rank alone), each tensor holds the first one's slice, and DTensors' slices add up to
    their global V."""
    first = sharded[0][0]
    for rank, row in enumerate(rows):
        if row[0] == 0:
            raise ValueError(f"{first}: rank {rank} holds no vocabulary entries (V = {sum(r[0] for r in rows)} over "
                             f"{len(rows)} ranks): every rank needs a non-empty slice")
    for i, (name, t, dim) in enumerate(sharded):
        for rank, row in enumerate(rows):
            if row[i] != row[0]:
                raise ValueError(f"{name}: rank {rank} holds {row[i]} vocabulary entries but {first} holds "
                                 f"{row[0]}: the sharded tensors must split one vocabulary alike (equal V, same "
                                 f"split; teacher and student vocabularies that differ are not supported here)")
        total = sum(row[i] for row in rows)
        if dtensors and t.dim() and t.shape[dim] != total:
            raise ValueError(f"{name}: its local shards add up to V = {total} over {len(rows)} ranks, but the "
                             f"DTensor's global shape says V = {t.shape[dim]}")


def local_rows(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(..., V_r) -> [rows, V_r] (a view when possible; keeps autograd)."""
    return None if x is None else x.reshape(-1, x.shape[-1])


def chunk_rows(shards: VocabShards, n_rows: int, live: int = 8, budget: int = 1 << 25) -> int:
    """Rows per chunk such that `live` [chunk, V_r] temporaries of 8 bytes stay under `budget` bytes; from the
    widest slice, so every rank runs the same chunks (the collectives must match)."""
    return max(min(budget // (live * 8 * max(shards.widest, 1)), max(n_rows, 1)), 1)
