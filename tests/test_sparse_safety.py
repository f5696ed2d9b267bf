"""Index tensors of the sparse formats are range-checked where they enter (construction, load_state_dict,
safetensors files, unpickling): a crafted index raises a ValueError/TypeError naming the tensor instead of
reading out of bounds in a kernel (SIGSEGV) or giving garbage on the reference backend."""
import dataclasses
import io
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from fastdistill.sparse import BlockSparseWeight, SemiStructuredWeight, SparseLinear, block_sparse_linear
from sparse_cases import make_24, make_bsr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bsr():
    # 4 x 3 blocks of 16; block rows hold 2, 0, 3, 1 blocks (an empty row too).
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[0, [0, 2]] = mask[2, :] = mask[3, 1] = True
    dense = torch.randn(64, 48) * mask.repeat_interleave(16, 0).repeat_interleave(16, 1)
    return BlockSparseWeight.from_dense(dense, None, (16, 16))


def _set(t, i, v):
    t = t.clone()
    t[i] = v
    return t


BSR_CASES = [  # (field, crafted replacement, id): the error must name the field
    ("crow_indices", lambda W: _set(W.crow_indices, 0, 1), "crow-start"),
    ("crow_indices", lambda W: _set(W.crow_indices, -1, W.nnzb + 1), "crow-end"),
    ("crow_indices", lambda W: torch.tensor([0, 3, 2, 5, 6], dtype=torch.int32), "crow-decreasing"),
    ("col_indices", lambda W: _set(W.col_indices, 0, 3), "col-C"),  # C = 3
    ("col_indices", lambda W: _set(W.col_indices, 1, -1), "col-negative"),
    ("col_indices", lambda W: _set(W.col_indices, 0, 1 << 28), "col-huge"),
    ("col_indices", lambda W: _set(W.col_indices, 3, 0), "col-duplicate"),  # row 2 as 0, 0, 2
    ("col_indices", lambda W: W.col_indices.long(), "col-int64"),
    ("col_indices", lambda W: torch.stack([W.col_indices, W.col_indices], 1)[:, 0], "col-strided"),
    ("ccol_indices", lambda W: _set(W.ccol_indices, 1, 0), "ccol"),
    ("row_indices", lambda W: _set(W.row_indices, 0, 7), "row"),
    ("perm", lambda W: W.perm.flip(0).contiguous(), "perm"),
    ("block_rows", lambda W: _set(W.block_rows, 0, 1), "block_rows"),
]


@pytest.mark.parametrize("name,craft", [pytest.param(n, f, id=i) for n, f, i in BSR_CASES])
def test_block_sparse_constructor_rejects_bad_indices(name, craft):
    W = _bsr()
    bad = craft(W)
    with pytest.raises((ValueError, TypeError), match=f"^{name}: "):
        dataclasses.replace(W, **{name: bad})
    layer = SparseLinear(W)
    with pytest.raises((ValueError, TypeError), match=f"^{name}: "):  # the state dict path
        layer.load_state_dict({**layer.state_dict(), name: bad})
    assert torch.equal(getattr(layer, name), getattr(W, name))  # nothing half-loaded


def test_block_sparse_shape_and_values_checked():
    W = _bsr()
    with pytest.raises(ValueError, match="^shape: feature counts must be >= 0"):
        dataclasses.replace(W, shape=(-64, 48))
    with pytest.raises(ValueError, match="^shape: .* not divisible"):
        dataclasses.replace(W, shape=(64, 40))
    with pytest.raises(ValueError, match="^values: block size"):
        dataclasses.replace(W, values=torch.randn(W.nnzb, 16, 8))
    with pytest.raises(ValueError, match="^col_indices: expected shape"):  # values with one block more
        dataclasses.replace(W, values=torch.randn(W.nnzb + 1, 16, 16))


def test_from_csr_rebuilds_the_csc_view():
    W = _bsr()
    again = BlockSparseWeight.from_csr(W.values, W.crow_indices, W.col_indices, W.shape)
    for f in ("ccol_indices", "row_indices", "perm", "block_rows"):
        assert torch.equal(getattr(again, f), getattr(W, f)), f
    with pytest.raises(ValueError, match="^col_indices"):
        BlockSparseWeight.from_csr(W.values, W.crow_indices, _set(W.col_indices, 0, 9), W.shape)


def _meta_with(S, nibble):
    meta = S.meta.clone()
    meta[0, 0] = (meta[0, 0] & 0xF0) | nibble
    return meta


SEMI_CASES = [
    ("meta", lambda S: _meta_with(S, 1 | (1 << 2)), "i0-eq-i1"),  # the kernels and the reference disagree
    ("meta", lambda S: _meta_with(S, 2 | (1 << 2)), "i0-gt-i1"),
    ("meta", lambda S: S.meta.to(torch.int8), "int8"),
    ("meta", lambda S: S.meta[:, :1].contiguous(), "short"),
    ("values", lambda S: S.values[:, :-1], "values"),
]


@pytest.mark.parametrize("name,craft", [pytest.param(n, f, id=i) for n, f, i in SEMI_CASES])
def test_semi_structured_rejects_bad_meta(name, craft):
    S = make_24(8, 24, torch.float32, 0)
    bad = craft(S)
    with pytest.raises((ValueError, TypeError), match=f"^{name}: "):
        dataclasses.replace(S, **{name: bad})
    layer = SparseLinear(S)
    with pytest.raises((ValueError, TypeError), match=f"^{name}: "):
        layer.load_state_dict({**layer.state_dict(), name: bad})
    with pytest.raises(ValueError, match="^shape: feature counts"):
        dataclasses.replace(S, shape=(8, -24))


def test_safetensors_file_and_pickled_module_are_checked(tmp_path):
    from safetensors.torch import load_file, save_file

    layer = SparseLinear(_bsr(), torch.randn(64))
    state = {k: v.contiguous() for k, v in layer.state_dict().items()}
    state["col_indices"] = _set(state["col_indices"], 2, 1 << 20)
    save_file(state, str(tmp_path / "layer.safetensors"))
    fresh = SparseLinear(_bsr(), torch.randn(64))
    with pytest.raises(ValueError, match="^col_indices: values must lie in"):
        fresh.load_state_dict(load_file(str(tmp_path / "layer.safetensors")))
    with pytest.raises(ValueError, match=r"^0\.col_indices: "):  # the error names the key in the model
        nn.Sequential(fresh).load_state_dict({f"0.{k}": v for k, v in state.items()})
    layer._buffers["perm"] = _set(layer.perm, 0, 99)  # bypasses the checks: a tampered pickle
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    with pytest.raises(ValueError, match="^perm: "):
        torch.load(buf, weights_only=False)


def test_sparse_linear_rechecks_a_mutated_bundle():
    W = make_bsr(32, 32, (16, 16), 0.5, torch.float32, 0)
    W.col_indices = _set(W.col_indices, 0, 5)  # dataclass fields can be reassigned after construction
    with pytest.raises(ValueError, match="^col_indices"):
        SparseLinear(W)
    with pytest.raises(TypeError, match="^weight: expected"):
        SparseLinear(torch.randn(4, 4))
    with pytest.raises(ValueError, match="^bias: expected"):
        SparseLinear(make_bsr(32, 32, (16, 16), 0.5, torch.float32, 0), torch.randn(31))


CRASH = """
import torch
from fastdistill.sparse import BlockSparseWeight, block_sparse_linear
W = BlockSparseWeight.from_dense(torch.randn(64, 64), None, (32, 32))
for field in ("col_indices", "row_indices"):  # read by the forward, by dx
    t = getattr(W, field).clone()
    t[0] = 1 << 28
    try:
        bad = BlockSparseWeight(**{**{f: getattr(W, f) for f in W.__dataclass_fields__}, field: t})
    except ValueError as e:
        print("refused:", e)
        continue
    x = torch.randn(4, 64, requires_grad=True)
    block_sparse_linear(x, bad, backend="cpu").sum().backward()  # read out of bounds before the checks existed
    print("computed:", x.grad.abs().max().item())
"""


def test_crafted_index_no_longer_crashes():
    """These crafted indices used to SIGSEGV the C++ kernels (forward: col, dx: row); in a subprocess so a
    crash fails this test instead of killing pytest."""
    proc = subprocess.run([sys.executable, "-c", CRASH], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    assert [line.split(":")[:2] for line in lines] == [["refused", " col_indices"], ["refused", " row_indices"]], lines


def test_valid_weights_still_run():
    W = _bsr()
    x = torch.randn(3, 48)
    torch.testing.assert_close(block_sparse_linear(x, W, backend="cpu"), x @ W.to_dense().T)


IMPORTS = """
import importlib.util, sys, types
# Stand-in for the top-level package (its __init__ imports everything): only the sparse modules' own imports run.
spec = importlib.util.find_spec("fastdistill")
pkg = types.ModuleType("fastdistill")
pkg.__path__ = list(spec.submodule_search_locations)
sys.modules["fastdistill"] = pkg
for m in ("formats", "validate", "checks", "masks", "prune", "gradual", "sparsify"):
    importlib.import_module("fastdistill.sparse." + m)
print(sorted(m for m in sys.modules if m.startswith(("fastdistill.nn", "fastdistill.ops"))))
"""


def test_sparse_imports_neither_nn_nor_ops():
    """The sparse -> nn -> ops -> sparse cycle is gone: the package's modules import nothing from nn/ops."""
    proc = subprocess.run([sys.executable, "-c", IMPORTS], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
