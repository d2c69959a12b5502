"""GGUF export: a DeepSeek-V2/V3-family checkpoint as llama.cpp's `deepseek2` architecture, in f32, f16 or q8_0.

The file is GGUF v3: a header (magic, version, tensor and key counts), typed key/value metadata, one info record
per tensor (name, dims innermost first, ggml type, offset) and the tensor data, each tensor 32-byte aligned.
Names and keys are those llama.cpp's `deepseek2` loader reads (`src/models/deepseek2.cpp`); the layout follows
what its converter writes for DeepSeek-V3:

* MLA is exported for absorption: `kv_b_proj` [H·(dn+dv), r] becomes `attn_k_b` [H, r, dn] (K part, transposed)
  and `attn_v_b` [H, dv, r]; `head_count_kv` is 1, `key_length` r + dr, `value_length` r, and the per-head sizes
  go to `key_length_mla` / `value_length_mla`.
* Routed experts are stacked (`ffn_{gate,up,down}_exps`), the router is `ffn_gate_inp` (f32) with its correction
  bias `exp_probs_b.bias`, shared experts `ffn_*_shexp`; MTP layers are not exported (llama.cpp's converter skips
  them too), a tied head is not written (llama.cpp reuses `token_embd`).
* YaRN: type, factor, original context, and `yarn_log_multiplier` = 0.1·mscale_all_dim (llama.cpp divides by 0.1).
* Types: norms, biases and the router stay f32; the other matrices are f16 (`f16`), or Q8_0 blocks of 32 — one fp16
  scale d = max|x|/127 and 32 int8 q = round(x/d) — along each row (`q8_0`; a row whose length is not a multiple
  of 32 is written f16, as llama.cpp's converter falls back); `f32` writes everything exactly.
* The tokenizer is written as llama.cpp's "gpt2" byte-level BPE (tokens, types, merges, special ids, chat
  template) from `tokenizer.json`; the vocabulary is padded with unused tokens up to the model's `vocab_size`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import torch

from dsv3.config import ModelConfig
from dsv3.errors import DSV3Error

GGUF_MAGIC, GGUF_VERSION, ALIGNMENT = b"GGUF", 3, 32
TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}  # llama_ftype
QK8_0 = 32
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
DEEPSEEK_BOS = "<｜begin▁of▁sentence｜>"


class GGUFError(DSV3Error):
    """The model cannot be written as GGUF (an unsupported family, tokenizer or type)."""


def quantize_q8_0(w: torch.Tensor) -> bytes:
    """Rows of a [..., K] tensor (K a multiple of 32) as Q8_0 blocks: fp16 d = max|x|/127, then 32 int8 round(x/d)."""
    x = w.float().reshape(-1, QK8_0)
    d = x.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(x * inv[:, None]).clamp(-127, 127).to(torch.int8)
    out = np.empty(x.shape[0], dtype=[("d", "<f2"), ("qs", "i1", (QK8_0,))])
    out["d"] = d.numpy().astype(np.float16)
    out["qs"] = q.numpy()
    return out.tobytes()


def dequantize_q8_0(raw: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `quantize_q8_0` (for tests and checks)."""
    blocks = np.frombuffer(raw, dtype=[("d", "<f2"), ("qs", "i1", (QK8_0,))])
    x = blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[:, None]
    return torch.from_numpy(x.reshape(shape))


class Writer:
    """Typed GGUF metadata values and tensors, written in one pass."""

    def __init__(self) -> None:
        self.kv: list[tuple[str, int, Any]] = []
        self.tensors: list[tuple[str, tuple[int, ...], int, bytes]] = []

    def add(self, key: str, kind: int, value: Any) -> None:
        self.kv.append((key, kind, value))

    def tensor(self, name: str, t: torch.Tensor, qtype: str) -> None:
        t = t.detach().contiguous()
        if qtype == "f32":
            raw = t.float().numpy().tobytes()
        elif qtype == "f16":
            raw = t.to(torch.float16).numpy().tobytes()
        else:
            raw = quantize_q8_0(t)
        self.tensors.append((name, tuple(t.shape), TYPES[qtype], raw))

    @staticmethod
    def _string(f: BinaryIO, s: str) -> None:
        b = s.encode("utf-8")
        f.write(struct.pack("<Q", len(b)) + b)

    def _value(self, f: BinaryIO, kind: int, v: Any) -> None:
        if kind == STRING:
            self._string(f, v)
        elif kind == ARRAY:
            sub, items = v
            f.write(struct.pack("<IQ", sub, len(items)))
            if sub == STRING:
                for s in items:
                    self._string(f, s)
            else:
                fmt = {I32: "<i", U32: "<I", F32: "<f", U8: "<B"}[sub]
                f.write(b"".join(struct.pack(fmt, x) for x in items))
        else:
            f.write(struct.pack({U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q"}[kind], v))

    def write(self, path: Path) -> None:
        with open(path, "wb") as f:
            f.write(GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(self.tensors), len(self.kv)))
            for key, kind, v in self.kv:
                self._string(f, key)
                f.write(struct.pack("<I", kind))
                self._value(f, kind, v)
            offset = 0
            for name, shape, qtype, raw in self.tensors:
                self._string(f, name)
                f.write(struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in reversed(shape)))
                f.write(struct.pack("<IQ", qtype, offset))
                offset += -(-len(raw) // ALIGNMENT) * ALIGNMENT
            f.write(b"\0" * (-f.tell() % ALIGNMENT))
            for _, _, _, raw in self.tensors:
                f.write(raw)
                f.write(b"\0" * (-len(raw) % ALIGNMENT))


def _matrix_type(t: torch.Tensor, requested: str) -> str:
    if requested == "q8_0" and t.shape[-1] % QK8_0:
        return "f16"
    return requested


def gguf_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(GGUF name, tensor, is a matrix that may be quantized) of a loaded DeepSeek-V2/V3-family model."""
    cfg = model.config
    H, dn, dv, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    yield "token_embd.weight", model.model.embed_tokens.weight, True
    yield "output_norm.weight", model.model.norm.weight, False
    if not cfg.tie_word_embeddings:
        yield "output.weight", model.lm_head.weight, True
    for i, block in enumerate(model.model.layers):
        p, a = f"blk.{i}.", block.self_attn
        yield p + "attn_norm.weight", block.input_layernorm.weight, False
        if cfg.q_lora_rank is None:
            yield p + "attn_q.weight", a.q_proj.weight, True
        else:
            yield p + "attn_q_a.weight", a.q_a_proj.weight, True
            yield p + "attn_q_a_norm.weight", a.q_a_layernorm.weight, False
            yield p + "attn_q_b.weight", a.q_b_proj.weight, True
        yield p + "attn_kv_a_mqa.weight", a.kv_a_proj_with_mqa.weight, True
        yield p + "attn_kv_a_norm.weight", a.kv_a_layernorm.weight, False
        kv_b = a.kv_b_proj.weight.view(H, dn + dv, r)
        yield p + "attn_k_b.weight", kv_b[:, :dn].transpose(1, 2), True
        yield p + "attn_v_b.weight", kv_b[:, dn:], True
        yield p + "attn_output.weight", a.o_proj.weight, True
        yield p + "ffn_norm.weight", block.post_attention_layernorm.weight, False
        mlp = block.mlp
        if hasattr(mlp, "experts"):
            yield p + "ffn_gate_inp.weight", mlp.gate.weight, False
            bias = getattr(mlp.gate, "e_score_correction_bias", None)
            if bias is not None:
                yield p + "exp_probs_b.bias", bias, False
            Im = mlp.experts.gate_up_proj.shape[1] // 2
            yield p + "ffn_gate_exps.weight", mlp.experts.gate_up_proj[:, :Im], True
            yield p + "ffn_up_exps.weight", mlp.experts.gate_up_proj[:, Im:], True
            yield p + "ffn_down_exps.weight", mlp.experts.down_proj, True
            if mlp.shared_experts is not None:
                s = mlp.shared_experts
                yield p + "ffn_gate_shexp.weight", s.gate_proj.weight, True
                yield p + "ffn_up_shexp.weight", s.up_proj.weight, True
                yield p + "ffn_down_shexp.weight", s.down_proj.weight, True
        else:
            yield p + "ffn_gate.weight", mlp.gate_proj.weight, True
            yield p + "ffn_up.weight", mlp.up_proj.weight, True
            yield p + "ffn_down.weight", mlp.down_proj.weight, True


def _metadata(w: Writer, cfg: ModelConfig, name: str, qtype: str) -> None:
    arch = "deepseek2"
    k = lambda key: f"{arch}.{key}"  # noqa: E731
    w.add("general.architecture", STRING, arch)
    w.add("general.name", STRING, name)
    w.add("general.file_type", U32, FILE_TYPE[qtype])
    w.add("general.quantization_version", U32, 2)
    w.add(k("block_count"), U32, cfg.num_hidden_layers)
    w.add(k("context_length"), U32, cfg.max_position_embeddings)
    w.add(k("embedding_length"), U32, cfg.hidden_size)
    w.add(k("feed_forward_length"), U32, cfg.intermediate_size)
    w.add(k("attention.head_count"), U32, cfg.num_attention_heads)
    w.add(k("attention.head_count_kv"), U32, 1)  # MLA as MQA over the latent
    w.add(k("rope.freq_base"), F32, float(cfg.rope_theta))
    w.add(k("attention.layer_norm_rms_epsilon"), F32, float(cfg.rms_norm_eps))
    w.add(k("expert_count"), U32, cfg.n_routed_experts)
    w.add(k("expert_used_count"), U32, cfg.num_experts_per_tok)
    w.add(k("expert_group_count"), U32, cfg.n_group or 1)
    w.add(k("expert_group_used_count"), U32, cfg.topk_group or 1)
    w.add(k("expert_gating_func"), U32, 2 if cfg.scoring_func == "sigmoid" else 1)
    w.add(k("leading_dense_block_count"), U32, cfg.first_k_dense_replace)
    w.add(k("vocab_size"), U32, cfg.vocab_size)
    if cfg.q_lora_rank is not None:
        w.add(k("attention.q_lora_rank"), U32, cfg.q_lora_rank)
    w.add(k("attention.kv_lora_rank"), U32, cfg.kv_lora_rank)
    w.add(k("attention.key_length"), U32, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add(k("attention.value_length"), U32, cfg.kv_lora_rank)
    w.add(k("attention.key_length_mla"), U32, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add(k("attention.value_length_mla"), U32, cfg.v_head_dim)
    w.add(k("expert_feed_forward_length"), U32, cfg.moe_intermediate_size)
    w.add(k("expert_shared_count"), U32, cfg.n_shared_experts or 0)
    w.add(k("expert_weights_scale"), F32, float(cfg.routed_scaling_factor))
    if cfg.norm_topk_prob:
        w.add(k("expert_weights_norm"), BOOL, True)
    w.add(k("rope.dimension_count"), U32, cfg.qk_rope_head_dim)
    rs = cfg.rope_scaling
    if rs is not None:
        if rs.mscale is not None and rs.mscale_all_dim is not None and rs.mscale != rs.mscale_all_dim:
            raise GGUFError(f"YaRN with mscale {rs.mscale} != mscale_all_dim {rs.mscale_all_dim} has no GGUF export "
                            "(llama.cpp's deepseek2 scales attention by mscale_all_dim alone)")
        w.add(k("rope.scaling.type"), STRING, "yarn")
        w.add(k("rope.scaling.factor"), F32, float(rs.factor))
        w.add(k("rope.scaling.original_context_length"), U32, int(rs.original_max_position_embeddings))
        w.add(k("rope.scaling.yarn_beta_fast"), F32, float(rs.beta_fast))
        w.add(k("rope.scaling.yarn_beta_slow"), F32, float(rs.beta_slow))
        if rs.mscale_all_dim:
            w.add(k("rope.scaling.yarn_log_multiplier"), F32, 0.1 * float(rs.mscale_all_dim))


def _tokenizer(w: Writer, model_dir: Path, cfg: ModelConfig) -> None:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFError(f"{model_dir} has no tokenizer.json: GGUF export writes byte-level BPE tokenizers only"
                        + (" (tiktoken.model tokenizers are not supported)" if (model_dir / "tiktoken.model").is_file() else ""))
    tj = json.loads(path.read_text(encoding="utf-8"))
    m = tj.get("model") or {}
    if m.get("type") != "BPE":
        raise GGUFError(f"{path}: a {m.get('type')} tokenizer; GGUF export writes byte-level BPE")
    vocab: dict[str, int] = dict(m.get("vocab") or {})
    added = {t["id"]: t for t in tj.get("added_tokens") or []}
    for i, t in added.items():
        vocab[t["content"]] = i
    n = max(cfg.vocab_size, max(vocab.values()) + 1)
    tokens, types = [f"[PAD{i}]" for i in range(n)], [5] * n  # 5: unused
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = (3 if added[i].get("special") else 4) if i in added else 1  # control, user-defined, normal
    merges = [mm if isinstance(mm, str) else " ".join(mm) for mm in m.get("merges") or []]
    w.add("tokenizer.ggml.model", STRING, "gpt2")
    w.add("tokenizer.ggml.pre", STRING, "deepseek-v3" if DEEPSEEK_BOS in vocab else "gpt-2")
    w.add("tokenizer.ggml.tokens", ARRAY, (STRING, tokens))
    w.add("tokenizer.ggml.token_type", ARRAY, (I32, types))
    w.add("tokenizer.ggml.merges", ARRAY, (STRING, merges))
    from dsv3.io.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    for key, tid in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id), ("padding_token_id", tok.pad_token_id)):
        if tid is not None:
            w.add(f"tokenizer.ggml.{key}", U32, int(tid))
    w.add("tokenizer.ggml.add_bos_token", BOOL, bool(tok.add_bos_token))
    if isinstance(tok.chat_template, str):
        w.add("tokenizer.chat_template", STRING, tok.chat_template)


def export_gguf(model_dir: str | Path, out: str | Path, qtype: str = "f16") -> Path:
    """Write `model_dir` (full precision, or DeepSeek's FP8 release, dequantized) as one GGUF file of `qtype`."""
    from dsv3.io.load import load_model

    if qtype not in TYPES:
        raise GGUFError(f"unknown GGUF type {qtype!r} (use f16, q8_0 or f32)")
    model_dir, out = Path(model_dir), Path(out)
    cfg = ModelConfig.from_dir(model_dir)
    if cfg.model_type not in ("deepseek_v3", "deepseek_v2", "kimi_k2"):
        raise GGUFError(f"model_type {cfg.model_type!r} has no GGUF export (llama.cpp's deepseek2: deepseek_v3, deepseek_v2, kimi_k2)")
    method = (cfg.quantization_config or {}).get("quant_method")
    if method not in (None, "fp8"):  # DeepSeek's FP8 release is dequantized on load; packed int4/int8 files are not
        raise GGUFError(f"{model_dir} is a quantized checkpoint ({method}); export the full-precision one "
                        "(--type q8_0 quantizes it)")
    model = load_model(model_dir, dtype="fp32", with_mtp=False, progress=False)
    w = Writer()
    _metadata(w, cfg, model_dir.name, qtype)
    _tokenizer(w, model_dir, cfg)
    with torch.no_grad():
        for name, t, matrix in gguf_tensors(model):
            w.tensor(name, t, _matrix_type(t, qtype) if matrix and qtype != "f32" else "f32")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    w.write(tmp)
    tmp.replace(out)
    return out
