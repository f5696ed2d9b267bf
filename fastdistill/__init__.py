"""fastdistill: fused knowledge-distillation losses and compression kernels for PyTorch.

Importing fastdistill loads the compiled extension when it is built (the sparse ops register the
fake implementations of its kernels then) but neither initialises CUDA nor compiles anything;
triton loads on first use. An extension that exists but fails to load (built against another torch)
warns here, at import.
"""
from fastdistill import _ext
from fastdistill._version import __version__

_ext.load_error()  # loads fastdistill._C now: registers its ops, or warns when a present build is broken

from fastdistill.cache import TeacherCache, TeacherTargets, collate_sampled, collate_topk  # noqa: E402
from fastdistill import quant, sparse  # noqa: E402,F401  (fastdistill.quant.*, fastdistill.sparse.*)
from fastdistill.nn import (DistillLoss, FusedLinearDistillLoss, FusedLinearSampledDistillLoss,  # noqa: E402
                            FusedLinearTopKDistillLoss, HiddenDistillLoss, Int8Linear, SampledDistillLoss,
                            SparseLinear)
from fastdistill.ops import (block_sparse_linear, distill_loss, fused_linear_distill_loss,  # noqa: E402
                             fused_linear_sampled_distill_loss, fused_linear_topk_distill_loss, hidden_distill_loss,
                             int8_linear, int8_linear_dynamic, int8_weight_only_linear,
                             int8_weight_only_linear_packed, pack_w8a8, pack_w8a16, quantize_per_token,
                             sampled_distill_loss, semi_structured_linear, topk_distill_loss)


def info() -> dict:
    """Which backends of which ops can run here, and why not; versions; what setup.py built (and why no CUDA)."""
    import platform

    import torch

    from fastdistill import dispatch

    out = dispatch.info()
    out["versions"] = {"fastdistill": __version__, "torch": torch.__version__, "python": platform.python_version(),
                       "cuda": torch.version.cuda}
    out["build"] = _ext.build_info()
    try:
        from importlib.metadata import version

        out["versions"]["triton"] = version("triton")
    except Exception:  # not installed
        out["versions"]["triton"] = None
    return out


__all__ = ["DistillLoss", "FusedLinearDistillLoss", "FusedLinearSampledDistillLoss", "FusedLinearTopKDistillLoss",
           "HiddenDistillLoss", "Int8Linear", "SampledDistillLoss", "SparseLinear", "TeacherCache", "TeacherTargets",
           "block_sparse_linear", "collate_sampled", "collate_topk", "distill_loss", "fused_linear_distill_loss",
           "fused_linear_sampled_distill_loss", "fused_linear_topk_distill_loss", "hidden_distill_loss", "info",
           "int8_linear", "int8_linear_dynamic", "int8_weight_only_linear", "int8_weight_only_linear_packed",
           "pack_w8a16", "pack_w8a8", "quant", "quantize_per_token", "sampled_distill_loss",
           "semi_structured_linear", "sparse", "topk_distill_loss", "__version__"]
