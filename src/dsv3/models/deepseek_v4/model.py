"""The DeepSeek-V4 network, following the official inference code (`inference/model.py`) and the V4 report.

    h = embed(x) copied to hc_mult streams
    per layer: h = hc_post(attn(attn_norm(hc_pre(h))), h), then the same with ffn / ffn_norm   (mHC, layers.hyper)
    logits = head(norm(hc_head(h)))

Attention (`Attention`): low-rank queries (wq_a -> q_norm -> wq_b, then an unweighted RMSNorm per head), one
shared K=V head (wkv -> kv_norm), the rotary on each head's last `qk_rope_head_dim` values (plain RoPE with
`rope_theta` on sliding-window layers; `compress_rope_theta` with YaRN, without YaRN's magnitude factor, on
compressed ones). A query at position p attends, in one softmax with a learned per-head sink logit, to

  * the raw K=V of positions (p − sliding_window, p]  (every layer);
  * compressed entries whose tokens are all <= p, i.e. entry w with (w+1)·ratio <= p+1 (`layers.compressor`):
    all of them (HCA, ratio 128), or the `index_topk` an indexer scores best (CSA, ratio 4): its queries
    wq_b(q_norm(...)) per index head, its keys an overlapping compressor of its own, score
    Σ_h w_h(p)·relu(q_h·k), w = weights_proj(x)·(index_head_dim·index_n_heads)^-½, ties to the earliest entry.

The output's rotary values are rotated back (position −p), then the grouped low-rank projection: o_groups groups
of heads each through their block of wo_a, concatenated, then wo_b. The MoE (`MoE`): hash routing (`tid2eid`)
in the first `num_hash_layers` layers, sqrtsoftplus scores + bias otherwise, experts and the shared expert with
`swiglu_limit`. MTP module k (`MTPBlock`, checkpoint `mtp.k`) mixes the main model's final streams with the
next token's embedding (e_proj / h_proj) and runs one more block and its own head collapse.

Every attention layer runs against a `V4State` (`state.py`); a forward without one uses a fresh state, so the
full forward and incremental decoding share one code path.

Training: the top-k choice passes no gradient to the indexer, so in training mode a CSA layer also computes
DeepSeek-V3.2's indexer objective (`Attention.index_loss`): KL from the main attention's distribution over the
visible compressed entries (per-head softmax, summed over heads, L1-normalised, detached) to the softmax of the
index scores, with the indexer's inputs detached, so that objective trains the indexer and nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.attention.backend import backend_for
from dsv3.attention.context import AttentionContext, SequenceStates
from dsv3.attention.spec import CacheSpec, v4_compressed, v4_window
from dsv3.config import ModelConfig
from dsv3.layers.compressor import Compressor, FP32Linear, pool
from dsv3.layers.hash_gate import HashGate
from dsv3.layers.hyper import hc_head, hc_post, hc_pre
from dsv3.layers.linear import Linear
from dsv3.layers.moe import Experts, Gate, LoadTracking, run_experts
from dsv3.layers.norm import RMSNorm
from dsv3.layers.rope import RotaryEmbedding, apply_rotary_tail, rope_inv_freq
from dsv3.models.deepseek_v4.family import CSA, SLIDING
from dsv3.models.deepseek_v4.paged import PagedV4State
from dsv3.models.deepseek_v4.state import LayerState, V4State

SCORES_BUDGET = 1 << 24  # attention scores held at once (fp32 values): queries are processed in chunks below this


class Rope(NamedTuple):
    """This step's rotary tables: (cos, sin) [B, T, rd/2] of the plain and the compressed layers' rotaries, and
    the compressed rotary for any positions (the entries')."""
    main: tuple[torch.Tensor, torch.Tensor]
    compress: tuple[torch.Tensor, torch.Tensor]
    at: Any


def visible_entries(pos: torch.Tensor, n: int, ratio: int) -> torch.Tensor:
    """bool [T, n]: compressed entry w may be seen from position p iff all its tokens are <= p, (w+1)·ratio <= p+1
    (the official code's `arange(n) < (p+1) // ratio`)."""
    return torch.arange(1, n + 1, device=pos.device)[None] * ratio <= pos[:, None] + 1


def sink_attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Softmax attention with one learned sink logit per head (in the denominator only), K = V:
    q [B, T, H, d], kv [B, S, d], mask [B, T, S] (True: may attend) -> [B, T, H, d]."""
    B, T, H, d = q.shape
    S = kv.shape[1]
    scores = torch.bmm(q.reshape(B, T * H, d), kv.transpose(1, 2)).view(B, T, H, S).float() * scale
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    sink = sinks.float().view(1, 1, H)
    top = torch.maximum(scores.amax(-1), sink)
    p = torch.exp(scores - top[..., None])
    denom = p.sum(-1) + torch.exp(sink - top)
    o = torch.bmm(p.to(kv.dtype).view(B, T * H, S), kv).view(B, T, H, d)
    return (o.float() / denom[..., None]).to(q.dtype)


def sink_attention_gathered(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, picked: torch.Tensor,
                            picked_mask: torch.Tensor, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """`sink_attention` over shared keys kv [B, S, d] (mask [B, T, S]) plus each query's own gathered keys
    picked [B, T, K, d] (picked_mask [B, T, K]) in the same softmax: DSA's top-k entries without a dense mask."""
    B, T, H, d = q.shape
    S = kv.shape[1]
    shared = torch.bmm(q.reshape(B, T * H, d), kv.transpose(1, 2)).view(B, T, H, S)
    own = torch.matmul(q, picked.transpose(2, 3))  # [B, T, H, K]
    scores = torch.cat([shared, own], dim=-1).float() * scale
    scores = scores.masked_fill(~torch.cat([mask, picked_mask], dim=-1)[:, :, None], float("-inf"))
    sink = sinks.float().view(1, 1, H)
    top = torch.maximum(scores.amax(-1), sink)
    p = torch.exp(scores - top[..., None])
    denom = p.sum(-1) + torch.exp(sink - top)
    p = p.to(kv.dtype)
    o = torch.bmm(p[..., :S].reshape(B, T * H, S), kv).view(B, T, H, d) + torch.matmul(p[..., S:], picked)
    return (o.float() / denom[..., None]).to(q.dtype)


class DecodeRows(NamedTuple):
    """A batch of single-token decodes under the paged engine (`paged.py`): each row's state slot, position and
    entry pool rows per compression ratio ([B, n] padded; row b's first (p_b + 1) // ratio are its visible ones)."""
    state: Any  # PagedV4State
    slots: torch.Tensor  # [B] int64
    starts: torch.Tensor  # [B] int64: the token's position
    rows: dict[int, torch.Tensor]


class Indexer(nn.Module):
    """CSA's lightning indexer (official names): wq_b, weights_proj and its own overlapping compressor."""

    def __init__(self, cfg: ModelConfig, ratio: int):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim)
        self.weights_proj = FP32Linear(cfg.hidden_size, self.n_heads)
        self.compressor = Compressor(cfg.hidden_size, self.head_dim, ratio, True, cfg.rms_norm_eps)
        self.scale = self.head_dim ** -0.5 * self.n_heads ** -0.5

    def queries(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries [B, T, Hi, Di] rotated like the layer's, head weights [B, T, Hi] with the scales folded in, fp32)."""
        B, T, _ = x.shape
        q = apply_rotary_tail(self.wq_b(qr).view(B, T, self.n_heads, self.head_dim), cos[:, :, None], sin[:, :, None])
        return q, self.weights_proj(x.float()).float() * self.scale


class Attention(nn.Module):
    """One V4 attention layer, official names: wq_a, q_norm, wq_b, wkv, kv_norm, wo_a, wo_b, attn_sink, and a
    compressor (+ indexer) on compressed layers."""

    keep_fp32 = True  # attn_sink

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        D, H, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.n_heads, self.head_dim, self.window = H, hd, cfg.sliding_window
        self.n_groups, self.o_rank, self.eps = cfg.o_groups, cfg.o_lora_rank, cfg.rms_norm_eps
        self.ratio = cfg.compress_ratio(layer_idx)
        self.kind = cfg.layer_types[layer_idx] if layer_idx < len(cfg.layer_types) else SLIDING
        self.scale = hd ** -0.5
        self.attn_sink = nn.Parameter(torch.empty(H))
        self.wq_a = Linear(D, cfg.q_lora_rank)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, H * hd)
        self.wkv = Linear(D, hd)
        self.kv_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.wo_a = Linear(H * hd // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, D)
        self.compressor = Compressor(D, hd, self.ratio, self.kind == CSA, cfg.rms_norm_eps) if self.ratio else None
        self.indexer = Indexer(cfg, self.ratio) if self.kind == CSA else None
        self.index_loss: torch.Tensor | None = None  # the last training forward's indexer KL (CSA layers)

    def forward(self, x: torch.Tensor, rope: Rope, st: LayerState | DecodeRows, start: int) -> torch.Tensor:
        """x [B, T, D] at positions start .. start+T-1 (after `start` tokens already in `st`) -> [B, T, D]."""
        if isinstance(st, DecodeRows):
            return self.decode(x, rope, st)
        B, T, _ = x.shape
        cos, sin = rope.main if self.ratio == 0 else rope.compress
        q, qr, kv = self._qkv(x, cos, sin)
        # the window: the ring's tokens before this step (in position order), then this step's
        W, win = min(start, self.window), self.window
        old = st.ring[:, torch.arange(start - W, start, device=x.device) % win]
        keys_w = torch.cat([old, kv.to(st.ring.dtype)], dim=1)
        keep = min(T, win)
        st.ring[:, torch.arange(start + T - keep, start + T, device=x.device) % win] = kv[:, T - keep:].to(st.ring.dtype)
        entries = iq = iw = None
        if self.ratio:
            entries = self._compress(self.compressor, x, st.carry_kv, st.carry_score, st.entries, start, rope)
            if self.indexer is not None:
                ic = self.indexer.compressor
                xi, qri = (x.detach(), qr.detach()) if self.training else (x, qr)  # the selection has no gradient anyway
                self._compress(ic, xi, st.index_carry_kv, st.index_carry_score, st.index_keys, start, rope)
                iq, iw = self.indexer.queries(xi, qri, cos, sin)
        o = self._attend(q, keys_w, start - W, start, entries, st.index_keys, iq, iw)
        if self.training and iq is not None:
            self.index_loss = self._index_kl(q, entries, st.index_keys, iq, iw, start)
        return self._output(o, cos, sin)

    def _index_kl(self, q: torch.Tensor, entries: torch.Tensor, index_keys: torch.Tensor, iq: torch.Tensor,
                  iw: torch.Tensor, start: int) -> torch.Tensor:
        """Mean over queries that see two or more entries of KL(p || softmax(index scores)), p the main attention's
        distribution over the visible entries (V3.2's dense warm-up objective, here at every training step)."""
        B, T, H, _ = q.shape
        r, dev = self.ratio, q.device
        total, count = q.new_zeros((), dtype=torch.float32), 0
        for c0 in range(0, T, 256):
            c1 = min(T, c0 + 256)
            pos = torch.arange(start + c0, start + c1, device=dev)
            n = (start + c1) // r
            vis = visible_entries(pos, n, r)  # [c, n]
            rows = vis.sum(-1) >= 2
            if n < 2 or not bool(rows.any()):
                continue
            with torch.no_grad():
                logits = torch.einsum("bthd,bnd->bthn", q[:, c0:c1].float(), entries[:, :n].float()) * self.scale
                p = logits.masked_fill(~vis[None, :, None], float("-inf")).softmax(-1).sum(2)
                p = p / p.sum(-1, keepdim=True)  # [B, c, n]
            scores = backend_for(dev).index_scores(iq[:, c0:c1], iw[:, c0:c1], index_keys[:, :n])
            logq = scores.masked_fill(~vis[None], float("-inf")).log_softmax(-1)
            kl = (p * (p.clamp_min(1e-30).log() - logq.clamp_min(-1e30))).masked_fill(~vis[None], 0.0).sum(-1)
            total = total + kl[:, rows].sum()
            count += int(rows.sum()) * B
        return total / max(count, 1)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rotated, per-head normalised queries [B, T, H, hd], the query latent q_norm(wq_a(x)), rotated K=V [B, T, hd])."""
        B, T, _ = x.shape
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).view(B, T, self.n_heads, self.head_dim)
        q = q * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + self.eps).to(q.dtype)
        q = apply_rotary_tail(q, cos[:, :, None], sin[:, :, None])
        kv = apply_rotary_tail(self.kv_norm(self.wkv(x)), cos, sin)
        return q, qr, kv

    def _output(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Attention output [B, T, H, hd] -> [B, T, D]: the values' rotation undone at the query position, then the
        grouped low-rank projection."""
        B, T = o.shape[:2]
        o = apply_rotary_tail(o, cos[:, :, None], -sin[:, :, None])
        G = self.n_groups
        wo_a = self.wo_a.weight.view(G, self.o_rank, -1)
        o = torch.einsum("btgd,grd->btgr", o.reshape(B, T, G, -1), wo_a.to(o.dtype))
        return self.wo_b(o.flatten(2))

    def decode(self, x: torch.Tensor, rope: Rope, d: DecodeRows) -> torch.Tensor:
        """One new token per row, x [B, 1, D], each at its own position over its own state (paged engine): the
        window from the slot's ring, then the compressed entries -- the indexer's top-k of them on CSA layers,
        gathered from the pool, or every visible one on HCA layers -- in one softmax with the sink."""
        cos, sin = rope.main if self.ratio == 0 else rope.compress
        q, qr, kv = self._qkv(x, cos, sin)
        st = d.state.layers[self.layer_idx]
        win, dev = self.window, x.device
        st.ring[d.slots, d.starts % win] = kv[:, 0].to(st.ring.dtype)
        keys = st.ring[d.slots]  # [B, win, hd]
        j = torch.arange(win, device=dev)
        held = d.starts[:, None] - (d.starts[:, None] - j[None]) % win  # the position ring slot j holds
        mask = held >= 0
        if self.ratio:
            r = self.ratio
            rows = d.rows[r]
            pool = d.state.entries[self.layer_idx]
            self._compress_rows(self.compressor, x, st.carry_kv, st.carry_score, pool, d, rope)
            visible = (d.starts + 1) // r
            n = int(visible.max())
            rows = rows[:, :n]
            valid = torch.arange(n, device=dev)[None] < visible[:, None]  # [B, n]
            if self.indexer is not None and n:
                ipool = d.state.index_keys[self.layer_idx]
                self._compress_rows(self.indexer.compressor, x, st.index_carry_kv, st.index_carry_score, ipool, d, rope)
                if n > self.indexer.topk:  # else every visible entry is among the top k
                    iq, iw = self.indexer.queries(x, qr, cos, sin)
                    idx, ok = backend_for(dev).index_topk(iq, iw, ipool[rows], visible[:, None], self.indexer.topk)
                    rows, valid = rows.gather(1, idx[:, 0]), ok[:, 0]  # [B, k]
            elif self.indexer is not None:  # no entry visible yet: the indexer's compressor still advances
                ipool = d.state.index_keys[self.layer_idx]
                self._compress_rows(self.indexer.compressor, x, st.index_carry_kv, st.index_carry_score, ipool, d, rope)
            keys = torch.cat([keys, pool[rows].to(keys.dtype)], dim=1)
            mask = torch.cat([mask, valid], dim=1)
        o = sink_attention(q, keys.to(q.dtype), mask[:, None], self.attn_sink, self.scale)
        return self._output(o, cos, sin)

    def _compress_rows(self, comp: Compressor, x: torch.Tensor, carry_kv: torch.Tensor, carry_score: torch.Tensor,
                       pool: torch.Tensor, d: DecodeRows, rope: Rope) -> None:
        """`pool()` for one token per row at its own position: append it to its slot's carry; rows that complete a
        window pool it (CSA: beside the previous window's first halves) into the entry written at its pool row."""
        r, ov = self.ratio, comp.overlap
        off = r if ov else 0
        xf = x[:, 0].float()
        kv = comp.wkv(xf).float()
        score = comp.wgate(xf).float() + comp.ape.float()[d.starts % r]
        cur = d.starts % r
        ck, cs = carry_kv[d.slots], carry_score[d.slots]  # [B, c·r, c·d]
        b = torch.arange(x.shape[0], device=x.device)
        ck[b, off + cur], cs[b, off + cur] = kv, score
        done = cur == r - 1
        if bool(done.any()):
            win_kv, win_sc = ck[done, off:off + r], cs[done, off:off + r]
            if ov:
                h = kv.shape[-1] // 2
                slots_kv = torch.cat([ck[done, :r, :h], win_kv[..., h:]], dim=1)
                slots_sc = torch.cat([cs[done, :r, :h], win_sc[..., h:]], dim=1)
                ck[done, :r], cs[done, :r] = win_kv, win_sc
            else:
                slots_kv, slots_sc = win_kv, win_sc
            pooled = (slots_kv * slots_sc.softmax(dim=1)).sum(dim=1)  # [nd, d]
            w = d.starts[done] // r
            cos, sin = rope.at((w * r)[:, None])
            pool[d.rows[r][done, w]] = comp.finish(pooled[:, None], cos, sin, pool.dtype)[:, 0]
        carry_kv[d.slots], carry_score[d.slots] = ck, cs

    def _compress(self, comp: Compressor, x: torch.Tensor, carry_kv: torch.Tensor, carry_score: torch.Tensor,
                  store: torch.Tensor, start: int, rope: Rope) -> None:
        """Pool this step's tokens into `comp`'s carry and write the entries they complete into `store`."""
        kv, score = comp.project(x, start)
        pooled = pool(kv, score, carry_kv, carry_score, start, self.ratio, comp.overlap)
        n0, n = start // self.ratio, pooled.shape[1]
        if n:
            cos, sin = rope.at((torch.arange(n0, n0 + n, device=x.device) * self.ratio)[None])
            store[:, n0:n0 + n] = comp.finish(pooled, cos, sin, store.dtype)
        return store

    def _attend(self, q: torch.Tensor, keys_w: torch.Tensor, first: int, start: int, entries: torch.Tensor | None,
                index_keys: torch.Tensor | None, iq: torch.Tensor | None, iw: torch.Tensor | None) -> torch.Tensor:
        """Queries at positions start.. over the window keys (positions first..) and the visible compressed entries,
        a chunk of queries at a time."""
        B, T, H, hd = q.shape
        win, r, dev = self.window, self.ratio, q.device
        n_entries = (start + T) // r if r else 0
        sparse = iq is not None and n_entries > self.indexer.topk  # gather each query's top-k, not a dense mask
        width = (win + min(T, 1024)) * H + self.indexer.topk * (H + hd) if sparse else H * (win + n_entries + min(T, 1024))
        # at most two windows of queries a chunk: a chunk of c queries scores c + window - 1 window keys and each query
        # keeps `window` of them, so a 1,024-query chunk did 8x the needed work at window 128 (a training step of a
        # 2,048-token row took 2.5x as long as with 256-query chunks)
        chunk = max(1, min(T, SCORES_BUDGET // width, 2 * win))
        out = torch.empty_like(q)
        be = backend_for(dev)
        for c0 in range(0, T, chunk):
            c1 = min(T, c0 + chunk)
            pos = torch.arange(start + c0, start + c1, device=dev)
            lo = max(first, start + c0 - win + 1)
            kp = torch.arange(lo, start + c1, device=dev)
            mask = ((kp[None] <= pos[:, None]) & (kp[None] > pos[:, None] - win))[None].expand(B, -1, -1)
            keys = keys_w[:, lo - first: start + c1 - first]
            if r:
                ev = (start + c1) // r  # entries the chunk's last query may see
                if sparse and ev > self.indexer.topk:
                    with torch.no_grad():  # a choice: no gradient, so no graph kept in training (`_index_kl` trains it)
                        n_visible = ((pos + 1) // r)[None].expand(B, -1)  # the entries `visible_entries` allows
                        idx, ok = be.index_topk(iq[:, c0:c1], iw[:, c0:c1], index_keys[:, :ev], n_visible,
                                                self.indexer.topk)  # [B, c, k]
                    ents = entries[:, :ev]
                    flat = (idx + torch.arange(B, device=dev)[:, None, None] * ev).flatten()
                    picked = ents.reshape(B * ev, -1)[flat].view(*idx.shape, -1).to(q.dtype)
                    out[:, c0:c1] = sink_attention_gathered(q[:, c0:c1], keys.to(q.dtype), mask, picked, ok,
                                                            self.attn_sink, self.scale)
                    continue
                vis = visible_entries(pos, ev, r)[None].expand(B, -1, -1)
                if iq is not None and ev:
                    with torch.no_grad():
                        vis = be.sparse_mask(iq[:, c0:c1], iw[:, c0:c1], index_keys[:, :ev], vis, self.indexer.topk)
                keys = torch.cat([keys, entries[:, :ev]], dim=1)
                mask = torch.cat([mask, vis], dim=2)
            out[:, c0:c1] = sink_attention(q[:, c0:c1], keys.to(q.dtype), mask, self.attn_sink, self.scale)
        return out


class SharedExpert(nn.Module):
    """The shared expert (official names w1 gate, w3 up, w2 down) with the same clamp as the routed ones."""

    def __init__(self, dim: int, inter: int, limit: float):
        super().__init__()
        self.w1, self.w2, self.w3 = Linear(dim, inter), Linear(inter, dim), Linear(dim, inter)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(x).float(), self.w3(x).float()
        if self.limit:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return self.w2((F.silu(gate) * up).to(x.dtype))


class MoE(LoadTracking):
    """gate (hash-routed: `HashGate`; else sqrtsoftplus + bias: `Gate`), stacked routed experts, one shared expert.
    Counts its tokens per expert for the trainer's balancing (`LoadTracking`); a hash layer's gate has no selection
    bias, so only its counts are reported."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.hash = layer_idx < cfg.num_hash_layers
        self.gate = HashGate(cfg) if self.hash else Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = SharedExpert(cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit)
        self.limit = cfg.swiglu_limit
        self._init_load(cfg.n_routed_experts)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, idx, scores = self.gate(flat, input_ids.reshape(-1)) if self.hash else self.gate(flat)
        self._record(scores, idx)
        y = run_experts(self.experts, flat, idx, weights.float(), self.limit) + self.shared_experts(flat)
        return y.view(x.shape)


class Block(nn.Module):
    """attn + ffn between mHC mixings; hc_{attn,ffn}_{fn,base,scale} as the official checkpoint names them."""

    keep_fp32 = True  # the hc_* parameters

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn = Attention(cfg, layer_idx)
        self.ffn = MoE(cfg, layer_idx)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        n = cfg.hc_mult
        mix, dim = (2 + n) * n, n * cfg.hidden_size
        self.hc_attn_fn, self.hc_ffn_fn = nn.Parameter(torch.empty(mix, dim)), nn.Parameter(torch.empty(mix, dim))
        self.hc_attn_base, self.hc_ffn_base = nn.Parameter(torch.empty(mix)), nn.Parameter(torch.empty(mix))
        self.hc_attn_scale, self.hc_ffn_scale = nn.Parameter(torch.empty(3)), nn.Parameter(torch.empty(3))
        self.hc = (cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, input_ids: torch.Tensor, rope: Rope, st: LayerState, start: int) -> torch.Tensor:
        """Streams h [B, T, n, D] -> [B, T, n, D]."""
        x, post, comb = hc_pre(h, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, *self.hc)
        h = hc_post(self.attn(self.attn_norm(x), rope, st, start), h, post, comb)
        x, post, comb = hc_pre(h, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, *self.hc)
        return hc_post(self.ffn(self.ffn_norm(x), input_ids), h, post, comb)


class MTPBlock(Block):
    """MTP module k (checkpoint `mtp.k`): e_proj(enorm(embed(x_{i+1}))) + h_proj(hnorm(h_i)) per stream, one block,
    then its own head collapse (hc_head_*) and norm; the embedding and the output head are the main model's."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        D, n = cfg.hidden_size, cfg.hc_mult
        self.e_proj, self.h_proj = Linear(D, D), Linear(D, D)
        self.enorm, self.hnorm, self.norm = RMSNorm(D, cfg.rms_norm_eps), RMSNorm(D, cfg.rms_norm_eps), \
            RMSNorm(D, cfg.rms_norm_eps)
        self.hc_head_fn = nn.Parameter(torch.empty(n, n * D))
        self.hc_head_base = nn.Parameter(torch.empty(n))
        self.hc_head_scale = nn.Parameter(torch.empty(1))

    def mix(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.e_proj(self.enorm(emb)).unsqueeze(2) + self.h_proj(self.hnorm(h))


class DeepseekV4Model(nn.Module):
    """Embedding, blocks, the head collapse (hc_head_*), final norm, MTP modules and the two rotaries."""

    keep_fp32 = True  # the hc_head_* parameters

    def __init__(self, cfg: ModelConfig, with_mtp: bool = True):
        super().__init__()
        n, D = cfg.hc_mult, cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, D)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(D, cfg.rms_norm_eps)
        self.hc_head_fn = nn.Parameter(torch.empty(n, n * D))
        self.hc_head_base = nn.Parameter(torch.empty(n))
        self.hc_head_scale = nn.Parameter(torch.empty(1))
        n_mtp = cfg.num_nextn_predict_layers if with_mtp else 0
        self.mtp = nn.ModuleList(MTPBlock(cfg, cfg.num_hidden_layers + k) for k in range(n_mtp))
        main, comp = _rope_configs(cfg)
        self.rotary_main, self.rotary_compress = RotaryEmbedding(main), RotaryEmbedding(comp)
        self.rotary_compress.attn_factor = 1.0  # V4 keeps cos/sin unscaled under YaRN (official code, HF alike)


def _rope_configs(cfg: ModelConfig) -> tuple[ModelConfig, ModelConfig]:
    """The plain rotary of sliding-window layers (rope_theta, never YaRN) and the compressed layers' one
    (compress_rope_theta, with the config's YaRN)."""
    return (dataclasses.replace(cfg, rope_scaling=None),
            dataclasses.replace(cfg, rope_theta=cfg.compress_rope_theta))


class DeepseekV4ForCausalLM(nn.Module):
    """Causal LM over `DeepseekV4Model`; the `lm_head` is the checkpoint's `head`.

    `forward` / `hidden_states` run whole sequences (a fresh state) or continue a `V4State`; `step` returns the
    final mHC streams flattened [N, hc_mult·D] as its hidden states, which `mtp_hidden` takes (with a `V4State`
    of the MTP layers, `V4State(model, batch, max_len, mtp=True)`) and `mtp_logits` turns into logits.
    """

    def __init__(self, cfg: ModelConfig, with_mtp: bool = True):
        super().__init__()
        self.config = cfg
        self.model = DeepseekV4Model(cfg, with_mtp)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def num_mtp_layers(self) -> int:
        return len(self.model.mtp)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def cache_specs(self) -> list[CacheSpec]:
        """Per attention layer (MTP after the main ones), what `V4State` keeps: the window ring, compressed entries
        (+ indexer keys on CSA layers) and the compressors' carry."""
        cfg, out = self.config, []
        hd, win = cfg.head_dim, cfg.sliding_window
        for i in range(cfg.num_hidden_layers + self.num_mtp_layers):
            r = cfg.compress_ratio(i)
            if not r:
                out.append(v4_window(hd, win))
            elif cfg.layer_types[i] == CSA:  # two carries of [2r, 2d] (kv, score), and the indexer's
                out.append(v4_compressed(hd, win, r, 2 * (2 * r) * (2 * hd) + 2 * (2 * r) * (2 * cfg.index_head_dim),
                                         cfg.index_head_dim))
            else:
                out.append(v4_compressed(hd, win, r, 2 * r * hd))
        return out

    # ---- forward passes ---------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor) -> Rope:
        m = self.model
        return Rope(m.rotary_main(positions), m.rotary_compress(positions), m.rotary_compress)

    def _state(self, ctx: Any, batch: int, num_tokens: int, mtp: bool = False) -> V4State:
        if isinstance(ctx, V4State):
            return ctx
        if ctx is not None and (type(ctx) is not AttentionContext or ctx.mask is not None):
            raise ValueError("DeepSeek-V4 runs unpadded whole sequences or a V4State (its compressed entries follow "
                             "token positions); a padding or document mask is not supported")
        return V4State.fresh(self, batch, num_tokens, mtp)

    def _positions(self, input_ids: torch.Tensor, positions: torch.Tensor | None, start: int) -> torch.Tensor:
        T = input_ids.shape[1]
        expect = torch.arange(start, start + T, device=input_ids.device)
        if positions is None:
            return expect.expand_as(input_ids)
        if positions.shape != input_ids.shape or not bool((positions == expect).all()):
            raise ValueError(f"DeepSeek-V4 positions must be {start}..{start + T - 1} for every sequence "
                             "(the state's length onwards)")
        return positions

    def streams(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, ctx: Any = None) -> torch.Tensor:
        """input_ids [B, T] -> the final mHC streams [B, T, hc_mult, D]."""
        if isinstance(ctx, SequenceStates):
            return self._streams_paged(input_ids, ctx)
        B, T = input_ids.shape
        state = self._state(ctx, B, T)
        start = state.length
        state.begin_step(T)
        rope = self._rope(self._positions(input_ids, positions, start))
        h = self.model.embed_tokens(input_ids).unsqueeze(2).repeat(1, 1, self.config.hc_mult, 1)
        for layer in self.model.layers:
            h = layer(h, input_ids, rope, state.layer(layer.layer_idx), start)
        state.end_step()
        return h

    def dense_cache(self, batch: int, max_len: int) -> V4State:
        """A contiguous state for `batch` sequences of up to `max_len` positions (scoring, simple decoders)."""
        return V4State(self, batch, max_len)

    def paged_state(self, num_slots: int, num_blocks: int, block_size: int, max_snapshots: int = 0) -> PagedV4State:
        """The paged engine's cache for this model (`paged.py`): `num_slots` running sequences, `num_blocks` blocks,
        and up to `max_snapshots` slot states kept at cached block ends (prefix caching)."""
        return PagedV4State(self, num_slots, num_blocks, block_size, max_snapshots)

    def _streams_paged(self, input_ids: torch.Tensor, ctx: SequenceStates) -> torch.Tensor:
        """An engine step ([1, N] flat tokens of ctx's sequences in order) -> streams [1, N, n, D]."""
        h0 = self.model.embed_tokens(input_ids[0]).unsqueeze(1).repeat(1, self.config.hc_mult, 1)
        return self._run_paged(input_ids[0], h0, ctx, list(self.model.layers))[None]

    def _run_paged(self, ids: torch.Tensor, h0: torch.Tensor, ctx: SequenceStates, blocks: list,
                   mtp: bool = False) -> torch.Tensor:
        """`blocks` over a step's flat tokens ids [N] with input streams h0 [N, n, D] -> [N, n, D]: prefill chunks one
        sequence at a time through the full-forward code on the slot's state, single-token decodes as one batch."""
        ps: PagedV4State = ctx.state
        dev = ids.device
        out = torch.empty_like(h0)
        offsets = [0]
        for n in ctx.num_tokens:
            offsets.append(offsets[-1] + n)
        ratios = sorted({ps.ratios[b.layer_idx] for b in blocks} - {0})
        decode = [i for i, (s, n) in enumerate(zip(ctx.starts, ctx.num_tokens)) if n == 1 and s > 0]
        for i in sorted(set(range(len(ctx.slots))) - set(decode)):
            s, n, slot, o = ctx.starts[i], ctx.num_tokens[i], ctx.slots[i], offsets[i]
            if s == 0:
                ps.reset(slot, mtp)
            bt = torch.tensor([ctx.block_tables[i]], dtype=torch.long, device=dev)
            rows = {r: ps.entry_rows(bt, r, (s + n) // r)[0] for r in ratios}
            x_ids = ids[o:o + n][None]
            rope = self._rope(torch.arange(s, s + n, device=dev)[None])
            h = h0[o:o + n][None]
            for blk in blocks:
                h = blk(h, x_ids, rope, ps.layer_view(blk.layer_idx, slot, rows), s)
            out[o:o + n] = h[0]
        if decode:
            at = torch.tensor([offsets[i] for i in decode], device=dev)
            starts = torch.tensor([ctx.starts[i] for i in decode], dtype=torch.long, device=dev)
            width = max(len(ctx.block_tables[i]) for i in decode)
            bt = torch.tensor([ctx.block_tables[i] + [0] * (width - len(ctx.block_tables[i])) for i in decode],
                              dtype=torch.long, device=dev)
            rows = {r: ps.entry_rows(bt, r, int(((starts + 1) // r).max())) for r in ratios}
            d = DecodeRows(ps, torch.tensor([ctx.slots[i] for i in decode], dtype=torch.long, device=dev), starts, rows)
            x_ids = ids[at][:, None]
            rope = self._rope(starts[:, None])
            h = h0[at][:, None]
            for blk in blocks:
                h = blk(h, x_ids, rope, d, 0)
            out[at] = h[:, 0]
        return out

    def head_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Streams [..., n, D] -> final-norm hidden states [..., D] (hc_head, then norm)."""
        m, cfg = self.model, self.config
        return m.norm(hc_head(h, m.hc_head_fn, m.hc_head_scale, m.hc_head_base, cfg.hc_eps, cfg.rms_norm_eps))

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, ctx: Any = None) -> torch.Tensor:
        """input_ids [B, T] -> final-norm hidden states [B, T, D]."""
        return self.head_hidden(self.streams(input_ids, positions, ctx))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, ctx: Any = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]."""
        return self.lm_head(self.hidden_states(input_ids, positions, ctx))

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor | None, ctx: Any,
             rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(final streams [B·T, hc_mult·D] of every token -- what `mtp_hidden` takes --, logits [len(rows), V])."""
        h = self.streams(input_ids, positions, ctx)
        flat = h.reshape(-1, h.shape[-2] * h.shape[-1])
        return flat, self.lm_head(self.head_hidden(h.reshape(-1, *h.shape[-2:])[rows]))

    def mtp_hidden(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, ctx: Any = None,
                   depth: int = 0) -> torch.Tensor:
        """MTP module `depth` on the main model's final streams h_i ([B, T, n, D] or flattened [B, T, n·D]) and token
        i+1 (next_ids [B, T]): its output streams [B, T, n, D] (the next depth's input; `mtp_logits` for logits)."""
        B, T = next_ids.shape
        n, D = self.config.hc_mult, self.config.hidden_size
        h = hidden.view(B, T, n, D)
        blk = self.model.mtp[depth]
        if isinstance(ctx, SequenceStates):  # the paged engine's drafter: one flat step, B = 1
            h0 = blk.mix(h, self.model.embed_tokens(next_ids))[0]
            return self._run_paged(next_ids[0], h0, ctx, [blk], mtp=True)[None]
        state = self._state(ctx, B, T, mtp=True)
        start = state.length
        state.begin_step(T)
        rope = self._rope(self._positions(next_ids, positions, start))
        x = blk.mix(h, self.model.embed_tokens(next_ids))
        out = blk(x, next_ids, rope, state.layer(blk.layer_idx), start)
        state.end_step()
        return out

    def mtp_logits(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, ctx: Any = None,
                   depth: int = 0) -> torch.Tensor:
        """Logits of token i+2 from MTP module `depth`: its streams through its own head collapse and norm."""
        return self.mtp_head(self.mtp_hidden(hidden, next_ids, positions, ctx, depth), depth)

    def mtp_head(self, h: torch.Tensor, depth: int = 0) -> torch.Tensor:
        """MTP module `depth`'s output streams [..., n, D] -> logits: its own head collapse and norm, the shared head."""
        return self.lm_head(self.mtp_head_hidden(h, depth))

    def mtp_head_hidden(self, h: torch.Tensor, depth: int = 0) -> torch.Tensor:
        """MTP module `depth`'s output streams [..., n, D] -> what the shared LM head reads (its own collapse and norm)."""
        blk, cfg = self.model.mtp[depth], self.config
        return blk.norm(hc_head(h, blk.hc_head_fn, blk.hc_head_scale, blk.hc_head_base, cfg.hc_eps, cfg.rms_norm_eps))

    def training_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                        ctx: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(final-norm hidden states [B, T, D] for the LM head, the final streams [B, T, n, D] the MTP modules take)."""
        h = self.streams(input_ids, positions, ctx)
        return self.head_hidden(h), h

    # ---- dtype and initialisation ----------------------------------------------------------
    def cast(self, dtype: torch.dtype) -> "DeepseekV4ForCausalLM":
        """Cast floating tensors to `dtype`, keeping the routers, compressors, mHC and sinks (`keep_fp32`) in fp32."""
        for module in self.modules():
            keep = getattr(module, "keep_fp32", False)
            for _, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if t is not None and t.is_floating_point():
                    t.data = t.data.to(torch.float32 if keep else dtype)
        return self

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the rotary tables (needed after building on the meta device)."""
        main, comp = _rope_configs(self.config)
        self.model.rotary_main.inv_freq = rope_inv_freq(main)[0].to(self.device)
        self.model.rotary_compress.inv_freq = rope_inv_freq(comp)[0].to(self.device)

    @torch.no_grad()
    def init_weights(self, std: float | None = None, generator: torch.Generator | None = None,
                     every_tensor: bool = False, kv_gain: float = 1.0) -> None:
        """Initialisation for training, as transformers' `DeepseekV4PreTrainedModel._init_weights`: N(0, std)
        matrices, unit norms, sinks, mHC bases, compressor position biases and router biases at 0, mHC scales at 1,
        and a hash table of distinct experts per token. Why not random: two-layer models trained from scratch to
        copy a repeated random sequence (`bench/induction.py`) began to copy at step ~550 from this init and ~900
        with those tensors random. `every_tensor=True` keeps that random init (every 1-D tensor N(0, 0.5), position
        biases N(0, std), router biases N(0, 0.1)) for tests, where a tensor left at 0 or 1 could hide a mistake in
        how it is used.

        `kv_gain` is the initial gain of the attention's K=V norms (`attn.kv_norm`, `attn.compressor.norm`: window
        keys and compressed entries meet in one softmax). The queries are normalised per head without a gain, so a
        logit is at most sqrt(head_dim)·gain: 22.6 at init for the released head_dim 512, 8 for a 64-wide head. In
        `bench/induction.py` a two-layer V4 of the embedded widths began to copy by step 200-400 with gain 8, not by
        600 with gain 3, and with gain 1 at ~550 and only partly (~2 nats/token from 700 to 1,000 steps)."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            last = name.rsplit(".", 1)[-1]
            if name.endswith(("attn.kv_norm.weight", "attn.compressor.norm.weight")):
                p.fill_(kv_gain)
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            elif every_tensor:
                p.normal_(0.0, std if p.dim() >= 2 else 0.5, generator=generator)
            elif last in ("attn_sink", "ape") or (last.startswith("hc_") and last.endswith("_base")):
                p.zero_()
            elif last.startswith("hc_") and last.endswith("_scale"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
        E = self.config.n_routed_experts
        for m in self.modules():
            if isinstance(m, Gate) and m.e_score_correction_bias is not None:
                bias = m.e_score_correction_bias
                bias.normal_(0.0, 0.1, generator=generator) if every_tensor else bias.zero_()
            elif isinstance(m, HashGate):
                m.tid2eid.copy_(torch.rand(m.tid2eid.shape[0], E, generator=generator).argsort(-1)[:, : m.top_k])

    def num_parameters(self, active: bool = False) -> int:
        """Total parameters, or those used per token (K of E routed experts) with `active=True`."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            cfg = self.config
            for m in self.modules():
                if isinstance(m, Experts):
                    total -= (m.gate_up_proj[0].numel() + m.down_proj[0].numel()) * (cfg.n_routed_experts - cfg.num_experts_per_tok)
        return total
