"""`ModelFamily`: what a model family brings to dsv3 (see `dsv3.models.registry`)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class ModelFamily:
    """One model family. `model` and `parallelize` are "module:attr" references, `weights_module` a module's name."""

    model_type: str
    architecture: str  # what config.json's `architectures` says when dsv3 writes it
    model: str  # the causal LM class: cls(config, with_mtp=True)
    weights_module: str  # map_name(name, cfg, with_mtp), pieces(param, cfg), mtp_probe(cfg)
    parallelize: str  # (model, ParallelConfig) -> model with this rank's shards swapped in
    defaults: Mapping[str, Any] = field(default_factory=dict)  # config.json fields filled in where silent
    lora_targets: tuple[str, ...] = ()  # modules LoRA adapts by default
    routed_lora_targets: tuple[str, ...] = ()  # the routed experts' projections LoRA may adapt
    config_parser: str | None = None  # "module:fn", fn(raw config.json, fields so far): reads the family's own fields
    config_prepare: str | None = None  # "module:fn", fn(raw) -> raw: the family's spelling of shared fields, before parsing
    config_writer: str | None = None  # "module:fn", fn(config, out dict): the family's config.json spelling, on saving
    engine_unsupported: str | None = None  # why the paged engine cannot serve this family yet (None: it can)
    unsupported: Mapping[str, str] = field(default_factory=dict)  # "quantization" / "training" / "finetuning" -> why not
    whole_sequences: bool = False  # attention only over whole unpadded sequences from position 0 (no document mask)

    def refuse(self, what: str) -> None:
        """Raise a one-line ConfigError if `what` ("quantization", "training", "finetuning") is not supported for this
        family."""
        why = self.unsupported.get(what)
        if why is not None:
            from dsv3.errors import ConfigError

            raise ConfigError(f"{what} is not supported for {self.model_type} yet: {why}")

    def model_class(self) -> Callable[..., Any]:
        return _resolve(self.model)

    def weights(self) -> Any:
        """The checkpoint-names module: map_name(name, cfg, with_mtp) -> (parameter, index) | None, pieces(param,
        cfg) -> how many checkpoint tensors fill a parameter, mtp_probe(cfg) -> a tensor only MTP checkpoints hold."""
        return importlib.import_module(self.weights_module)

    def shard(self) -> Callable[..., Any]:
        return _resolve(self.parallelize)

    def prepare(self, raw: dict[str, Any]) -> dict[str, Any]:
        """config.json as the common parser reads it: a family whose config spells shared fields its own way (a
        nested rotary section, say) maps them first; the others' configs pass unchanged."""
        return raw if self.config_prepare is None else _resolve(self.config_prepare)(raw)

    def write_extra(self, cfg: Any, out: dict[str, Any]) -> None:
        """Adjust the config.json dict written for `cfg` to the family's own spelling (in place)."""
        if self.config_writer is not None:
            _resolve(self.config_writer)(cfg, out)

    def parse_extra(self, raw: dict[str, Any], fields: dict[str, Any]) -> None:
        """Let the family read and check the config.json fields only it has into `fields` (ModelConfig's keywords);
        errors are one-line `ConfigError`s naming the field."""
        if self.config_parser is not None:
            _resolve(self.config_parser)(raw, fields)
