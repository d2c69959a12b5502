"""Loading a model directory, whatever its weights: the one entry point, which picks the loader.

A checkpoint in the Hugging Face layout (full precision, or DeepSeek's FP8 blocks dequantized on
the way in) goes to `dsv3.io.checkpoint.load_plain`; one written by `dsv3 quantize` (packed int8,
int4/AWQ, FP8) or pre-quantized by AutoAWQ, GPTQ or compressed-tensors (int4) to
`dsv3.quant.io.load_quantized`, by `quantization_config.quant_method`; any other method is refused by
name. `load_for_inference` can also quantize on the fly, and checks a `--quantization awq|gptq|
compressed-tensors` request against what the files hold (as vLLM's flag does).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.errors import ConfigError
from dsv3.io.checkpoint import load_plain
from dsv3.models.registry import family
from dsv3.quant.apply import quantize_model
from dsv3.quant.foreign import FOREIGN_METHODS
from dsv3.quant.io import load_quantized, unsupported_method
from dsv3.quant.schemes import QuantError

ON_THE_FLY = ("int8", "int4", "fp8")  # --quantization values that quantize a full-precision checkpoint while loading
DECLARED = ("awq", *(m for m in FOREIGN_METHODS if m != "awq"))  # --quantization values that name what the files hold
QUANTIZATION_CHOICES = ON_THE_FLY + DECLARED


def load_model(model_dir: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
               with_mtp: bool | None = None, progress: bool = True) -> nn.Module:
    """Load a checkpoint directory into its family's causal LM (`dsv3.models.registry`), in eval mode.

    with_mtp: True loads the MTP modules (an error if absent), False skips them, None loads them if present.
    """
    cfg = ModelConfig.from_dir(model_dir)
    method = (cfg.quantization_config or {}).get("quant_method")
    if method == "dsv3" or method in FOREIGN_METHODS:  # packed int8/int4/AWQ/FP8 from `dsv3 quantize`, AutoAWQ/GPTQ/CT int4
        return load_quantized(model_dir, dtype=dtype, device=device, with_mtp=with_mtp, progress=progress)
    if method not in (None, "fp8"):
        raise QuantError(f"{model_dir}: {unsupported_method(method)}")
    return load_plain(model_dir, dtype=dtype, device=device, with_mtp=with_mtp, progress=progress)


def check_declared(model_dir: str | Path, quantization: str) -> None:
    """`--quantization awq|gptq|compressed-tensors` loads the files as they are: they must hold that packing (AWQ:
    AutoAWQ's, or `dsv3 quantize --method awq`'s). A one-line error with the command that makes one otherwise."""
    qc = ModelConfig.from_dir(model_dir).quantization_config or {}
    method = qc.get("quant_method")
    if method == quantization or (quantization == "awq" and method == "dsv3" and qc.get("calibration") == "awq"):
        return
    held = "full-precision weights" if method is None else f"quant_method {method!r}" + (
        f" ({qc.get('format')}, {qc.get('calibration')})" if method == "dsv3" else "")
    hint = (f"; make one with `dsv3 quantize --method awq --model {model_dir} -o OUT --calib FILE`, or quantize while "
            "loading with --quantization int4" if quantization == "awq" else "")
    raise QuantError(f"--quantization {quantization}: {model_dir} is not a {quantization} checkpoint (it holds {held}){hint}")


def load_for_inference(model_dir: str | Path, dtype: torch.dtype | str | None = None, quantization: str | None = None,
                       device: str | torch.device = "cpu", progress: bool = False) -> nn.Module:
    """`load_model`, then `--quantization int8|int4|fp8` applied on the fly (an FP8 checkpoint asked for
    fp8 is kept in FP8 rather than dequantized and re-quantized); `awq`, `gptq` or `compressed-tensors` load the
    files as they are, once checked to hold that packing. A family the paged engine cannot serve yet is
    refused here, with its reason, before any weight is read."""
    why = family(ModelConfig.from_dir(model_dir).model_type).engine_unsupported
    if why is not None:
        raise ConfigError(why)
    if quantization in DECLARED:
        check_declared(model_dir, quantization)
        quantization = None
    if quantization is None:
        return load_model(model_dir, dtype=dtype, device=device, progress=progress)
    family(ModelConfig.from_dir(model_dir).model_type).refuse("quantization")
    qc = ModelConfig.from_dir(model_dir).quantization_config or {}
    if quantization == "fp8" and qc.get("quant_method") == "fp8":
        return load_quantized(model_dir, dtype=dtype, device=device, progress=progress)
    model = load_model(model_dir, dtype=dtype, device=device, progress=progress)
    quantize_model(model, quantization, progress=progress)
    return model
