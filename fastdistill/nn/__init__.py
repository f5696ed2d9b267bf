from fastdistill.nn.distill_loss import DistillLoss
from fastdistill.nn.fused_linear_distill_loss import FusedLinearDistillLoss
from fastdistill.nn.hidden_distill_loss import HiddenDistillLoss

__all__ = ["DistillLoss", "FusedLinearDistillLoss", "HiddenDistillLoss"]
