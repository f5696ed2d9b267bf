"""Public op functions; each dispatches to a backend (see fastdistill.dispatch)."""
from fastdistill.ops.distill_loss import distill_loss

__all__ = ["distill_loss"]
