"""fastdistill: fused knowledge-distillation losses and compression kernels for PyTorch.

Importing fastdistill neither initialises CUDA nor compiles anything; the extension and triton
load on first use.
"""
from fastdistill.cache import TeacherCache
from fastdistill.nn import DistillLoss, FusedLinearDistillLoss, HiddenDistillLoss
from fastdistill.ops import distill_loss, fused_linear_distill_loss, hidden_distill_loss, topk_distill_loss

__version__ = "0.1.0"


def info() -> dict:
    """Which backends of which ops can run here, and why not; versions."""
    import platform

    import torch

    from fastdistill import dispatch

    out = dispatch.info()
    out["versions"] = {"fastdistill": __version__, "torch": torch.__version__, "python": platform.python_version(),
                       "cuda": torch.version.cuda}
    try:
        from importlib.metadata import version

        out["versions"]["triton"] = version("triton")
    except Exception:  # not installed
        out["versions"]["triton"] = None
    return out


__all__ = ["DistillLoss", "FusedLinearDistillLoss", "HiddenDistillLoss", "TeacherCache", "distill_loss",
           "fused_linear_distill_loss", "hidden_distill_loss", "info", "topk_distill_loss", "__version__"]
