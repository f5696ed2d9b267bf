"""Pure-PyTorch references: fallback backend, test oracle, benchmark baseline."""
from fastdistill.reference.distill_loss import distill_loss_ref, distill_loss_rows_ref, divergence_ref
from fastdistill.reference.fused_linear_distill_loss import fused_linear_distill_loss_ref
from fastdistill.reference.topk_distill_loss import topk_distill_loss_ref

__all__ = ["distill_loss_ref", "distill_loss_rows_ref", "divergence_ref", "fused_linear_distill_loss_ref",
           "topk_distill_loss_ref"]
