"""The model-family registry: what a family brings, looked up by config.json's `model_type`.

A family is one package under `dsv3.models` whose `family` module declares its `ModelFamily`s: the
config fields it fills in where config.json is silent, the Hugging Face architecture name, its
causal-LM class, how checkpoint tensor names map onto that class, how tensor/expert parallelism
splits it, and which modules LoRA adapts by default. The heavy parts are named as "module:attr"
and imported on first use, so reading a config (which asks the registry what `model_type`s exist)
never imports a model. Adding a family is one package and one line below (or a `register` call
from outside dsv3); nothing else changes.
"""

from __future__ import annotations

from typing import Any

from dsv3.errors import ConfigError
from dsv3.models.deepseek_v2 import family as deepseek_v2
from dsv3.models.deepseek_v3 import family as deepseek_v3
from dsv3.models.deepseek_v32 import family as deepseek_v32
from dsv3.models.deepseek_v4 import family as deepseek_v4
from dsv3.models.family import ModelFamily

__all__ = ["FAMILIES", "ModelFamily", "family", "family_of", "register", "supported"]


FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    if family.model_type in FAMILIES and FAMILIES[family.model_type] != family:
        raise ValueError(f"model family {family.model_type!r} is registered twice")
    FAMILIES[family.model_type] = family
    return family


def supported() -> list[str]:
    return list(FAMILIES)


def family(model_type: str | None) -> ModelFamily:
    """The registered family of a `model_type`; a ConfigError naming the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise ConfigError(f"config.json: unknown 'model_type' {model_type!r} (supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def family_of(model: Any) -> ModelFamily:
    """The family of a built model (by its config's model_type)."""
    return family(model.config.model_type)


for _f in (*deepseek_v3.FAMILIES, *deepseek_v2.FAMILIES, *deepseek_v32.FAMILIES, *deepseek_v4.FAMILIES):  # the families shipped with dsv3
    register(_f)
