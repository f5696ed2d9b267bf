"""SparseLinear: a Linear layer whose weight is stored compressed (block-sparse BSR or 2:4) and trains.

The stored values are the Parameter (`values`); the index tensors / metadata are buffers. Training updates
the values only: the sparsity pattern is fixed. The state dict holds the compressed tensors plus `shape`
(N, K, bn, bk; bn = bk = 0 for 2:4), so loading checks the layer shape; a state dict of the same shape but
another pattern (other nnzb) replaces this layer's pattern. Index tensors are range-checked once, where they
enter: construction, load_state_dict (before anything is copied) and unpickling (torch.load of the module);
the kernels trust them afterwards, so edit the buffers only through these paths.
"""
from __future__ import annotations

import torch
from torch import nn

from fastdistill.ops.block_sparse_linear import block_sparse_linear
from fastdistill.ops.semi_structured_linear import semi_structured_linear
from fastdistill.sparse.formats import BlockSparseWeight, SemiStructuredWeight, check_block_size
from fastdistill.sparse.prune import prune_, remove_masks
from fastdistill.sparse.validate import validate_block_sparse, validate_semi_structured

FORMATS = ("block", "2:4")
_BSR_BUFFERS = ("crow_indices", "col_indices", "ccol_indices", "row_indices", "perm", "block_rows")


class SparseLinear(nn.Module):
    def __init__(self, weight: BlockSparseWeight | SemiStructuredWeight, bias: torch.Tensor | None = None,
                 backend: str = "auto"):
        super().__init__()
        if not isinstance(weight, (BlockSparseWeight, SemiStructuredWeight)):
            raise TypeError(f"weight: expected a BlockSparseWeight or SemiStructuredWeight, got "
                            f"{type(weight).__name__}")
        _validate(weight)  # again: the bundle's fields may have been reassigned since it was built
        if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()
                                 or tuple(bias.shape) != (weight.shape[0],)):
            raise ValueError(f"bias: expected a floating-point tensor of shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        self.format = "2:4" if isinstance(weight, SemiStructuredWeight) else "block"
        self.out_features, self.in_features = weight.shape
        self.backend = backend
        self.values = nn.Parameter(weight.values.detach().clone())
        bn, bk = weight.block_size if self.format == "block" else (0, 0)
        self.register_buffer("shape", torch.tensor([*weight.shape, bn, bk], dtype=torch.int64))
        if self.format == "block":
            for name in _BSR_BUFFERS:
                self.register_buffer(name, getattr(weight, name).clone())
        else:
            self.register_buffer("meta", weight.meta.clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor | None = None, *, pattern: str | None = None,
                    block_size=(32, 32), sparsity: float = 0.5, backend: str = "auto") -> "SparseLinear":
        """From an nn.Linear and either a mask (stored as `pattern`, default "block": every block with a kept
        element is stored) or a pattern alone ("block" prunes `sparsity` of the blocks by magnitude, "2:4"
        keeps the 2 largest of every 4). Weights outside the mask are dropped."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        if pattern is None:
            if mask is None:
                raise ValueError("from_linear: give a mask or a pattern ('block' or '2:4')")
            pattern = "block"
        if pattern not in FORMATS:
            raise ValueError(f"pattern: expected one of {FORMATS} (unstructured sparsity stays masked dense), "
                             f"got {pattern!r}")
        w = linear.weight.detach()
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.shape != w.shape:
                raise ValueError(f"mask: expected shape {tuple(w.shape)}, got "
                                 f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        else:
            mask = _magnitude_mask(w, pattern, sparsity, check_block_size(block_size))
        if pattern == "2:4":
            weight = SemiStructuredWeight.from_dense(w, mask)
        else:
            weight = BlockSparseWeight.from_dense(w, mask, block_size)
        return cls(weight, linear.bias, backend)

    def weight_bundle(self) -> BlockSparseWeight | SemiStructuredWeight:
        """The layer's tensors as a bundle, unchecked: they were checked when they entered the layer."""
        shape = (self.out_features, self.in_features)
        if self.format == "2:4":
            return SemiStructuredWeight(self.values, self.meta, shape, trusted=True)
        return BlockSparseWeight(self.values, *(getattr(self, n) for n in _BSR_BUFFERS), shape, trusted=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = semi_structured_linear if self.format == "2:4" else block_sparse_linear
        return op(x, self.weight_bundle(), self.bias, backend=self.backend)

    def to_dense(self) -> nn.Linear:
        """An nn.Linear with the dense weight (zeros where nothing is stored)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight_bundle().to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    @property
    def storage_bytes(self) -> int:
        """Bytes of the compressed weight (values + indices or metadata), as stored in memory."""
        return self.weight_bundle().nbytes

    @property
    def dense_bytes(self) -> int:
        return self.out_features * self.in_features * self.values.element_size()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        shape = state_dict.get(prefix + "shape")
        if shape is not None:
            if not isinstance(shape, torch.Tensor) or shape.dtype != torch.int64 or shape.shape != (4,):
                raise ValueError(f"{prefix}shape: expected an int64 tensor of 4 elements (N, K, bn, bk)")
            if tuple(shape.tolist()) != tuple(self.shape.tolist()):
                raise ValueError(f"SparseLinear: cannot load a state dict of shape (N, K, bn, bk) = "
                                 f"{tuple(shape.tolist())} into a layer of shape {tuple(self.shape.tolist())}")
        names = ("values",) + (_BSR_BUFFERS if self.format == "block" else ("meta",))
        incoming = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
        if incoming:
            # Range-check the tensors as they will be stored (this layer's device, incoming or own) before
            # anything is copied: a bad index must not reach a kernel, nor half-load the layer.
            merged = {n: incoming[n].to(getattr(self, n).device) if isinstance(incoming.get(n), torch.Tensor)
                      else incoming.get(n, getattr(self, n)) for n in names}
            try:
                _validate_parts(self.format, merged, (self.out_features, self.in_features))
            except (TypeError, ValueError) as e:
                raise type(e)(f"{prefix}{e}") from None
            with torch.no_grad():  # same layer shape, maybe another pattern: take the incoming sizes
                for name, t in incoming.items():
                    own = getattr(self, name)
                    if own.shape != t.shape:
                        new = torch.empty_like(t, device=own.device, dtype=own.dtype)
                        if name == "values":
                            self.values = nn.Parameter(new, requires_grad=own.requires_grad)
                        else:
                            self._buffers[name] = new
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __setstate__(self, state):
        """Unpickling (torch.load of a whole module, copy.deepcopy) is a path from disk too: check again."""
        super().__setstate__(state)
        _validate(self.weight_bundle())

    def extra_repr(self) -> str:
        fmt = self.format if self.format == "2:4" else f"block {tuple(self.shape[2:].tolist())}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={fmt}, "
                f"bias={self.bias is not None}, storage={self.storage_bytes / max(1, self.dense_bytes):.2f}x dense")


def _validate(weight: BlockSparseWeight | SemiStructuredWeight) -> None:
    fmt = "2:4" if isinstance(weight, SemiStructuredWeight) else "block"
    names = ("values", "meta") if fmt == "2:4" else ("values",) + _BSR_BUFFERS
    _validate_parts(fmt, {n: getattr(weight, n) for n in names}, weight.shape)


def _validate_parts(fmt: str, parts: dict, shape) -> None:
    if fmt == "2:4":
        validate_semi_structured(parts["values"], parts["meta"], shape)
    else:
        validate_block_sparse(*(parts[n] for n in ("values",) + _BSR_BUFFERS), shape)


def _magnitude_mask(w: torch.Tensor, pattern: str, sparsity: float, block_size) -> torch.Tensor:
    """The mask prune_ would install on a layer with this weight (magnitude criterion)."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    holder = nn.Sequential(lin)
    prune_(holder, 0.5 if pattern == "2:4" else sparsity, pattern=pattern, block_size=block_size)
    mask = lin.weight_mask.clone()
    remove_masks(holder)
    return mask
