"""Loading a model directory, whatever its weights: the one entry point, which picks the loader.

A checkpoint in the Hugging Face layout (full precision, or DeepSeek's FP8 blocks dequantized on
the way in) goes to `dsv3.io.checkpoint.load_plain`; one written by `dsv3 quantize` (packed int8,
int4/AWQ, FP8) to `dsv3.quant.io.load_quantized`. `load_for_inference` can also quantize on the fly.
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
from dsv3.quant.io import load_quantized


def load_model(model_dir: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
               with_mtp: bool | None = None, progress: bool = True) -> nn.Module:
    """Load a checkpoint directory into its family's causal LM (`dsv3.models.registry`), in eval mode.

    with_mtp: True loads the MTP modules (an error if absent), False skips them, None loads them if present.
    """
    cfg = ModelConfig.from_dir(model_dir)
    if (cfg.quantization_config or {}).get("quant_method") == "dsv3":  # packed int8/int4/AWQ/FP8 from `dsv3 quantize`
        return load_quantized(model_dir, dtype=dtype, device=device, with_mtp=with_mtp, progress=progress)
    return load_plain(model_dir, dtype=dtype, device=device, with_mtp=with_mtp, progress=progress)


def load_for_inference(model_dir: str | Path, dtype: torch.dtype | str | None = None, quantization: str | None = None,
                       device: str | torch.device = "cpu", progress: bool = False) -> nn.Module:
    """`load_model`, then `--quantization int8|int4|fp8` applied on the fly (an FP8 checkpoint asked for
    fp8 is kept in FP8 rather than dequantized and re-quantized). A family the paged engine cannot serve yet is
    refused here, with its reason, before any weight is read."""
    why = family(ModelConfig.from_dir(model_dir).model_type).engine_unsupported
    if why is not None:
        raise ConfigError(why)
    if quantization is None:
        return load_model(model_dir, dtype=dtype, device=device, progress=progress)
    qc = ModelConfig.from_dir(model_dir).quantization_config or {}
    if quantization == "fp8" and qc.get("quant_method") == "fp8":
        return load_quantized(model_dir, dtype=dtype, device=device, progress=progress)
    model = load_model(model_dir, dtype=dtype, device=device, progress=progress)
    quantize_model(model, quantization, progress=progress)
    return model
