"""Pure-PyTorch references: fallback backend, test oracle, benchmark baseline."""
from fastdistill.reference.distill_loss import distill_loss_ref, distill_loss_rows_ref, divergence_ref

__all__ = ["distill_loss_ref", "distill_loss_rows_ref", "divergence_ref"]
