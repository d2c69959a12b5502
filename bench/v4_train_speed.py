"""DeepSeek-V4 training speed side by side: dsv3's training step against transformers' on the same small V4 model.

    python bench/v4_train_speed.py [--seq-len 2048] [--batch 1] [--steps 3] [--threads 2] [--out bench/results/v4_train]

The model is the shape planned for the embedded long-context model (issue 25): hidden 256, 4 layers (sliding,
CSA 4:1 top-64, HCA 64:1, CSA), window 128, 4 heads of 64, 8 routed experts top-2 + 1 shared, the first layer
hash-routed, 2 mHC streams, vocabulary 8,192. One step is forward, backward and an AdamW update on random
tokens; dsv3 runs its pretraining objective (next token + 0.3·MTP + the CSA indexers' KL, `doc_mask: false`),
transformers its causal-LM loss (it builds no MTP module). Both load the same weights (saved by transformers).
Prints tokens/s, the ratio, and the machine's bound: this CPU's fp32 GEMM rate, measured in the same run, over
the model's training FLOPs per token counted as 6 × active weights (the embedding lookup and the attention
scores left out, so the bound is above what any implementation could reach).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPE = dict(vocab_size=8192, hidden_size=256, moe_intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             head_dim=64, q_lora_rank=128, partial_rotary_factor=0.25, n_routed_experts=8, num_experts_per_tok=2,
             sliding_window=128, o_groups=2, o_lora_rank=64, index_n_heads=4, index_head_dim=32, index_topk=64,
             hc_mult=2, layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                                     "compressed_sparse_attention"],
             compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 64},
             mlp_layer_types=["hash_moe", "moe", "moe", "moe"], max_position_embeddings=131072,
             bos_token_id=0, eos_token_id=1)


def gemm_rate(threads: int) -> float:
    """fp32 FLOP/s of torch.mm on 2,048 x 256 x 256 (the model's typical shape), best of 5."""
    a, b = torch.randn(2048, 256), torch.randn(256, 768)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(20):
            torch.mm(a, b)
        best = max(best, 20 * 2 * 2048 * 256 * 768 / (time.perf_counter() - t))
    return best


def time_steps(step, n: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/v4_train")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from dsv3.data.packing import PackedBatch
    from dsv3.io.load import load_model
    from dsv3.train.losses import pretrain_losses

    torch.manual_seed(0)
    hf = DeepseekV4ForCausalLM(DeepseekV4Config(**SHAPE)).float()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(d, dtype="fp32", progress=False)
    B, T = a.batch, a.seq_len
    ids = torch.randint(3, SHAPE["vocab_size"], (B, T + 1), generator=torch.Generator().manual_seed(1))
    batch = PackedBatch(ids[:, :-1], ids[:, 1:].clone(), torch.arange(T).expand(B, T), torch.zeros(B, T, dtype=torch.long))

    def trainer(model, loss_fn):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn().backward()
            opt.step()
        return step

    dsv3_s = time_steps(trainer(ours, lambda: pretrain_losses(ours, batch, 0.3, doc_mask=False).total), a.steps)
    hf_s = time_steps(trainer(hf, lambda: hf(input_ids=batch.input_ids, labels=ids[:, :-1]).loss), a.steps)
    active = ours.num_parameters(active=True) - ours.model.embed_tokens.weight.numel()  # the embedding is a lookup
    rate = gemm_rate(a.threads)
    flops_tok = 6 * active  # training: forward 2, backward 4 FLOPs per active weight per token
    bound = rate / flops_tok
    r = {"seq_len": T, "batch": B, "threads": a.threads, "dsv3_tok_s": B * T / dsv3_s, "hf_tok_s": B * T / hf_s,
         "ratio": hf_s / dsv3_s, "gemm_flop_s": rate, "train_flops_per_token": flops_tok, "bound_tok_s": bound}
    print(f"V4 training step, {B} x {T} tokens, {a.threads} thread(s), median of {a.steps}:")
    print(f"  dsv3          {r['dsv3_tok_s']:8.0f} tok/s  ({dsv3_s:.2f} s/step; objective: next token + MTP + indexer KL)")
    print(f"  transformers  {r['hf_tok_s']:8.0f} tok/s  ({hf_s:.2f} s/step; next-token loss only)")
    print(f"  dsv3 / transformers = {r['ratio']:.2f}x")
    print(f"  bound: {rate / 1e9:.0f} GFLOP/s fp32 GEMM / (6 x {active / 1e6:.2f}M active weights) = {bound:.0f} tok/s; "
          f"dsv3 at {r['dsv3_tok_s'] / bound:.2f}x of it (attention scores excluded from the bound)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
