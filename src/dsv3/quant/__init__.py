"""Weight quantization for DeepSeek-V3 models: int8, int4 (RTN or AWQ) and FP8 block formats."""

from dsv3.quant.apply import METHODS, quantize_model
from dsv3.quant.io import is_quantized_dir, load_quantized, save_quantized
from dsv3.quant.schemes import QuantError

__all__ = ["METHODS", "QuantError", "is_quantized_dir", "load_quantized", "quantize_model", "save_quantized"]
