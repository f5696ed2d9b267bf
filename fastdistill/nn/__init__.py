from fastdistill.nn.distill_loss import DistillLoss
from fastdistill.nn.fused_linear_distill_loss import FusedLinearDistillLoss

__all__ = ["DistillLoss", "FusedLinearDistillLoss"]
