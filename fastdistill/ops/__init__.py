"""Public op functions; each dispatches to a backend (see fastdistill.dispatch)."""
from fastdistill.ops.distill_loss import distill_loss
from fastdistill.ops.fused_linear_distill_loss import fused_linear_distill_loss
from fastdistill.ops.hidden_distill_loss import hidden_distill_loss
from fastdistill.ops.topk_distill_loss import topk_distill_loss

__all__ = ["distill_loss", "fused_linear_distill_loss", "hidden_distill_loss", "topk_distill_loss"]
