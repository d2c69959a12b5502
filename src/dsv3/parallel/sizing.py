"""Memory arithmetic behind `dsv3 plan`: weights, latent cache and activations per device.

It follows the layout `dsv3.parallel` builds on `devices` ranks (TP = devices for attention heads,
dense/shared MLPs, embedding and head; experts partitioned by EP = devices when the expert count
divides, else split by intermediate slice); replicated: the latent down-projections, norms, the
fp32 router and MTP's eh_proj. The MLA latent cache cannot be split by heads, so every device
holds the whole cache of the sequences it serves. Weight bytes are exact for the stored formats;
activations are an estimate of one step's peak transient (a long prefill chunk at the end of the
context, with the expanded attention form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsv3.config import ModelConfig
from dsv3.parallel.layers import split

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
QUANTIZATIONS = ("none", "fp8", "int8", "int4", "awq")
RESERVE = 2**30  # per device: CUDA context, allocator slack, communication buffers
GROUP = 128  # int4/awq group size, fp8 block size


def matrix_bytes(n: int, k: int, quant: str, act_bytes: int) -> int:
    """Bytes of one [n, k] weight stored as `quant` (scales included)."""
    if quant == "fp8":
        return n * k + 4 * math.ceil(n / GROUP) * math.ceil(k / GROUP)
    if quant == "int8":
        return n * k + 4 * n
    if quant in ("int4", "awq"):
        groups = math.ceil(k / GROUP)
        return n * groups * GROUP // 2 + n * groups * 5  # packed nibbles + fp32 scale + uint8 zero per group
    return n * k * act_bytes


@dataclass
class Plan:
    devices: int
    weights: int  # bytes per device
    cache_per_token: int  # latent cache bytes per token (all layers) on every device
    activations: int
    max_model_len: int
    max_num_seqs: int

    @property
    def per_sequence(self) -> int:
        return math.ceil(self.max_model_len / 16) * 16 * self.cache_per_token

    def fixed(self) -> int:
        return self.weights + self.activations + RESERVE

    def sequences_that_fit(self, device_memory: int) -> int:
        return max(0, (device_memory - self.fixed()) // self.per_sequence)

    def needed(self) -> int:
        """Device memory for max_num_seqs sequences of max_model_len tokens."""
        return self.fixed() + self.max_num_seqs * self.per_sequence


def plan(cfg: ModelConfig, devices: int = 1, quantization: str = "none", dtype: str = "bf16",
         max_model_len: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
         kv_cache_dtype: str = "auto", with_mtp: bool = True) -> Plan:
    """Per-device memory of `cfg` on `devices` ranks (raises ParallelError when a size does not divide)."""
    a = DTYPE_BYTES[dtype]
    W, D, V, H = devices, cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads
    S = max_model_len or cfg.max_position_embeddings
    E, Im, K = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    split(H, W, 0, "num_attention_heads")
    split(V, W, 0, "vocab_size")
    Hl = H // W
    ep = W if E and E % W == 0 else 1
    q = lambda n, k: matrix_bytes(n, k, quantization, a)  # noqa: E731  quantized linear
    dqk, dv, r = cfg.qk_head_dim, cfg.v_head_dim, cfg.kv_lora_rank

    def attention() -> int:
        b = q(r + cfg.qk_rope_head_dim, D) + q(Hl * (cfg.qk_nope_head_dim + dv), r) + q(D, Hl * dv) + r * a
        if cfg.index_topk:  # DSA's indexer, replicated on every rank: wq_b, wk, LayerNorm, fp32 head weights
            Hi, Di = cfg.index_n_heads, cfg.index_head_dim
            b += q(Hi * Di, cfg.q_lora_rank) + q(Di, D) + 2 * Di * a + Hi * D * a
        if cfg.q_lora_rank is None:
            return b + q(Hl * dqk, D)
        return b + q(cfg.q_lora_rank, D) + q(Hl * dqk, cfg.q_lora_rank) + cfg.q_lora_rank * a

    def mlp(inter: int, what: str) -> int:
        split(inter, W, 0, what)
        return 2 * q(inter // W, D) + q(D, inter // W)

    def ffn(layer: int) -> int:
        if not cfg.is_moe_layer(layer):
            return mlp(cfg.intermediate_size, "intermediate_size")
        experts = (E // ep) * (2 * q(Im, D) + q(D, Im)) if ep > 1 else E * mlp(Im, "moe_intermediate_size")
        shared = mlp(cfg.n_shared_experts * Im, "n_shared_experts · moe_intermediate_size") if cfg.n_shared_experts else 0
        return experts + shared + 4 * E * (D + 1)  # fp32 router and its bias

    def block(layer: int) -> int:
        return attention() + ffn(layer) + 2 * D * a

    n_mtp = cfg.num_nextn_predict_layers if with_mtp else 0
    L = cfg.num_hidden_layers
    weights = sum(block(i) for i in range(L)) + D * a + (V // W) * D * a * (1 if cfg.tie_word_embeddings else 2)
    weights += n_mtp * (block(L) + q(D, 2 * D) + 3 * D * a)
    lat = cfg.latent_dim * (1 if kv_cache_dtype == "int8" else a) + (8 if kv_cache_dtype == "int8" else 0)
    if cfg.index_topk:  # DSA: the indexer's key per token beside the latent
        lat += cfg.index_head_dim * (1 if kv_cache_dtype == "int8" else a) + (4 if kv_cache_dtype == "int8" else 0)
    cache = (L + n_mtp) * lat
    T = min(max_num_batched_tokens, S)
    resid = 4 * T * D * a
    attn = T * ((cfg.q_lora_rank or 0) + Hl * dqk + cfg.latent_dim + Hl * dv) * a + S * Hl * (dqk + dv) * a + Hl * T * S * 4
    inter_local = max(cfg.intermediate_size // W, 1)
    moe = (T * K // ep + 1) * (3 * (Im if ep > 1 else Im // W) + D) * a + T * D * 4 if E else 0
    ffn_act = max(T * 3 * inter_local * a, moe)
    logits = 3 * max_num_seqs * V * 4
    return Plan(W, weights, cache, resid + max(attn, ffn_act) + logits, S, max_num_seqs)


def gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"
