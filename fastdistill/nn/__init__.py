from fastdistill.nn.distill_loss import DistillLoss
from fastdistill.nn.fused_linear_distill_loss import FusedLinearDistillLoss
from fastdistill.nn.fused_linear_topk_distill_loss import FusedLinearSampledDistillLoss, FusedLinearTopKDistillLoss
from fastdistill.nn.hidden_distill_loss import HiddenDistillLoss
from fastdistill.nn.int8_linear import Int8Linear
from fastdistill.nn.sampled_distill_loss import SampledDistillLoss
from fastdistill.nn.sparse_linear import SparseLinear

__all__ = ["DistillLoss", "FusedLinearDistillLoss", "FusedLinearSampledDistillLoss", "FusedLinearTopKDistillLoss",
           "HiddenDistillLoss", "Int8Linear", "SampledDistillLoss", "SparseLinear"]
