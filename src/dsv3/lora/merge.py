"""Merging an adapter into its base checkpoint (`dsv3 merge`).

The merge runs in fp32 (W + s·BA computed and added in fp32, cast once to the checkpoint dtype), before
any MLA absorption, so absorbed decode of the merged model equals the adapter model's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsv3.io.load import load_model
from dsv3.io.checkpoint import resolve_dtype, save_model
from dsv3.config import ModelConfig
from dsv3.errors import DSV3Error
from dsv3.lora.apply import unload
from dsv3.lora.peft_io import load_adapter, read_adapter_config
from dsv3.io.paths import default_model_dir


def merge_adapter(model_dir: str | Path | None, adapter_dir: str | Path, out_dir: str | Path,
                  dtype: str | torch.dtype | None = None, progress: bool = True) -> Path:
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not adapter_dir.is_dir():
        raise DSV3Error(f"adapter directory {adapter_dir} does not exist")
    read_adapter_config(adapter_dir)  # fail on a bad adapter before loading a large model
    if out_dir.resolve() == model_dir.resolve():
        raise DSV3Error(f"output directory {out_dir} is the base model directory; choose another")
    target = resolve_dtype(dtype, ModelConfig.from_dir(model_dir))
    model = load_model(model_dir, dtype=torch.float32, progress=progress)
    load_adapter(model, adapter_dir)
    unload(model, merge=True)
    model.cast(target)
    model.config.torch_dtype = str(target).removeprefix("torch.")
    model.config.quantization_config = None  # merged weights are plain floats, whatever the base stored
    return save_model(model, out_dir, tokenizer_from=model_dir)
