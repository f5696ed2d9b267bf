"""Public op functions; each dispatches to a backend (see fastdistill.dispatch)."""
from fastdistill.ops.block_sparse_linear import block_sparse_linear
from fastdistill.ops.distill_loss import distill_loss
from fastdistill.ops.fused_linear_distill_loss import fused_linear_distill_loss
from fastdistill.ops.fused_linear_sampled_distill_loss import fused_linear_sampled_distill_loss
from fastdistill.ops.fused_linear_topk_distill_loss import fused_linear_topk_distill_loss
from fastdistill.ops.hidden_distill_loss import hidden_distill_loss
from fastdistill.ops.int8_linear import int8_linear
from fastdistill.ops.int8_linear_packed import int8_linear_dynamic, pack_w8a8
from fastdistill.ops.int8_weight_only_linear import int8_weight_only_linear
from fastdistill.ops.int8_weight_only_packed import int8_weight_only_linear_packed, pack_w8a16
from fastdistill.ops.quantize_per_token import quantize_per_token
from fastdistill.ops.sampled_distill_loss import sampled_distill_loss
from fastdistill.ops.semi_structured_linear import semi_structured_linear
from fastdistill.ops.topk_distill_loss import topk_distill_loss

__all__ = ["block_sparse_linear", "distill_loss", "fused_linear_distill_loss", "fused_linear_sampled_distill_loss",
           "fused_linear_topk_distill_loss", "hidden_distill_loss", "int8_linear", "int8_linear_dynamic",
           "int8_weight_only_linear", "int8_weight_only_linear_packed", "pack_w8a16", "pack_w8a8", "quantize_per_token", "sampled_distill_loss", "semi_structured_linear", "topk_distill_loss"]
