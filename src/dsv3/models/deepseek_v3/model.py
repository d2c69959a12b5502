"""The DeepSeek-V3 transformer: embedding, pre-norm MLA + FFN blocks, final norm, LM head, MTP.

Parameter names equal the Hugging Face checkpoint names (`model.layers.3.self_attn.kv_b_proj.weight`)
except that routed experts are stacked per layer and MTP modules live in `model.mtp` — see
`dsv3.io.checkpoint` for the mapping. The same module serves inference, fine-tuning and pretraining.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3 import ops
from dsv3.attention.context import AttentionContext, DenseLatentCache
from dsv3.attention.spec import CacheSpec, mla_indexed, mla_latent
from dsv3.config import ModelConfig
from dsv3.layers.linear import Linear, native_form
from dsv3.layers.mla import MLA
from dsv3.layers.mlp import MLP
from dsv3.layers.moe import MoE
from dsv3.layers.norm import RMSNorm
from dsv3.layers.rope import RotaryEmbedding, rope_inv_freq
from dsv3.models.deepseek_v3.mtp import MTPLayer
from dsv3.ops.forms import NativeBlock, NativeModel, NativeMTP, f32_cpu


class Block(nn.Module):
    """x + MLA(norm(x)), then + FFN(norm(x)); the FFN is dense for the first layers, MoE after."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(cfg, layer_idx)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @property
    def layer_idx(self) -> int:
        return self.self_attn.layer_idx

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))

    def native_form(self) -> NativeBlock | None:
        """The block for the native whole-step kernel, or None when a part has no native form."""
        mla = self.self_attn.native_form()
        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        if mla is None or n1.eps != n2.eps or not f32_cpu(n1.weight, n2.weight):
            return None
        ffn = self.mlp
        if isinstance(ffn, MoE):
            router, experts = ffn.gate.native_form(), ffn.experts.native_form()
            shared = None if ffn.shared_experts is None else ffn.shared_experts.native_form()
            if router is None or experts is None or (ffn.shared_experts is not None and shared is None):
                return None
            return NativeBlock(mla, n1.weight, n2.weight, n1.eps, shared, router, experts)
        mlp = ffn.native_form()
        return None if mlp is None else NativeBlock(mla, n1.weight, n2.weight, n1.eps, mlp)


class DeepseekV3Model(nn.Module):
    """The `model.` part of the checkpoint: embeddings, blocks, final norm, and the MTP modules."""

    def __init__(self, cfg: ModelConfig, with_mtp: bool = True):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        n_mtp = cfg.num_nextn_predict_layers if with_mtp else 0
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + k, Block) for k in range(n_mtp))
        self.rotary = RotaryEmbedding(cfg)


class DeepseekV3ForCausalLM(nn.Module):
    """Causal LM head over `DeepseekV3Model`; `mtp_logits` runs the multi-token-prediction modules."""

    def __init__(self, cfg: ModelConfig, with_mtp: bool = True):
        super().__init__()
        self.config = cfg
        self.model = DeepseekV3Model(cfg, with_mtp)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the LM head with the embedding when the config says so (again after `to_empty`)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def dense_cache(self, batch: int, max_len: int) -> DenseLatentCache:
        """A contiguous cache for `batch` sequences of up to `max_len` positions (scoring, simple decoders)."""
        return DenseLatentCache.for_model(self, batch, max_len)

    def cache_specs(self) -> list[CacheSpec]:
        """What each attention layer caches per token, the MTP layers' after the main ones: MLA's latent (and, with
        DeepSeek Sparse Attention, the indexer's key)."""
        cfg = self.config
        spec = mla_indexed(cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim) if cfg.index_topk else \
            mla_latent(cfg.kv_lora_rank, cfg.qk_rope_head_dim)
        return [spec] * (cfg.num_hidden_layers + self.num_mtp_layers)

    def native_model(self) -> NativeModel | None:
        """What a native whole decode step reads (`dsv3.ops.decode_step`), or None when a part has no native form."""
        m = self.model
        if type(m.embed_tokens) is not nn.Embedding:  # e.g. a vocab-parallel shard: its rows are not the token ids
            return None
        blocks = [b.native_form() for b in m.layers]
        if not blocks or None in blocks or not f32_cpu(m.embed_tokens.weight, m.norm.weight, m.rotary.inv_freq):
            return None
        return NativeModel(m.embed_tokens.weight, m.rotary.inv_freq, m.rotary.attn_factor, blocks,
                           [b.layer_idx for b in m.layers], m.norm.weight, m.norm.eps, native_form(self.lm_head))

    def native_mtp(self) -> NativeMTP | None:
        """MTP module 0 as the native greedy drafter (`dsv3.ops.mtp_step`), drafting over the whole vocabulary with
        the LM head (the plan drafts with an int8 copy of an fp32 head); None without an MTP module or when a part
        has no native form."""
        if not self.num_mtp_layers:
            return None
        mtp = self.model.mtp[0]
        block, eh, head = mtp.block.native_form(), native_form(mtp.eh_proj), native_form(self.lm_head)
        norms = (mtp.enorm.weight, mtp.hnorm.weight, mtp.shared_head.norm.weight)
        if block is None or eh is None or head is None or not f32_cpu(*norms):
            return None
        return NativeMTP(block, mtp.block.layer_idx, mtp.enorm.weight, mtp.hnorm.weight, mtp.enorm.eps, mtp.hnorm.eps, eh,
                         mtp.shared_head.norm.weight, mtp.shared_head.norm.eps, head)

    def _apply(self, fn, recurse: bool = True):
        """`.to()`, `.float()`, ...: buffers come back as new tensors, so the decode plans are rebuilt."""
        out = super()._apply(fn, recurse)
        ops.invalidate(self)
        return out

    @property
    def num_mtp_layers(self) -> int:
        return len(self.model.mtp)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      ctx: AttentionContext | None = None) -> torch.Tensor:
        """input_ids [B, T] -> final-norm hidden states [B, T, D]."""
        return self._run(input_ids, positions, ctx, logits=False)[0]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                ctx: AttentionContext | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]."""
        hidden, out = self._run(input_ids, positions, ctx, logits=True)
        return out if out is not None else self.lm_head(hidden)

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor | None, ctx: AttentionContext | None,
             rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The engine's step: (hidden states [B·T, D] of every token, logits [len(rows), V] of the flattened
        `rows`). A decode step gets both from one native call (its head covers all of the step's few tokens:
        reading the head's weights once dominates); otherwise the head runs on `rows` only."""
        hidden, out = self._run(input_ids, positions, ctx, logits=True, fresh_hidden=True)
        flat = hidden.reshape(-1, hidden.shape[-1])
        if out is None:
            return flat, self.lm_head(flat[rows])
        out = out.reshape(-1, out.shape[-1])
        return flat, out if len(rows) == out.shape[0] else out[rows]  # every row, in order: no copy (rows ascend)

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor | None, ctx: AttentionContext | None,
             logits: bool, fresh_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(post-norm hidden [B, T, D], logits [B, T, V] when asked and the step ran natively with its head, else None)."""
        ctx = ctx if ctx is not None else AttentionContext()
        start = getattr(ctx, "length", 0)
        ctx.begin_step(input_ids.shape[1])
        native = ops.decode_step(self, input_ids, positions, start, ctx.native_cache(), ctx.native_slots(), logits,
                                 fresh_hidden)  # a decode step: one native call
        if native is not None:
            ctx.end_step()
            return native
        if positions is None:
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        cos, sin = self.model.rotary(positions)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, ctx)
        ctx.end_step()
        return self.model.norm(x), None

    def mtp_hidden(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                   ctx: AttentionContext | None = None, depth: int = 0) -> torch.Tensor:
        """MTP module `depth`: from the hidden state at position i and token i+1, predict token i+2.

        hidden [B, T, D] is the previous depth's output (main model: post-norm hidden states),
        next_ids [B, T] the tokens one step ahead, positions [B, T] those of `hidden`.
        """
        ctx = ctx if ctx is not None else AttentionContext()
        cos, sin = self.model.rotary(positions)
        ctx.begin_step(hidden.shape[1])
        out = self.model.mtp[depth](hidden, self.model.embed_tokens(next_ids), cos, sin, ctx)
        ctx.end_step()
        return out

    def training_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                        ctx: AttentionContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(post-norm hidden states for the LM head, the same tensor for the first MTP module)."""
        h = self.hidden_states(input_ids, positions, ctx)
        return h, h

    def mtp_head_hidden(self, h: torch.Tensor, depth: int = 0) -> torch.Tensor:
        """An MTP module's output is already what the LM head reads (the module ends with its own norm)."""
        return h

    def mtp_logits(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                   ctx: AttentionContext | None = None, depth: int = 0) -> torch.Tensor:
        return self.lm_head(self.mtp_hidden(hidden, next_ids, positions, ctx, depth))

    # ---- dtype and initialisation -------------------------------------------------------
    def cast(self, dtype: torch.dtype) -> "DeepseekV3ForCausalLM":
        """Cast floating tensors to `dtype`, keeping routers (`keep_fp32`) in fp32."""
        for module in self.modules():
            keep = getattr(module, "keep_fp32", False)
            for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if t is not None and t.is_floating_point():
                    t.data = t.data.to(torch.float32 if keep else dtype)
        ops.invalidate(self)
        return self

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (needed after building on the meta device)."""
        inv_freq, _ = rope_inv_freq(self.config)
        self.model.rotary.inv_freq = inv_freq.to(self.device)
        for m in self.modules():
            if isinstance(m, MoE):
                m.expert_load.zero_()

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Fresh initialisation for pretraining: N(0, std) matrices, unit norms, zero router bias."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        for module in self.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.zero_()

    def num_parameters(self, active: bool = False) -> int:
        """Total parameters, or those used per token (K of E routed experts) with `active=True`."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        cfg = self.config
        for m in self.modules():
            if isinstance(m, MoE):
                per_expert = m.experts.gate_up_proj[0].numel() + m.experts.down_proj[0].numel()
                total -= per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
        return total
