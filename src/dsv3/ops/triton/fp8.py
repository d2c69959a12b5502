"""FP8 e4m3 128×128 block-scaled GEMM in Triton, for the released DeepSeek-V3 weights (DeepGEMM's job).

Weights are stored as the checkpoints hold them: `weight` float8_e4m3fn [N, K] and `weight_scale_inv`
fp32 [⌈N/128⌉, ⌈K/128⌉] (W ≈ fp32(Wq) · S per block; `dsv3.quant.schemes.dequantize_fp8_block`).
Activations are quantized on the fly per token and 128-column group (DeepSeek's `act_quant`: scale =
amax / 448, one fp32 scale per [1, 128]), then y = Σ_kb (Aq_kb · Wq_kbᵀ) · a_scale[:, kb] · w_scale[nb, kb]
accumulated in fp32 -- the W8A8 recipe DeepGEMM and vLLM's `w8a8_block_fp8_matmul` implement. On GPUs
without FP8 tensor cores (before sm_89) the operands are widened to bf16 inside the kernel.
"""

from __future__ import annotations

import math

import torch
import triton.language as tl

from dsv3.ops.triton._launch import check_device, fix_interpreter, jit

FP8_MAX = 448.0
BLOCK = 128


@jit
def _act_quant_kernel(X, Q, S, K, GROUPS, stride_x, stride_q, GROUP: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // GROUPS
    g = pid % GROUPS
    offs = g * GROUP + tl.arange(0, GROUP)
    mask = offs < K
    x = tl.load(X + row.to(tl.int64) * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), 0)
    scale = tl.where(amax > 0, amax / 448.0, 1.0)
    q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
    tl.store(Q + row.to(tl.int64) * stride_q + offs, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(S + row.to(tl.int64) * GROUPS + g, scale)


@jit
def _fp8_gemm_kernel(A, AS, B, BS, Out, M, N, K, KB, stride_am, stride_bn, stride_bsn, stride_om,
                     FP8_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offm < M
    nmask = offn < N
    offk = tl.arange(0, BLOCK_K)
    a_ptr = A + offm.to(tl.int64)[:, None] * stride_am + offk[None, :]
    b_ptr = B + offn.to(tl.int64)[None, :] * stride_bn + offk[:, None]
    nb = (pid_n * BLOCK_N) // 128
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(0, KB):
        k0 = kb * BLOCK_K
        kmask = (k0 + offk) < K
        a = tl.load(a_ptr + k0, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr + k0, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if not FP8_DOT:
            a = a.to(tl.bfloat16)
            b = b.to(tl.bfloat16)
        a_s = tl.load(AS + offm * KB + kb, mask=mmask, other=0.0)
        b_s = tl.load(BS + nb * stride_bsn + kb)
        acc += tl.dot(a, b) * a_s[:, None] * b_s
    tl.store(Out + offm.to(tl.int64)[:, None] * stride_om + offn[None, :], acc.to(Out.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def act_quant(x: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], fp32 scales [M, ⌈K/group⌉]) with x ≈ q · scale per group."""
    check_device(x, "fp8 act_quant")
    fix_interpreter()
    M, K = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    groups = math.ceil(K / group)
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, groups, dtype=torch.float32, device=x.device)
    if M:
        _act_quant_kernel[(M * groups,)](x, q, s, K, groups, x.stride(0), q.stride(0), GROUP=group)
    return q, s


def fp8_dot_supported(device: torch.device) -> bool:
    """FP8 tensor-core dots: sm_89 and later (the interpreter emulates them)."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y [..., N] = act_quant(x) · dequant(weight, scale_inv)ᵀ for x [..., K], weight fp8 [N, K], scale_inv [⌈N/128⌉, ⌈K/128⌉]."""
    check_device(x, "fp8_gemm")
    fix_interpreter()
    N, K = weight.shape
    if x.shape[-1] != K or tuple(scale_inv.shape) != (math.ceil(N / BLOCK), math.ceil(K / BLOCK)) \
            or weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_gemm: x {list(x.shape)}, weight {list(weight.shape)} {weight.dtype}, "
                         f"scale_inv {list(scale_inv.shape)} disagree (128×128 blocks)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=out_dtype or (x.dtype if x.dtype != torch.float8_e4m3fn else torch.bfloat16),
                      device=x.device)
    if M == 0:
        return out.view(*lead, N)
    aq, a_s = act_quant(x2)
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    scale_inv = scale_inv.float().contiguous()
    bm = 16 if M <= 16 or x.device.type == "cpu" else 64
    bn = 64 if x.device.type == "cpu" else 128
    grid = (math.ceil(M / bm), math.ceil(N / bn))
    _fp8_gemm_kernel[grid](aq, a_s, weight, scale_inv, out, M, N, K, math.ceil(K / BLOCK), aq.stride(0),
                           weight.stride(0), scale_inv.stride(0), out.stride(0), FP8_DOT=fp8_dot_supported(x.device),
                           BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK)
    return out.view(*lead, N)
