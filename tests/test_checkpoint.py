"""Checkpoint I/O: FP8 block dequantization, MTP weights, sharding, and refusing bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3.io.load import load_model
from dsv3.io.checkpoint import save_model
from dsv3.errors import CheckpointError
from hf_oracle import build_hf_model

FP8_SHAPE = dict(hidden_size=256, intermediate_size=384, moe_intermediate_size=128, kv_lora_rank=160, qk_rope_head_dim=32,
                 qk_nope_head_dim=32, v_head_dim=32, q_lora_rank=192, num_attention_heads=4)
NOT_QUANTIZED = ("norm", "mlp.gate.weight", "embed_tokens", "lm_head", "e_score_correction_bias")


def fp8_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Official recipe: per 128×128 block s = amax / 448, q = fp8(w / s); edge blocks are partial."""
    N, K = w.shape
    gn, gk = -(-N // block), -(-K // block)
    padded = torch.zeros(gn * block, gk * block)
    padded[:N, :K] = w
    blocks = padded.view(gn, block, gk, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).view(gn * block, gk * block)[:N, :K].to(torch.float8_e4m3fn)
    return q, scale


@torch.no_grad()
def test_fp8_checkpoint_matches_dequantized_model(tmp_path):
    hf = build_hf_model("v3_yarn_groups", **FP8_SHAPE)
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    out, ragged = {}, []
    for name, w in tensors.items():
        if w.ndim == 2 and name.endswith(".weight") and not any(k in name for k in NOT_QUANTIZED):
            q, s = fp8_quantize(w)
            out[name], out[name + "_scale_inv"] = q, s
            if w.shape[0] % 128:
                ragged.append(name)
            tensors[name] = (q.float() * s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]])
        else:
            out[name] = w
    assert any("kv_a_proj_with_mqa" in n for n in ragged)  # 192 rows: one and a half blocks
    save_file(out, tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # The oracle: HF loading the same weights, dequantized by the test, from a plain checkpoint.
    (tmp_path / "deq").mkdir()
    save_file(tensors, tmp_path / "deq" / "model.safetensors")
    (tmp_path / "deq" / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    hf = type(hf).from_pretrained(tmp_path / "deq", attn_implementation="eager").eval()
    ours = load_model(tmp_path, dtype=torch.float32, progress=False)
    ids = torch.randint(3, hf.config.vocab_size, (1, 48))
    ref, got = hf(input_ids=ids).logits, ours(ids)
    rel = ((ref - got).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-3, f"relative logit difference {rel:.2e}"


def _add_mtp_weights(hf, path: Path) -> dict[str, torch.Tensor]:
    """Random MTP weights under the official names (layer num_hidden_layers), written to a second file."""
    L = hf.config.num_hidden_layers
    g = torch.Generator().manual_seed(7)
    mtp = {}
    for name, p in hf.state_dict().items():
        if name.startswith(f"model.layers.{L - 1}."):
            rest = name.removeprefix(f"model.layers.{L - 1}.")
            if rest.startswith("mlp.experts."):
                continue
            mtp[f"model.layers.{L}.{rest}"] = torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in rest else 0.0)
    E, Im, D = hf.config.n_routed_experts, hf.config.moe_intermediate_size, hf.config.hidden_size
    for j in range(E):
        for proj, shape in (("gate_proj", (Im, D)), ("up_proj", (Im, D)), ("down_proj", (D, Im))):
            mtp[f"model.layers.{L}.mlp.experts.{j}.{proj}.weight"] = torch.randn(shape, generator=g) * 0.1
    for n in ("enorm", "hnorm", "shared_head.norm"):
        mtp[f"model.layers.{L}.{n}.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
    mtp[f"model.layers.{L}.eh_proj.weight"] = torch.randn(D, 2 * D, generator=g) * 0.1
    mtp[f"model.layers.{L}.embed_tokens.weight"] = hf.model.embed_tokens.weight.detach().clone()
    mtp[f"model.layers.{L}.shared_head.head.weight"] = hf.lm_head.weight.detach().clone()
    save_file(mtp, path / "mtp.safetensors")
    return mtp


@torch.no_grad()
def test_mtp_logits_match_independent_computation(tmp_path):
    """MTP(t+2) logits equal HF's own decoder layer driven by hand with the stored MTP weights."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    hf = build_hf_model("v3_yarn_groups")
    hf.save_pretrained(tmp_path)
    mtp = _add_mtp_weights(hf, tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32, progress=False)
    assert len(ours.model.mtp) == 1
    L, T = hf.config.num_hidden_layers, 40
    ids = torch.randint(3, hf.config.vocab_size, (1, T))
    h = hf.model(input_ids=ids).last_hidden_state  # post-norm, as MTP consumes it
    layer = DeepseekV3DecoderLayer(hf.config, layer_idx=L).eval()
    sd = {k.removeprefix(f"model.layers.{L}."): v for k, v in mtp.items()}
    E = hf.config.n_routed_experts
    sd["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([sd[f"mlp.experts.{j}.gate_proj.weight"], sd[f"mlp.experts.{j}.up_proj.weight"]]) for j in range(E)])
    sd["mlp.experts.down_proj"] = torch.stack([sd[f"mlp.experts.{j}.down_proj.weight"] for j in range(E)])
    layer.load_state_dict({k: v for k, v in sd.items() if k in layer.state_dict()}, strict=True)

    def rms(x, w, eps=hf.config.rms_norm_eps):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    emb = hf.model.embed_tokens(ids[:, 1:])
    x = torch.cat([rms(emb, sd["enorm.weight"]), rms(h[:, :-1], sd["hnorm.weight"])], -1) @ sd["eh_proj.weight"].T
    pos = torch.arange(T - 1)[None]
    cos_sin = hf.model.rotary_emb(x, pos)
    causal = torch.full((T - 1, T - 1), float("-inf")).triu(1)[None, None]
    x = layer(x, attention_mask=causal, position_ids=pos, position_embeddings=cos_sin)
    ref = rms(x, sd["shared_head.norm.weight"]) @ sd["shared_head.head.weight"].T

    hidden = ours.hidden_states(ids)
    got = ours.mtp_logits(hidden[:, :-1], ids[:, 1:], pos)
    assert (ref - got).abs().max() <= 1e-4
    # Skipping MTP on request drops the module and its weights.
    assert len(load_model(tmp_path, dtype=torch.float32, with_mtp=False, progress=False).model.mtp) == 0


@torch.no_grad()
def test_sharded_round_trip_and_dtypes(tmp_path):
    hf = build_hf_model("v3_yarn_groups")
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", dtype=torch.float32, progress=False)
    save_model(ours, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in index["weight_map"]
    again = load_model(tmp_path / "sharded", dtype=torch.float32, progress=False)
    ids = torch.randint(3, 300, (1, 16))
    assert torch.equal(ours(ids), again(ids))
    bf16 = load_model(tmp_path / "sharded", dtype="bf16", progress=False)
    assert bf16.dtype == torch.bfloat16
    gate = bf16.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert (bf16(ids).float() - ours(ids)).abs().max() < 0.5


def test_bad_checkpoints_are_refused_with_the_culprit_named(tmp_path):
    hf = build_hf_model("v3_plain_tied")
    hf.save_pretrained(tmp_path / "ok")
    good = (tmp_path / "ok" / "model.safetensors").read_bytes()
    cfg = (tmp_path / "ok" / "config.json").read_text()

    def make(name: str, weights: bytes | None, files: dict[str, bytes] | None = None) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(cfg)
        if weights is not None:
            (d / "model.safetensors").write_bytes(weights)
        for f, data in (files or {}).items():
            (d / f).write_bytes(data)
        return d

    with pytest.raises(CheckpointError, match="pickle"):
        load_model(make("pickle", None, {"pytorch_model.bin": b"\x80\x04"}), progress=False)
    with pytest.raises(CheckpointError, match=r"truncated inside tensor '.+'"):
        load_model(make("truncated", good[: len(good) - 5000]), progress=False)
    tensors = load_file(tmp_path / "ok" / "model.safetensors")
    tensors["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.kv_b_proj\.weight' has shape \[3, 3\]"):
        load_model(make("shape", (tmp_path / "bad.safetensors").read_bytes()), progress=False)
    del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(tensors, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"kv_b_proj\.weight' is missing"):
        load_model(make("missing", (tmp_path / "missing.safetensors").read_bytes()), progress=False)
