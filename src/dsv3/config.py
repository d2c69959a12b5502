"""`ModelConfig`: the one dataclass every part of dsv3 reads the architecture from.

It is built from a Hugging Face `config.json` (DeepSeek-V3/R1, DeepSeek-V2(-Lite), Moonlight,
Kimi-K2) and validated up front, so that a wrong checkpoint fails with a message naming the
field instead of a shape error deep inside a matmul. The dataclass comes first, then the parsing
(`parse_config`), in which every failure names the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv3.errors import ConfigError
from dsv3.models.registry import family

SCORING_FUNCS = ("sigmoid", "softmax", "sqrtsoftplus")
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
    # DeepSeek Sparse Attention (V3.2): 0 = dense MLA
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    index_fp8: bool = False  # round indexer q/k to FP8 as the reference inference code does (default: fp32)
    # DeepSeek-V4 (sliding window + compressed attention, mHC, hash routing); 0 / empty for the other families
    head_dim: int = 0  # the single shared K=V head (V4: 512); its last qk_rope_head_dim values rotate
    sliding_window: int = 0  # raw tokens every V4 layer attends to (the query's own included)
    layer_types: tuple[str, ...] = ()  # per layer, the MTP layers after the main ones (V4_LAYER_TYPES)
    compress_rates: dict[str, int] = field(default_factory=dict)  # tokens per compressed entry, per layer type
    hc_mult: int = 0  # mHC residual streams
    hc_sinkhorn_iters: int = 0
    hc_eps: float = 0.0
    o_groups: int = 0  # grouped low-rank output projection: groups and rank per group
    o_lora_rank: int = 0
    num_hash_layers: int = 0  # the first layers route by a fixed token -> experts table
    swiglu_limit: float = 0.0  # clamp of the experts' gate/up pre-activations (0: none)
    compress_rope_theta: float = 0.0  # rotary base of the compressed layers (YaRN applies to them only)
    expert_dtype: str | None = None  # routed experts as released: "fp4" (e2m1, one e8m0 scale per 32) or None
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

    def compress_ratio(self, layer_idx: int) -> int:
        """Tokens per compressed entry of a V4 layer (MTP layers after the main ones): 0 for sliding-window only."""
        t = self.layer_types[layer_idx] if layer_idx < len(self.layer_types) else "sliding_attention"
        return self.compress_rates.get(t, 0)

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
        if not self.index_topk:  # dense MLA: no DSA fields (other families' configs do not have them)
            for k in ("index_n_heads", "index_head_dim", "index_topk", "index_fp8"):
                out.pop(k)
        elif not self.index_fp8:
            out.pop("index_fp8")
        if not self.head_dim:  # not DeepSeek-V4: none of its fields
            for k in V4_FIELDS:
                out.pop(k)
        else:
            out["layer_types"] = list(self.layer_types)
        out["architectures"] = [family(self.model_type).architecture]
        if out["quantization_config"] is None:
            del out["quantization_config"]
        family(self.model_type).write_extra(self, out)
        return out

    def save(self, model_dir: str | Path) -> None:
        Path(model_dir, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


# ---- parsing and validating config.json ---------------------------------------------------

V4_FIELDS = ("head_dim", "sliding_window", "layer_types", "compress_rates", "hc_mult", "hc_sinkhorn_iters", "hc_eps",
             "o_groups", "o_lora_rank", "num_hash_layers", "swiglu_limit", "compress_rope_theta", "expert_dtype")
REQUIRED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
)
# Router defaults per family, used only where config.json is silent (HF writes them all).


def _int(raw: dict[str, Any], key: str, default: int | None = None, minimum: int = 0) -> int:
    v = raw.get(key, default)
    if v is None:
        if default is None:
            raise ConfigError(f"config.json: required field '{key}' is missing")
        v = default
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"config.json: field '{key}' must be an integer >= {minimum}, got {v!r}")
    return v


def _float(raw: dict[str, Any], key: str, default: float) -> float:
    v = raw.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"config.json: field '{key}' must be a number, got {v!r}")
    return float(v)


def _rope(raw: dict[str, Any]):
    """Read YaRN from `rope_scaling` (classic) and/or `rope_parameters` (transformers v5)."""
    classic, params = raw.get("rope_scaling"), raw.get("rope_parameters")
    theta = raw.get("rope_theta")
    if isinstance(params, dict) and "rope_theta" in params:
        if theta is not None and float(theta) != float(params["rope_theta"]):
            raise ConfigError("config.json: 'rope_theta' contradicts 'rope_parameters.rope_theta'")
        theta = params["rope_theta"]
    theta = 10000.0 if theta is None else theta
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 1:
        raise ConfigError(f"config.json: field 'rope_theta' must be a number > 1, got {theta!r}")
    specs = [s for s in (classic, params) if isinstance(s, dict)]
    for s, name in ((classic, "rope_scaling"), (params, "rope_parameters")):
        if s is not None and not isinstance(s, dict):
            raise ConfigError(f"config.json: field '{name}' must be an object or null")
    kinds = {s.get("rope_type", s.get("type", "default")) for s in specs}
    kinds.discard("default")
    if not kinds:
        return float(theta), None
    if len(kinds) > 1 or kinds != {"yarn"}:
        raise ConfigError(f"config.json: unsupported 'rope_scaling' type {sorted(kinds)} (only yarn or none)")
    yarn = [s for s in specs if s.get("rope_type", s.get("type")) == "yarn"]
    if len(yarn) == 2 and yarn[0].get("factor") != yarn[1].get("factor"):
        raise ConfigError("config.json: 'rope_scaling.factor' contradicts 'rope_parameters.factor'")
    s = yarn[0]
    orig = s.get("original_max_position_embeddings")
    if not isinstance(orig, int) or orig <= 0:
        raise ConfigError("config.json: 'rope_scaling.original_max_position_embeddings' is missing or not a positive integer")
    factor = s.get("factor")
    if factor is None:
        factor = _int(raw, "max_position_embeddings", None, 1) / orig
    if not isinstance(factor, (int, float)) or factor < 1:
        raise ConfigError(f"config.json: 'rope_scaling.factor' must be a number >= 1, got {factor!r}")
    return float(theta), RopeScaling(
        factor=float(factor),
        original_max_position_embeddings=orig,
        beta_fast=float(s.get("beta_fast") or 32),
        beta_slow=float(s.get("beta_slow") or 1),
        mscale=s.get("mscale"),
        mscale_all_dim=s.get("mscale_all_dim"),
        truncate=bool(s.get("truncate", True)),
    )


def parse_config(cls, raw: dict[str, Any]):
    if not isinstance(raw, dict):
        raise ConfigError("config.json must contain a JSON object")
    mt = raw.get("model_type")
    fam_spec = family(mt)
    raw = fam_spec.prepare(raw)
    fam = fam_spec.defaults  # the family's fields where config.json is silent (HF writes them all)
    for key in REQUIRED:
        if key not in raw or raw[key] is None:
            raise ConfigError(f"config.json: required field '{key}' is missing")
    if "q_lora_rank" not in raw:
        raise ConfigError("config.json: required field 'q_lora_rank' is missing (use null for no query compression)")
    L = _int(raw, "num_hidden_layers", None, 1)
    E = _int(raw, "n_routed_experts", 0)
    kw: dict[str, Any] = dict(
        model_type=mt,
        vocab_size=_int(raw, "vocab_size", None, 1),
        hidden_size=_int(raw, "hidden_size", None, 1),
        num_hidden_layers=L,
        num_attention_heads=_int(raw, "num_attention_heads", None, 1),
        kv_lora_rank=_int(raw, "kv_lora_rank", None, 1),
        qk_nope_head_dim=_int(raw, "qk_nope_head_dim", None, 1),
        qk_rope_head_dim=_int(raw, "qk_rope_head_dim", None, 2),
        v_head_dim=_int(raw, "v_head_dim", None, 1),
        q_lora_rank=raw["q_lora_rank"] or None,
        n_routed_experts=E,
        first_k_dense_replace=_int(raw, "first_k_dense_replace", 0),
        moe_layer_freq=_int(raw, "moe_layer_freq", 1, 1),
        n_shared_experts=_int(raw, "n_shared_experts", 0),
        routed_scaling_factor=_float(raw, "routed_scaling_factor", 1.0),
        rms_norm_eps=_float(raw, "rms_norm_eps", 1e-6),
        max_position_embeddings=_int(raw, "max_position_embeddings", 4096, 1),
        num_nextn_predict_layers=_int(raw, "num_nextn_predict_layers", raw.get("num_mtp_layers") or 0),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        scoring_func=raw.get("scoring_func") or fam["scoring_func"],
        topk_method=raw.get("topk_method") or fam["topk_method"],
        norm_topk_prob=bool(raw.get("norm_topk_prob", fam["norm_topk_prob"])),
        hidden_act=raw.get("hidden_act", "silu"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        initializer_range=_float(raw, "initializer_range", 0.02),
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        quantization_config=raw.get("quantization_config"),
    )
    if kw["q_lora_rank"] is not None:
        kw["q_lora_rank"] = _int(raw, "q_lora_rank", None, 1)
    kw["rope_theta"], kw["rope_scaling"] = _rope(raw)
    if kw["hidden_act"] != "silu":
        raise ConfigError(f"config.json: 'hidden_act' {kw['hidden_act']!r} is not supported (only silu)")
    if kw["scoring_func"] not in SCORING_FUNCS:
        raise ConfigError(f"config.json: 'scoring_func' must be one of {', '.join(SCORING_FUNCS)}, got {kw['scoring_func']!r}")
    if kw["topk_method"] not in TOPK_METHODS:
        raise ConfigError(f"config.json: unknown 'topk_method' {kw['topk_method']!r}")
    has_dense = any(not (E > 0 and i >= kw["first_k_dense_replace"] and i % kw["moe_layer_freq"] == 0) for i in range(L))
    kw["intermediate_size"] = _int(raw, "intermediate_size", None if has_dense else 0, 1 if has_dense else 0)
    if E > 0:
        kw["moe_intermediate_size"] = _int(raw, "moe_intermediate_size", None, 1)
        K = kw["num_experts_per_tok"] = _int(raw, "num_experts_per_tok", None, 1)
        G = kw["n_group"] = _int(raw, "n_group", 1, 1)
        Gk = kw["topk_group"] = _int(raw, "topk_group", 1, 1)
        if K > E:
            raise ConfigError(f"config.json: 'num_experts_per_tok' ({K}) exceeds 'n_routed_experts' ({E})")
        if E % G:
            raise ConfigError(f"config.json: 'n_routed_experts' ({E}) is not divisible by 'n_group' ({G})")
        if Gk > G:
            raise ConfigError(f"config.json: 'topk_group' ({Gk}) exceeds 'n_group' ({G})")
        grouped = kw["topk_method"] != "greedy" and G > 1
        if grouped and K > Gk * (E // G):
            raise ConfigError(f"config.json: 'num_experts_per_tok' ({K}) exceeds the experts in 'topk_group' groups ({Gk}×{E // G})")
        if grouped and kw["topk_method"] == "noaux_tc" and E // G < 2:
            raise ConfigError(f"config.json: 'n_group' ({G}) leaves fewer than 2 experts per group for noaux_tc")
    for k in ("bos_token_id", "pad_token_id"):
        if kw[k] is not None and (isinstance(kw[k], bool) or not isinstance(kw[k], int)):
            raise ConfigError(f"config.json: field '{k}' must be an integer or null")
    fam_spec.parse_extra(raw, kw)
    known = {f.name for f in dataclasses.fields(cls)} | {"rope_parameters", "dtype", "num_mtp_layers", "architectures", "transformers_version"}
    kw["extra"] = {k: v for k, v in raw.items() if k not in known}
    return cls(**kw)
