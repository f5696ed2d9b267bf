from fastdistill.nn.distill_loss import DistillLoss

__all__ = ["DistillLoss"]
