"""The DeepSeek-V4 family's declaration and its config.json, as released and as transformers 5.24 writes it.

Released (V4-Flash / V4-Pro `config.json`): per-layer `compress_ratios` (0 / 4 / 128, the MTP layers' after
the main ones), `num_hash_layers`, `qk_rope_head_dim`, a classic `rope_scaling` YaRN section (applied to the
compressed layers only), `compress_rope_theta`, `expert_dtype` (top level or in `quantization_config`).
transformers writes `layer_types` (`sliding_attention`, `compressed_sparse_attention`,
`heavily_compressed_attention`), `compress_rates` per type (older configs: `compress_rate_csa` /
`compress_rate_hca`), `mlp_layer_types` (`hash_moe` then `moe`), `partial_rotary_factor`, and a nested
`rope_parameters` {"main": ..., "compress": ...}. Where config.json is silent, transformers' defaults apply
(DeepseekV4Config). `prepare` maps V4's spelling onto the common fields (the rotary section; the shared K=V head
as MLA's fields, which V4 does not write back), `parse` reads and checks the V4 fields, `write` spells them as
transformers does (plus the released `compress_ratios`, which also covers the MTP layers).
"""

from __future__ import annotations

from typing import Any

from dsv3.errors import ConfigError
from dsv3.models.family import ModelFamily

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
V4_LAYER_TYPES = (SLIDING, CSA, HCA)
V4_ROUTER = {"scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True}
# transformers' DeepseekV4Config defaults, used where config.json is silent
DEFAULTS = dict(head_dim=512, sliding_window=128, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, o_groups=8,
                o_lora_rank=1024, swiglu_limit=10.0, compress_rope_theta=160000.0, index_n_heads=64, index_head_dim=128,
                index_topk=512, routed_scaling_factor=1.5, n_shared_experts=1, num_nextn_predict_layers=1,
                max_position_embeddings=1048576, num_hash_layers=3)
DEFAULT_RATES = {CSA: 4, HCA: 128}
_MLA_AS_V4 = ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim")  # filled from head_dim; not written back
_V3_ONLY = _MLA_AS_V4 + ("n_group", "topk_group", "first_k_dense_replace", "moe_layer_freq", "intermediate_size",
                         "topk_method")


def _err(msg: str) -> ConfigError:
    return ConfigError(f"config.json: {msg}")


def _pos_int(raw: dict[str, Any], key: str, default: int | None = None, minimum: int = 1) -> int:
    v = raw.get(key, default)
    if v is None:
        raise _err(f"required field '{key}' is missing")
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _err(f"field '{key}' must be an integer >= {minimum}, got {v!r}")
    return v


def _num(raw: dict[str, Any], key: str, default: float, minimum: float = 0.0) -> float:
    v = raw.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < minimum:
        raise _err(f"field '{key}' must be a number >= {minimum:g}, got {v!r}")
    return float(v)


def _rope_dim(raw: dict[str, Any], head_dim: int) -> int:
    """qk_rope_head_dim as released, or head_dim · partial_rotary_factor as transformers writes it (default 1/8)."""
    prf = raw.get("partial_rotary_factor")
    if prf is not None and (isinstance(prf, bool) or not isinstance(prf, (int, float)) or not 0 < prf <= 1):
        raise _err(f"field 'partial_rotary_factor' must be a number in (0, 1], got {prf!r}")
    rd = raw.get("qk_rope_head_dim")
    if rd is None:
        rd = int(head_dim * (prf if prf is not None else 0.125))
    elif prf is not None and int(head_dim * prf) != rd:
        raise _err(f"'qk_rope_head_dim' ({rd}) contradicts 'partial_rotary_factor' ({prf}) × 'head_dim' ({head_dim})")
    if isinstance(rd, bool) or not isinstance(rd, int) or rd < 2 or rd % 2 or rd > head_dim:
        raise _err(f"field 'qk_rope_head_dim' must be an even integer in [2, head_dim={head_dim}], got {rd!r}")
    return rd


def _flat_rope(raw: dict[str, Any]) -> dict[str, Any]:
    """transformers' nested rope_parameters {"main", "compress"} as the classic rope_theta / rope_scaling / compress_rope_theta."""
    params = raw.get("rope_parameters")
    if not (isinstance(params, dict) and isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict)):
        return raw
    main, comp = params["main"], params["compress"]
    out = {k: v for k, v in raw.items() if k != "rope_parameters"}
    if main.get("rope_type", main.get("type", "default")) != "default":
        raise _err("'rope_parameters.main' must be unscaled: DeepSeek-V4's sliding-window layers use plain RoPE "
                   "(YaRN applies to the compressed layers)")
    for key, theta in (("rope_theta", main.get("rope_theta")), ("compress_rope_theta", comp.get("rope_theta"))):
        if theta is not None:
            if raw.get(key) is not None and float(raw[key]) != float(theta):
                raise _err(f"'{key}' contradicts 'rope_parameters'")
            out[key] = theta
    kind = comp.get("rope_type", comp.get("type", "default"))
    if kind == "yarn":
        out["rope_scaling"] = {"type": "yarn", **{k: v for k, v in comp.items()
                                                  if k in ("factor", "original_max_position_embeddings", "beta_fast",
                                                           "beta_slow", "truncate")}}
    elif kind != "default":
        raise _err(f"unsupported 'rope_parameters.compress' type {kind!r} (only yarn or none)")
    else:
        out.pop("rope_scaling", None)
    return out


def prepare(raw: dict[str, Any]) -> dict[str, Any]:
    """config.json with V4's spelling of shared fields mapped for the common parser: the rotary section flat, the
    single K=V head standing in for MLA's latent and head dims, transformers' defaults where silent."""
    if not isinstance(raw, dict):
        return raw
    out = dict(_flat_rope(raw))  # a copy: the caller's dict stays as it was
    for k in ("routed_scaling_factor", "n_shared_experts", "num_nextn_predict_layers", "max_position_embeddings"):
        if out.get(k) is None:  # read by the common parser, whose defaults are V3's
            out[k] = DEFAULTS[k]
    hd = _pos_int(out, "head_dim", DEFAULTS["head_dim"], 2)
    rd = _rope_dim(out, hd)
    kv_heads = out.get("num_key_value_heads", 1)
    if kv_heads != 1:
        raise _err(f"field 'num_key_value_heads' must be 1 for DeepSeek-V4 (one shared K=V head), got {kv_heads!r}")
    out.update(head_dim=hd, qk_rope_head_dim=rd, kv_lora_rank=hd, qk_nope_head_dim=max(hd - rd, 1), v_head_dim=hd)
    for k in ("intermediate_size", "first_k_dense_replace", "moe_layer_freq", "n_group", "topk_group"):
        out.pop(k, None)  # V4: every layer is MoE, one group (an HF config may carry an aliased intermediate_size)
    out.pop("partial_rotary_factor", None)
    out.pop("num_key_value_heads", None)
    return out


def _layer_types(raw: dict[str, Any], L: int, n_mtp: int, rates: dict[str, int]) -> tuple[str, ...]:
    """Per layer (main, then MTP): `layer_types` (transformers) or `compress_ratios` (released), which must agree."""
    by_ratio = {0: SLIDING, rates[CSA]: CSA, rates[HCA]: HCA}
    from_ratios = None
    ratios = raw.get("compress_ratios")
    if ratios is not None:
        if not isinstance(ratios, list) or len(ratios) < L or any(r not in by_ratio for r in ratios):
            raise _err(f"field 'compress_ratios' must list, per layer, 0, {rates[CSA]} or {rates[HCA]} "
                       f"(at least num_hidden_layers={L} entries), got {ratios!r}")
        from_ratios = [by_ratio[r] for r in ratios]
    types = raw.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) < L or any(t not in V4_LAYER_TYPES for t in types):
            raise _err(f"field 'layer_types' must list, per layer, one of {', '.join(V4_LAYER_TYPES)} "
                       f"(num_hidden_layers={L} entries), got {types!r}")
        if from_ratios is not None and from_ratios[:L] != list(types[:L]):
            raise _err("'layer_types' contradicts 'compress_ratios'")
        main = list(types[:L])
    elif from_ratios is not None:
        main = from_ratios[:L]
    else:  # transformers' default (V4-Pro): two HCA layers, then CSA / HCA alternating
        main = ([HCA] * min(L, 2) + [CSA if i % 2 else HCA for i in range(max(L - 2, 0))])[:L]
    mtp = (from_ratios or [])[L:L + n_mtp]
    return tuple(main + mtp + [SLIDING] * (n_mtp - len(mtp)))


def parse(raw: dict[str, Any], fields: dict[str, Any]) -> None:
    """Read and check the V4 fields into `fields` (ModelConfig's keywords); errors name the field."""
    L, E, H = fields["num_hidden_layers"], fields["n_routed_experts"], fields["num_attention_heads"]
    hd, rd = raw["head_dim"], raw["qk_rope_head_dim"]
    if E < 1:
        raise _err("DeepSeek-V4 needs 'n_routed_experts' >= 1 (every layer is MoE)")
    if fields["n_shared_experts"] != 1:
        raise _err(f"field 'n_shared_experts' must be 1 for DeepSeek-V4, got {fields['n_shared_experts']!r}")
    if fields["q_lora_rank"] is None:
        raise _err("DeepSeek-V4 needs 'q_lora_rank' (queries are low-rank, and the indexer reads them)")
    rates = dict(DEFAULT_RATES)
    given = raw.get("compress_rates")
    if given is not None:
        if not isinstance(given, dict) or set(given) - {CSA, HCA}:
            raise _err(f"field 'compress_rates' must map {CSA} / {HCA} to a rate, got {given!r}")
        rates.update(given)
    for key, t in (("compress_rate_csa", CSA), ("compress_rate_hca", HCA)):
        if raw.get(key) is not None:
            rates[t] = raw[key]
    for t, r in rates.items():
        if isinstance(r, bool) or not isinstance(r, int) or r < 2:
            raise _err(f"field 'compress_rates.{t}' must be an integer >= 2, got {r!r}")
    if rates[CSA] == rates[HCA]:
        raise _err(f"'compress_rates' gives both compressed kinds the rate {rates[CSA]}")
    n_mtp = fields["num_nextn_predict_layers"]
    types = _layer_types(raw, L, n_mtp, rates)
    n_hash = raw.get("num_hash_layers", DEFAULTS["num_hash_layers"])
    mlp = raw.get("mlp_layer_types")
    if mlp is not None:
        if not isinstance(mlp, list) or len(mlp) < L:
            raise _err(f"field 'mlp_layer_types' must list 'hash_moe' / 'moe' for each of the {L} layers, got {mlp!r}")
        k = next((i for i, t in enumerate(mlp[:L]) if t != "hash_moe"), L)
        if list(mlp[:L]) != ["hash_moe"] * k + ["moe"] * (L - k):
            raise _err(f"field 'mlp_layer_types' must be 'hash_moe' layers then 'moe' layers, got {mlp!r}")
        if "num_hash_layers" in raw and min(raw["num_hash_layers"], L) != k:
            raise _err("'mlp_layer_types' contradicts 'num_hash_layers'")
        n_hash = k
    fields["num_hash_layers"] = _pos_int({"num_hash_layers": n_hash}, "num_hash_layers", None, 0)
    fields.update(
        head_dim=hd, qk_rope_head_dim=rd, layer_types=types, compress_rates=rates,
        sliding_window=_pos_int(raw, "sliding_window", DEFAULTS["sliding_window"]),
        hc_mult=_pos_int(raw, "hc_mult", DEFAULTS["hc_mult"]),
        hc_sinkhorn_iters=_pos_int(raw, "hc_sinkhorn_iters", DEFAULTS["hc_sinkhorn_iters"]),
        hc_eps=_num(raw, "hc_eps", DEFAULTS["hc_eps"]), o_groups=_pos_int(raw, "o_groups", DEFAULTS["o_groups"]),
        o_lora_rank=_pos_int(raw, "o_lora_rank", DEFAULTS["o_lora_rank"]),
        swiglu_limit=_num(raw, "swiglu_limit", DEFAULTS["swiglu_limit"]),
        compress_rope_theta=_num(raw, "compress_rope_theta", DEFAULTS["compress_rope_theta"], 1.0 + 1e-9),
    )
    if (H * hd) % fields["o_groups"]:
        raise _err(f"'o_groups' ({fields['o_groups']}) must divide num_attention_heads × head_dim ({H} × {hd})")
    if CSA in types:
        for k in ("index_n_heads", "index_head_dim", "index_topk"):
            fields[k] = _pos_int(raw, k, DEFAULTS[k])
        if fields["index_head_dim"] < rd:
            raise _err(f"'index_head_dim' ({fields['index_head_dim']}) is smaller than 'qk_rope_head_dim' ({rd}): "
                       "the indexer rotates that many values")
    qc = fields.get("quantization_config") or {}
    dt = raw.get("expert_dtype", qc.get("expert_dtype") if isinstance(qc, dict) else None)
    if dt not in (None, "fp4", "fp8", "bf16"):
        raise _err(f"field 'expert_dtype' must be fp4, fp8 or null, got {dt!r}")
    fields["expert_dtype"] = dt


def write(cfg: Any, out: dict[str, Any]) -> None:
    """config.json as transformers writes it (it reads the released spelling too), plus the released per-layer
    `compress_ratios`, which also covers the MTP layers transformers does not build."""
    L = cfg.num_hidden_layers
    for k in _V3_ONLY + ("compress_rate_csa", "compress_rate_hca", "compress_ratios", "mlp_layer_types"):
        out.pop(k, None)
    out["layer_types"] = list(cfg.layer_types[:L])
    out["compress_ratios"] = [cfg.compress_ratio(i) for i in range(len(cfg.layer_types))]
    out["mlp_layer_types"] = ["hash_moe"] * min(cfg.num_hash_layers, L) + ["moe"] * max(L - cfg.num_hash_layers, 0)
    out["num_key_value_heads"] = 1
    out["partial_rotary_factor"] = cfg.qk_rope_head_dim / cfg.head_dim
    if not any(t == CSA for t in cfg.layer_types):
        for k in ("index_n_heads", "index_head_dim", "index_topk", "index_fp8"):
            out.pop(k, None)
    if cfg.expert_dtype is None:
        out.pop("expert_dtype", None)


FAMILIES = [ModelFamily(
    "deepseek_v4", "DeepseekV4ForCausalLM", "dsv3.models.deepseek_v4.model:DeepseekV4ForCausalLM",
    "dsv3.models.deepseek_v4.weights", "dsv3.models.deepseek_v4.shard:parallelize", V4_ROUTER,
    ("wq_a", "wq_b", "wkv", "wo_b", "w1", "w2", "w3"), (),
    config_parser="dsv3.models.deepseek_v4.family:parse", config_prepare="dsv3.models.deepseek_v4.family:prepare",
    config_writer="dsv3.models.deepseek_v4.family:write",
    unsupported={"quantization": "the packed formats do not lay out its compressors, grouped output projection and "
                                 "MTP modules yet; run it in bf16/fp32",
                 "finetuning": "its compressed attention runs unpadded whole sequences, and the fine-tuner batches "
                               "padded rows"},
    whole_sequences=True)]
