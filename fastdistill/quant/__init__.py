"""Int8 quantization: quantize_ (replace nn.Linear in place), calibrate (SmoothQuant factors), freeze_
(trainable int8 layers -> int8 + scales only), the layer and the ops."""
from fastdistill.nn.int8_linear import Int8Linear
from fastdistill.ops.int8_linear import int8_linear
from fastdistill.ops.int8_weight_only_linear import int8_weight_only_linear
from fastdistill.ops.quantize_per_token import quantize_per_token
from fastdistill.quant.calibrate import calibrate
from fastdistill.quant.freeze import freeze_
from fastdistill.quant.quantize import quantize_

__all__ = ["Int8Linear", "calibrate", "freeze_", "int8_linear", "int8_weight_only_linear", "quantize_",
           "quantize_per_token"]
