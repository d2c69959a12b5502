"""Fused routed-expert MoE in Triton: sorted tokens, gate/up + SiLU, down, weighted combine (vLLM's fused_moe).

`align_block_size` sorts the N·K (token, slot) pairs by expert and pads each expert's run to a multiple
of BLOCK_M, so every block of rows belongs to one expert (`expert_ids` per block); it uses only
fixed-shape, sync-free PyTorch ops (sizes bounded by N·K + min(N·K, E)·(BLOCK_M − 1)), so a CUDA graph
can capture it. Two grouped GEMMs follow, each block of rows times its expert's weight, rows gathered
by pair id: (1) h = silu(x·W_gateᵀ) ⊙ (x·W_upᵀ) from the stacked gate_up [E, 2I, D] (gate its first I
rows) with SiLU fused into the epilogue; (2) y = (h·W_downᵀ) · routing weight, [E, D, I]. The K outputs
of a token are summed in fp32 ([N, K, D] -> [N, D]: deterministic, no atomics). Blocks past the padded
total exit at once. Weights are the layout `dsv3.layers.moe.Experts` holds.
"""

from __future__ import annotations

import math

import torch
import triton.language as tl

from dsv3.ops.triton._launch import check_device, fix_interpreter, jit


@jit
def _expert_gemm_kernel(A, W, Out, SortedIds, ExpertIds, NumPost, RouteW, P, N_OUT, KDIM, TOPK,
                        stride_am, stride_we, stride_wn, stride_om, UP_OFFSET,
                        GATHER_TOKEN: tl.constexpr, SWIGLU: tl.constexpr, WEIGHTED: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(NumPost):
        return
    rows = tl.load(SortedIds + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows < P
    rows = tl.where(valid, rows, 0)
    a_rows = rows // TOPK if GATHER_TOKEN else rows
    e = tl.load(ExpertIds + pid_m).to(tl.int64)
    offn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offn < N_OUT
    offk = tl.arange(0, BLOCK_K)
    a_ptr = A + a_rows.to(tl.int64)[:, None] * stride_am + offk[None, :]
    w_ptr = W + e * stride_we + offn[None, :].to(tl.int64) * stride_wn + offk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, KDIM, BLOCK_K):
        kmask = (k0 + offk) < KDIM
        a = tl.load(a_ptr + k0, mask=valid[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + k0, mask=kmask[:, None] & nmask[None, :], other=0.0).to(a.dtype)
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
        if SWIGLU:
            u = tl.load(w_ptr + UP_OFFSET * stride_wn + k0, mask=kmask[:, None] & nmask[None, :], other=0.0).to(a.dtype)
            if IEEE:
                acc_up += tl.dot(a, u, input_precision="ieee")
            else:
                acc_up += tl.dot(a, u)
    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if WEIGHTED:
        acc = acc * tl.load(RouteW + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
    o_ptr = Out + rows.to(tl.int64)[:, None] * stride_om + offn[None, :]
    tl.store(o_ptr, acc.to(Out.dtype.element_ty), mask=valid[:, None] & nmask[None, :])


def align_block_size(topk_ids: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted pair ids [cap] (N·K marks padding), expert id per block [cap / block_m], padded total [1]) for the
    pairs of `topk_ids` [N, K]: each expert's pairs contiguous, in pair order, padded to a multiple of block_m.
    Fixed shapes and no host synchronisation (a CUDA graph can capture it)."""
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    P = flat.numel()
    cap = math.ceil((P + min(P, n_experts) * (block_m - 1)) / block_m) * block_m
    counts = torch.zeros(n_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    order = flat.argsort(stable=True)
    expert_sorted = flat[order]
    first_of = counts.cumsum(0) - counts  # index in `order` of each expert's first pair
    dest = starts[expert_sorted] + torch.arange(P, device=dev) - first_of[expert_sorted]
    sorted_ids = torch.full((cap,), P, dtype=torch.int32, device=dev).scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, cap, block_m, device=dev)
    expert_ids = torch.searchsorted(ends, block_starts, right=True).clamp_(max=n_experts - 1).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


def _blocks(M: int, device: torch.device) -> tuple[int, int, int]:
    if device.type == "cpu":
        return 16, 32, 32
    return (16 if M <= 64 else 64), 64, 64


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor) -> torch.Tensor:
    """Σ_k topk_weights[:, k] · expert_{topk_ids[:, k]}(x) for x [N, D], gate_up w13 [E, 2I, D], down w2 [E, D, I];
    output [N, D] in x's dtype (fp32 accumulation, the intermediate in x's dtype)."""
    check_device(x, "fused_moe")
    fix_interpreter()
    N, D = x.shape
    E, I2, D2 = w13.shape
    if D2 != D or w2.shape != (E, D, I2 // 2) or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != N:
        raise ValueError(f"fused_moe: x {list(x.shape)}, w13 {list(w13.shape)}, w2 {list(w2.shape)}, "
                         f"ids {list(topk_ids.shape)} disagree")
    I = I2 // 2
    K = topk_ids.shape[1]
    P = N * K
    out = torch.zeros(N, D, dtype=x.dtype, device=x.device)
    if P == 0:
        return out
    x = x.contiguous()
    bm, bn, bk = _blocks(N, x.device)
    sorted_ids, expert_ids, num_post = align_block_size(topk_ids, E, bm)
    h = torch.empty(P, I, dtype=x.dtype, device=x.device)
    y = torch.empty(P, D, dtype=torch.float32, device=x.device)
    rw = topk_weights.reshape(-1).float().contiguous()
    ieee = x.dtype == torch.float32
    blocks = sorted_ids.numel() // bm
    _expert_gemm_kernel[(blocks, math.ceil(I / bn))](
        x, w13, h, sorted_ids, expert_ids, num_post, rw, P, I, D, K, x.stride(0), w13.stride(0), w13.stride(1),
        h.stride(0), I, GATHER_TOKEN=True, SWIGLU=True, WEIGHTED=False, IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk)
    _expert_gemm_kernel[(blocks, math.ceil(D / bn))](
        h, w2, y, sorted_ids, expert_ids, num_post, rw, P, D, I, K, h.stride(0), w2.stride(0), w2.stride(1),
        y.stride(0), 0, GATHER_TOKEN=False, SWIGLU=False, WEIGHTED=True, IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk)
    return y.view(N, K, D).sum(1).to(x.dtype)
