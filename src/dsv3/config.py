"""`ModelConfig`: the one dataclass every part of dsv3 reads the architecture from.

It is built from a Hugging Face `config.json` (DeepSeek-V3/R1, DeepSeek-V2(-Lite), Moonlight,
Kimi-K2) and validated up front, so that a wrong checkpoint fails with a message naming the
field instead of a shape error deep inside a matmul.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv3.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2")
SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")


@dataclass
class RopeScaling:
    """YaRN context extension (arXiv 2309.00071) as DeepSeek configures it.

    Attributes:
        factor: context extension factor s (V3: 40).
        original_max_position_embeddings: pre-extension context (V3: 4096).
        beta_fast / beta_slow: rotation counts bounding the interpolation ramp.
        mscale / mscale_all_dim: attention temperature terms; the softmax scale is multiplied by
            (0.1·mscale_all_dim·ln s + 1)², cos/sin by get_mscale(s, mscale)/get_mscale(s, mscale_all_dim).
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass
class ModelConfig:
    """Architecture hyper-parameters, named as in the Hugging Face config.json.

    Symbols: D = hidden_size, H = num_attention_heads, E = n_routed_experts, K = num_experts_per_tok.
    `q_lora_rank` None means queries are projected directly by `q_proj` (V2-Lite, Moonlight).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    moe_intermediate_size: int = 0
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    torch_dtype: str | None = None
    quantization_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- derived quantities -------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer by MLA: the KV latent plus the shared rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """MoE iff experts exist, the layer is past the dense prefix and on the MoE stride."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        """(dn+dr)^-0.5, times mscale² under YaRN (the 'attention temperature')."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim and rs.factor > 1:
            m = 0.1 * rs.mscale_all_dim * math.log(rs.factor) + 1.0
            scale *= m * m
        return scale

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    # ---- (de)serialisation --------------------------------------------------------------
    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir)
        if not path.is_dir():
            raise ConfigError(f"model directory {str(path)!r} does not exist")
        cfg = path / "config.json"
        if not cfg.is_file():
            raise ConfigError(f"no config.json in {str(path)!r}")
        try:
            raw = json.loads(cfg.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg} is not valid JSON: {e}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        from dsv3._config_parse import parse_config

        return parse_config(cls, raw)

    def to_dict(self) -> dict[str, Any]:
        """HF-style config.json content (rope in the classic `rope_scaling` spelling)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "rope_scaling")}
        out = {**self.extra, **out}
        if self.rope_scaling is not None:
            rs = dataclasses.asdict(self.rope_scaling)
            out["rope_scaling"] = {"type": "yarn", **{k: v for k, v in rs.items() if v is not None}}
        else:
            out["rope_scaling"] = None
        out.pop("rope_parameters", None)
        out["architectures"] = ["DeepseekV2ForCausalLM" if self.model_type == "deepseek_v2" else "DeepseekV3ForCausalLM"]
        if out["quantization_config"] is None:
            del out["quantization_config"]
        return out

    def save(self, model_dir: str | Path) -> None:
        Path(model_dir, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
