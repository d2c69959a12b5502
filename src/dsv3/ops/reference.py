"""PyTorch reference implementations of the `dsv3::` ops: the spec the native kernels are tested against.

They take exactly the arguments the schemas declare (linear layers as (weight, scale, bias) plus
(kind, group): kind 0 fp32, 1 int8 with a scale per row, 2 int4 in blocks of 32 values with a
scale and a bias per (row, group)), run on any device, and are registered as the ops'
`CompositeExplicitAutograd` kernels: where no native kernel is registered (no compiler, another
device) `torch.ops.dsv3.*` still computes, just not fast. Written for clarity, not speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.ops.layout import (LAYER_FLOATS, LAYER_INTS, LAYER_WEIGHTS, MODEL_FLOATS, MODEL_INTS, MODEL_WEIGHTS, MTP_FLOATS,
                             MTP_INTS, MTP_WEIGHTS)


def unpack_int4(packed: torch.Tensor, K: int) -> torch.Tensor:
    """[..., N, K/2] bytes in blocks of 32 values (byte j of a block: value j low nibble, value j+16 high) -> [..., N, K]."""
    blocks = packed.reshape(*packed.shape[:-1], K // 32, 16)
    lo, hi = blocks & 15, blocks >> 4
    return torch.cat([lo, hi], dim=-1).reshape(*packed.shape[:-1], K)


def dequant(weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, kind: int, group: int,
            K: int) -> torch.Tensor:
    """The fp32 weight [..., N, K] a linear of `kind` stands for."""
    if kind == 0:
        return weight.float()
    if kind == 1:
        return weight.float() * scale.float()[..., None]
    if kind == 2:
        u = unpack_int4(weight, K).float().unflatten(-1, (K // group, group))
        return (u * scale[..., None] + bias[..., None]).flatten(-2)
    raise ValueError(f"unknown linear kind {kind}")


def _lin(lins: list, meta: list[int], i: int, K: int) -> torch.Tensor:
    w, s, b = lins[3 * i:3 * i + 3]
    return dequant(w, s, b, meta[2 * i], meta[2 * i + 1], K)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (weight.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def route_noaux(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n_group: int, topk_group: int,
                top_k: int, norm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's router: sigmoid scores; selection on scores + bias among the `topk_group` groups with the
    largest sum of their two best biased scores; unbiased weights of the chosen, normalised if `norm`, scaled."""
    scores = (x.float() @ weight.float().T).sigmoid()
    choice = scores + (bias.float() if bias is not None else 0.0)
    E = weight.shape[0]
    if n_group > 1:
        grouped = choice.view(-1, n_group, E // n_group)
        group_score = grouped.topk(min(2, E // n_group), dim=-1)[0].sum(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, group_score.topk(topk_group, dim=-1)[1], True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
    idx = choice.topk(top_k, dim=-1)[1]
    wt = scores.gather(1, idx)
    if norm and top_k > 1:
        wt = wt / (wt.sum(-1, keepdim=True) + 1e-20)
    return wt * scale, idx, scores


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, kind: int,
           group: int) -> torch.Tensor:
    return (x.float() @ dequant(weight, scale, bias, kind, group, x.shape[-1]).T).to(x.dtype)


def mlp(x: torch.Tensor, lins: list, meta: list[int]) -> torch.Tensor:
    D = x.shape[-1]
    gate, up = _lin(lins, meta, 0, D), _lin(lins, meta, 1, D)
    down = _lin(lins, meta, 2, gate.shape[0])
    xf = x.float()
    return ((F.silu(xf @ gate.T) * (xf @ up.T)) @ down.T).to(x.dtype)


def moe(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, lins: list, meta: list[int]) -> torch.Tensor:
    """Σ_k weights[:, k] · expert_{idx[:, k]}(x) with stacked experts gate/up [E, I, D], down [E, D, I]."""
    D = x.shape[-1]
    gate, up = _lin(lins, meta, 0, D), _lin(lins, meta, 1, D)
    if lins[0] is lins[3]:  # one fused gate_up stack [E, 2I, D]: gate its first half of the rows, up the rest
        gate, up = gate.chunk(2, dim=1)
    down = _lin(lins, meta, 2, gate.shape[1])
    xf = x.float()
    g = torch.einsum("md,mkid->mki", xf, gate[idx])
    u = torch.einsum("md,mkid->mki", xf, up[idx])
    y = torch.einsum("mki,mkdi->mkd", F.silu(g) * u, down[idx])
    return (y * weights.float()[..., None]).sum(1).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs (x[2i], x[2i+1]) rotated; cos/sin [..., dr/2] broadcast over heads."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)


def mla_decode(x: torch.Tensor, lins: list, meta: list[int], q_norm: torch.Tensor | None, kv_norm: torch.Tensor,
               w_kvb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
               key_slots: torch.Tensor, key_mask: torch.Tensor | None, dims: list[int], fdims: list[float]) -> torch.Tensor:
    """One MLA layer for M tokens x [..., D]: write each token's latent to its cache slot, attend in the absorbed
    form over key_slots (where key_mask), project out. cache [slots, C + dr] is updated in place."""
    D, H, dn, dr, dv, C, Rq = dims
    q_eps, kv_eps, scale = fdims
    shape = x.shape
    xf = x.reshape(-1, D).float()
    M = xf.shape[0]
    if Rq:
        q = rms_norm(xf @ _lin(lins, meta, 0, D).T, q_norm, q_eps) @ _lin(lins, meta, 1, Rq).T
    else:
        q = xf @ _lin(lins, meta, 1, D).T
    q = q.view(M, H, dn + dr)
    kva = xf @ _lin(lins, meta, 2, D).T
    c = cos.reshape(M, 1, -1).float()
    s = sin.reshape(M, 1, -1).float()
    latent = torch.cat([rms_norm(kva[:, :C], kv_norm, kv_eps), _rope(kva[:, None, C:], c, s)[:, 0]], dim=-1)
    cache[slot_mapping] = latent.to(cache.dtype)
    w = w_kvb.float().view(H, dn + dv, C)
    q_lat = torch.einsum("mhd,hdc->mhc", q[..., :dn], w[:, :dn])
    q_pe = _rope(q[..., dn:], c, s)
    kv = cache[key_slots].float()  # [M, S, C + dr]
    scores = (torch.einsum("mhc,msc->mhs", q_lat, kv[..., :C]) + torch.einsum("mhr,msr->mhs", q_pe, kv[..., C:])) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
    o_lat = torch.einsum("mhs,msc->mhc", scores.softmax(-1), kv[..., :C])
    out = torch.einsum("mhc,hdc->mhd", o_lat, w[:, dn:]).reshape(M, H * dv)
    return (out @ _lin(lins, meta, 3, H * dv).T).to(x.dtype).view(shape)


def _layers(weights: list, w0: int, meta: list[int], fmeta: list[float], L: int):
    """Per layer: (its 44 weights, 33 ints, 5 floats) of a plan (see dsv3.ops.layout)."""
    for i in range(L):
        yield (weights[w0 + i * LAYER_WEIGHTS:w0 + (i + 1) * LAYER_WEIGHTS], meta[i * LAYER_INTS:(i + 1) * LAYER_INTS],
               fmeta[i * LAYER_FLOATS:(i + 1) * LAYER_FLOATS])


def _block(x: torch.Tensor, w: list, m: list[int], f: list[float], cache_layer: torch.Tensor, cos, sin, slot_mapping,
           key_slots, key_mask) -> torch.Tensor:
    """One pre-norm block of a plan: x + MLA(norm(x)), then + FFN(norm(x))."""
    eps = f[3]
    h = rms_norm(x, w[15], eps)
    x = x + mla_decode(h, w[0:12], m[7:15], w[12], w[13], w[14], cos, sin, cache_layer, slot_mapping, key_slots,
                       key_mask, m[0:7], f[0:3])
    h = rms_norm(x, w[16], eps)
    y = torch.zeros_like(x)
    if m[16]:  # routed experts
        wt, idx, _ = route_noaux(h, w[26], w[27], m[17], m[18], m[19], bool(m[20]), f[4])
        y = y + moe(h, idx, wt, w[28:37], m[27:33])
    if m[15]:  # the dense MLP or the shared experts
        y = y + mlp(h, w[17:26], m[21:27])
    return x + y


def decode_layers(weights: list, meta: torch.Tensor, fmeta: torch.Tensor, cache: torch.Tensor, layers: list[int],
                  x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                  key_slots: torch.Tensor, key_mask: torch.Tensor | None) -> None:
    """x [M, D] through the plan's blocks, in place (the residual stream, no final norm)."""
    mi, mf = meta.tolist(), fmeta.tolist()
    W = cache.shape[-1]
    y = x.reshape(-1, x.shape[-1])
    for (w, m, f), layer in zip(_layers(weights, 0, mi, mf, len(layers)), layers):
        y = _block(y, w, m, f, cache[layer].view(-1, W), cos, sin, slot_mapping, key_slots, key_mask)
    x.copy_(y.view_as(x))


def decode_step(weights: list, meta: torch.Tensor, fmeta: torch.Tensor, cache: torch.Tensor, layers: list[int],
                ids: torch.Tensor, positions: torch.Tensor | None, start: int, T: int, slot_mapping: torch.Tensor,
                key_slots: torch.Tensor, key_mask: torch.Tensor | None, hidden: torch.Tensor,
                logits: torch.Tensor | None) -> int:
    """Token ids -> post-norm hidden states (and logits) of a whole-model plan; 1 + the row of an id outside the
    vocabulary (nothing computed) or 0."""
    mi, mf = meta.tolist(), fmeta.tolist()
    head_kind, head_group, vocab, half = mi[:MODEL_INTS]
    attn_factor, final_eps = mf[:MODEL_FLOATS]
    flat = ids.reshape(-1)
    bad = ((flat < 0) | (flat >= vocab)).nonzero()
    if bad.numel():
        return int(bad[0]) + 1
    M = flat.numel()
    pos = positions.reshape(-1).float() if positions is not None else (start + torch.arange(M) % T).float()
    angle = pos[:, None] * weights[1].float()[None]
    cos, sin = angle.cos() * attn_factor, angle.sin() * attn_factor
    x = weights[0][flat].float()
    W = cache.shape[-1]
    L = len(layers)
    for (w, m, f), layer in zip(_layers(weights, MODEL_WEIGHTS, mi[MODEL_INTS:], mf[MODEL_FLOATS:], L), layers):
        x = _block(x, w, m, f, cache[layer].view(-1, W), cos, sin, slot_mapping, key_slots, key_mask)
    h = rms_norm(x, weights[2], final_eps)
    hidden.copy_(h.view_as(hidden))
    if logits is not None:
        logits.copy_((h @ dequant(weights[3], weights[4], weights[5], head_kind, head_group, h.shape[-1]).T).view_as(logits))
    return 0


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The first index of each row's largest value, NaN counted as -inf (never chosen over a number)."""
    return logits.masked_fill(logits.isnan(), float("-inf")).argmax(-1)


def screened_greedy(hidden: torch.Tensor, weight: torch.Tensor, weight_bf16: torch.Tensor,
                    weight_norm: float) -> torch.Tensor:
    """The greedy tokens of hidden [M, K] under the fp32 head weight [V, K]: the argmax of the fp32 logits (the native
    op screens them with the bf16 copy `weight_bf16` and recomputes only the columns that could be largest)."""
    return greedy(hidden.float() @ weight.T)


def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    """A weight packed for the BLAS's GEMM: PyTorch has no packed form, so no bytes (steps then multiply the weight
    as it is; the native op packs it with MKL where PyTorch links MKL)."""
    return weight.new_empty(0, dtype=torch.uint8)


def mtp_step(weights: list, meta: torch.Tensor, fmeta: torch.Tensor, mtp_weights: list, mtp_meta: torch.Tensor,
             mtp_fmeta: torch.Tensor, cache: torch.Tensor, layers: list[int], mtp_layer: int, ids: torch.Tensor,
             starts: torch.Tensor, block_tables: torch.Tensor, block_size: int, K: int, hidden: torch.Tensor,
             logits: torch.Tensor, tokens: torch.Tensor, drafts: torch.Tensor) -> int:
    """A greedy MTP speculative step for B sequences, each its ids at positions n .. n+2K-1 (row 0 the last token,
    rows 1..K the drafts, the rest places for chained drafts) and its block table (position p in slot
    table[p // block_size] · block_size + p % block_size; row j attends to positions 0 .. n+j): the main model
    verifies rows 0..K (hidden, logits [B(K+1), ...]); tokens [B, K+1] gets the accepted drafts and the target's
    next token (-1 after them); the MTP module takes in the exact pairs (hidden of row j, token j) for j <= a and
    drafts K tokens for the next step (drafts [B, K]), chaining on its own output at rows a+1 .. a+K-1."""
    B, R = ids.shape
    K1 = K + 1
    S = block_tables.shape[1] * block_size
    q = torch.arange(S)
    table_slots = block_tables[:, q // block_size] * block_size + q % block_size  # [B, S]
    positions = starts[:, None] + torch.arange(R)  # [B, R]
    slot_mapping = table_slots.gather(1, positions).reshape(-1)
    key_slots = table_slots.repeat_interleave(R, 0)
    key_mask = q[None] <= positions.reshape(-1, 1)
    main = torch.arange(B)[:, None] * R + torch.arange(K1)[None]  # [B, K+1] flat rows the main model reads
    rows = main.reshape(-1)
    bad = decode_step(weights, meta, fmeta, cache, layers, ids.reshape(-1)[rows], positions.reshape(-1)[rows], 0, 1,
                      slot_mapping[rows], key_slots[rows], key_mask[rows], hidden, logits)
    if bad:
        return bad
    mf, ti, tf = fmeta.tolist(), mtp_meta.tolist(), mtp_fmeta.tolist()
    embed, inv_freq, attn_factor = weights[0], weights[1].float(), mf[0]
    enorm, hnorm, eh_w, eh_s, eh_b, fnorm, hd_w, hd_s, hd_b, draft_ids = mtp_weights[:MTP_WEIGHTS]
    D = embed.shape[1]
    eh = dequant(eh_w, eh_s, eh_b, ti[0], ti[1], 2 * D)
    head = dequant(hd_w, hd_s, hd_b, ti[2], ti[3], D)
    (w, m, f), = _layers(mtp_weights, MTP_WEIGHTS, ti[MTP_INTS:], tf[MTP_FLOATS:], 1)
    W = cache.shape[-1]
    mcache = cache[mtp_layer].view(-1, W)

    def mtp(h: torch.Tensor, tok: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        angle = positions.reshape(-1)[src].float()[:, None] * inv_freq[None]
        x = torch.cat([rms_norm(embed[tok].float(), enorm, tf[0]), rms_norm(h, hnorm, tf[1])], -1) @ eh.T
        x = _block(x, w, m, f, mcache, angle.cos() * attn_factor, angle.sin() * attn_factor, slot_mapping[src],
                   key_slots[src], key_mask[src])
        return rms_norm(x, fnorm, tf[2])

    def greedy(x: torch.Tensor) -> torch.Tensor:  # a NaN is never chosen
        return torch.nan_to_num(x, nan=float("-inf")).argmax(-1)

    def draft(g: torch.Tensor) -> torch.Tensor:
        r = greedy(g @ head.T)
        return draft_ids[r] if draft_ids is not None else r

    target = greedy(logits.view(B, K1, -1))  # [B, K+1]
    h_rows, t_rows, src_rows, accepted, last = [], [], [], [], []
    tokens.fill_(-1)
    for b in range(B):
        a = 0
        while a < K and int(ids[b, a + 1]) == int(target[b, a]):
            a += 1
        tokens[b, :a + 1] = target[b, :a + 1]
        for j in range(a + 1):
            h_rows.append(hidden.view(B, K1, -1)[b, j])
            t_rows.append(target[b, j])
            src_rows.append(b * R + j)
        accepted.append(a)
        last.append(len(src_rows) - 1)
    g = mtp(torch.stack(h_rows), torch.stack(t_rows), torch.tensor(src_rows))[torch.tensor(last)]
    d = draft(g)
    drafts[:, 0] = d
    for j in range(1, K):
        src = torch.tensor([b * R + accepted[b] + j for b in range(B)])
        g = mtp(g, d, src)
        d = draft(g)
        drafts[:, j] = d
    return 0


def mla_attend(q: torch.Tensor, cache: torch.Tensor, key_slots: torch.Tensor, key_lens: torch.Tensor | None,
               kv_lora_rank: int, scale: float) -> torch.Tensor:
    """Absorbed MLA attention of M query rows over cache slots: q [M, H, C + dr] (q_nope·W_UK | rope(q_pe)),
    cache [slots, C + dr], key_slots [M, S] (-1: no key; with key_lens [M], only the first key_lens[m] count)
    -> o_lat [M, H, C] = softmax(q·kᵀ·scale)·c, fp32 math, zeros for a row without keys. The dense decode and
    DeepSeek Sparse Attention's top-k form are the same call."""
    C = kv_lora_rank
    slots = key_slots.long()
    valid = slots >= 0
    if key_lens is not None:
        valid &= torch.arange(slots.shape[1], device=slots.device)[None] < key_lens.long()[:, None]
    kv = cache[slots.clamp(min=0)].float()  # [M, S, C + dr]
    scores = torch.einsum("mhw,msw->mhs", q.float(), kv) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return torch.einsum("mhs,msc->mhc", p, kv[..., :C]).to(q.dtype)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor) -> torch.Tensor:
    """Σ_k topk_weights[:, k] · expert_{topk_ids[:, k]}(x): gate_up w13 [E, 2I, D] (gate its first I rows), down
    w2 [E, D, I], SwiGLU, fp32 math, output in x's dtype."""
    gate, up = w13.float().chunk(2, dim=1)
    xf, idx = x.float(), topk_ids.long()
    h = F.silu(torch.einsum("nd,nkid->nki", xf, gate[idx])) * torch.einsum("nd,nkid->nki", xf, up[idx])
    y = torch.einsum("nki,nkdi->nkd", h, w2.float()[idx])
    return (y * topk_weights.float()[..., None]).sum(1).to(x.dtype)


FP8_MAX = 448.0


def fp8_act_quant(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's activation quantization: x [M, K] -> (float8_e4m3fn [M, K], fp32 scale [M, ⌈K/group⌉] = amax/448)."""
    M, K = x.shape
    Kp = -(-K // group) * group
    xp = F.pad(x.float(), (0, Kp - K)).view(M, Kp // group, group)
    amax = xp.abs().amax(-1)
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (xp / s[..., None]).clamp(-FP8_MAX, FP8_MAX).view(M, Kp)[:, :K].to(torch.float8_e4m3fn)
    return q, s


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """x [..., K] times an FP8 block-scaled weight (float8_e4m3fn [N, K], fp32 scale_inv [⌈N/128⌉, ⌈K/128⌉]) -> [..., N]:
    activations quantized per token and 128 columns (`fp8_act_quant`), both dequantized, fp32 matmul (W8A8)."""
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    q, s = fp8_act_quant(x2)
    a = q.float() * s.repeat_interleave(128, 1)[:, :K]
    w = weight.float() * scale_inv.float().repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
    out_dtype = x.dtype if x.is_floating_point() and x.dtype != torch.float8_e4m3fn else torch.bfloat16
    return (a @ w.T).to(out_dtype).view(*x.shape[:-1], N)


def index_topk(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_visible: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DSA's lightning indexer and top-k: each query t scores entry s as Σ_h w[t,h]·relu(q[t,h]·keys[s]) (fp32) and
    keeps the k best of the entries it sees (0 .. n_visible[b, t] - 1), ties to the earliest entry: (idx int64,
    ok bool) [B, T, min(k, S)], best first, ok False where a slot holds no visible entry with a finite score. Written
    as the definition (the whole [B, T, H, S] product, then a stable sort), not for speed; the model's own PyTorch
    path (`TorchBackend.index_scores` / `topk_select`) computes the same in chunks."""
    if k < 1:
        raise ValueError(f"dsv3::index_topk: k must be >= 1, got {k}")
    dots = torch.einsum("bthd,bsd->bths", q.float(), keys.float())
    scores = (w.float()[..., None] * dots.clamp_min(0)).sum(2)  # [B, T, S]
    visible = torch.arange(keys.shape[1], device=keys.device) < n_visible[..., None]
    scores = scores.masked_fill(~visible, float("-inf"))
    order = scores.sort(dim=-1, descending=True, stable=True).indices[..., :min(k, keys.shape[1])]
    return order.contiguous(), torch.isfinite(scores.gather(-1, order)).contiguous()


def hc_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int, iters: int,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC's split of the mixes [..., (2 + n)·n] as DeepSeek-V4's `hc_split_sinkhorn` kernel defines it:
    pre = sigmoid(m[:n]·s0 + b[:n]) + eps, post = 2·sigmoid(m[n:2n]·s1 + b[n:2n]), and comb = the row softmax of
    m[2n:]·s2 + b[2n:] (n × n) plus eps, normalised over columns once and then `iters - 1` times over rows and
    columns, each normalisation dividing by (sum + eps). -> (pre [..., n], post [..., n], comb [..., n, n])."""
    s0, s1, s2 = scale.float().unbind()
    b = base.float()
    logits = mixes[..., 2 * n:] * s2 + b[2 * n:]
    comb = torch.softmax(logits.reshape(*mixes.shape[:-1], n, n), dim=-1) + eps

    def normalise(m: torch.Tensor, dim: int) -> torch.Tensor:
        return m / (m.sum(dim, keepdim=True) + eps)

    comb = normalise(comb, -2)
    for _ in range(1, iters):
        comb = normalise(normalise(comb, -1), -2)
    pre = torch.sigmoid(mixes[..., :n] * s0 + b[:n]) + eps
    post = torch.sigmoid(mixes[..., n:2 * n] * s1 + b[n:2 * n]) * 2
    return pre, post, comb
