from fastdistill.nn.distill_loss import DistillLoss
from fastdistill.nn.fused_linear_distill_loss import FusedLinearDistillLoss
from fastdistill.nn.hidden_distill_loss import HiddenDistillLoss
from fastdistill.nn.int8_linear import Int8Linear
from fastdistill.nn.sparse_linear import SparseLinear

__all__ = ["DistillLoss", "FusedLinearDistillLoss", "HiddenDistillLoss", "Int8Linear", "SparseLinear"]
