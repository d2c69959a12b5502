"""Long context side by side: V3-, V3.2- (and V4-) shaped random models of equal width, decode and prefill.

    python bench/long_context.py [--contexts 1024,8192,32768,131072] [--families v3,v32,v4] [--threads 2]
                                 [--prefill-budget 600] [--out bench/results/long_context]

For each family and context length L it measures, through dsv3's engine (the model runner, paged
cache and step metadata the server uses):

* decode ms/token: one sequence whose cache holds L positions, then greedy steps. The cache is filled
  with random entries rather than by a prefill (decode cost does not depend on the values, and a
  dense 128K prefill takes hours on a CPU);
* cache bytes/token: the engine's cache for the sequence divided by L;
* prefill time of an L-token prompt (chunked, as the engine runs it) where it fits `--prefill-budget`
  seconds, estimated from the largest measured one otherwise (marked "est.": attention makes dense
  prefill grow ~L²).

The models keep the released configs' ratios where they matter for long context: V3.2 keeps
index_topk 2048, 128-dim index keys and half as many index heads as attention heads; V4 keeps its
128-token window and 4:1 / 128:1 compression. Prints a table with V3.2/V3 and V4/V3 ratios and the
issue's goals, writes results.json and a PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

WIDTH = dict(hidden_size=1024, num_attention_heads=16, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
             v_head_dim=128, q_lora_rank=384, intermediate_size=2816, moe_intermediate_size=256, n_routed_experts=16,
             num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1,
             num_hidden_layers=4, vocab_size=32000, routed_scaling_factor=2.5, bos_token_id=0, eos_token_id=1,
             max_position_embeddings=163840, num_nextn_predict_layers=0)
FAMILIES = {
    "v3": dict(model_type="deepseek_v3"),
    "v32": dict(model_type="deepseek_v32", index_n_heads=8, index_head_dim=128, index_topk=2048),
    # V4: one 512-wide K=V head, a 128-token window everywhere, CSA 4:1 (top-512 of 128-dim index keys) and HCA 128:1
    # alternating as in the release, mHC with 4 streams, grouped low-rank output
    "v4": dict(model_type="deepseek_v4", head_dim=512, num_key_value_heads=1, o_groups=4, o_lora_rank=256,
               sliding_window=128, compress_ratios=[4, 128, 4, 128], compress_rope_theta=160000, index_n_heads=8,
               index_head_dim=128, index_topk=512, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, num_hash_layers=1,
               scoring_func="sqrtsoftplus", topk_method="noaux_tc", swiglu_limit=10.0, norm_topk_prob=True,
               n_group=1, topk_group=1, first_k_dense_replace=0),
}
GOALS = {"v32": ("decode at 128K ≥ 2× V3", 2.0), "v4": ("decode at 128K ≥ 4× V3", 4.0)}
CACHE_GOALS = {"v4": ("cache bytes/token at 128K ≤ 0.3× V3's MLA latent", 0.3)}


def build(family: str, path: Path) -> Path:
    """A random model of the family, saved with dsv3 (plus the bench tokenizer)."""
    from dsv3.config import ModelConfig
    from dsv3.io.save import save_model
    from dsv3.models.registry import family as fam

    sys.path.insert(0, str(Path(__file__).parent))
    from models import _write_tokenizer

    if (path / "config.json").exists():
        return path
    cfg = ModelConfig.from_dict({**WIDTH, **FAMILIES[family]})
    if family == "v4":  # V4 has no MLA: its own head_dim and no latent
        cfg = ModelConfig.from_dict({k: v for k, v in {**WIDTH, **FAMILIES[family]}.items()
                                     if k not in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "intermediate_size")})
    torch.manual_seed(0)
    model = fam(cfg.model_type).model_class()(cfg)
    if hasattr(model, "reset_buffers"):
        model.reset_buffers()
    model.init_weights(std=0.02)
    save_model(model, path)
    _write_tokenizer(path, cfg.vocab_size)
    return path


def engine_for(model, tok, max_len: int, **kw):
    from dsv3.engine import EngineConfig, LLMEngine

    bs = 128 if hasattr(model, "paged_state") else 16  # V4: blocks hold whole 128:1 entries
    blocks = -(-max_len // bs) + 1
    return LLMEngine(model, tok, EngineConfig(max_model_len=max_len, max_num_seqs=1, num_blocks=blocks, block_size=bs,
                                              enable_prefix_caching=False, **kw))


@torch.inference_mode()
def decode_ms(model, tok, L: int, steps: int) -> tuple[float, float]:
    """(ms per decode step at context L, cache bytes per token) through the engine's runner."""
    from dsv3.engine.runner import StepItem

    eng = engine_for(model, tok, L + steps + 1)
    cache, state = eng.runner.cache, eng.runner.state
    g = torch.Generator().manual_seed(0)
    # stand-in entries for L positions: decode cost does not depend on them
    for t in ([cache.data] + ([cache.index] if cache.index is not None else []) if state is None else
              [*state.entries.values(), *state.index_keys.values()] + [st.ring for st in state.layers.values()]):
        t.normal_(generator=g)
    table = list(range(eng.block_manager.num_blocks))
    token = 5
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        _, logits = eng.runner.execute([StepItem([token], L + i, table, sample=True, state_slot=0)])
        times.append(time.perf_counter() - t)
        token = int(logits[-1].argmax())
    if state is None:
        per_token = cache.bytes_per_token()
    else:  # everything one sequence of L tokens holds (window ring, carry, entries, index keys) per token
        per_token = round(sum(s.bytes_per_sequence(model.dtype, L) for s in model.cache_specs()) / L)
    return 1000 * sorted(times[2:])[len(times[2:]) // 2], per_token


@torch.inference_mode()
def prefill_s(model, tok, L: int) -> float:
    from dsv3.engine.sampling import SamplingParams

    eng = engine_for(model, tok, L + 2, max_num_batched_tokens=2048)
    ids = torch.randint(3, model.config.vocab_size, (L,), generator=torch.Generator().manual_seed(1)).tolist()
    t = time.perf_counter()
    eng.generate([ids], SamplingParams(max_tokens=1, temperature=0))
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="1024,8192,32768,131072")
    ap.add_argument("--families", default="v3,v32,v4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed per context (median reported)")
    ap.add_argument("--prefill-budget", type=float, default=600.0, help="seconds one prefill may take before the "
                    "larger contexts are estimated instead of run")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dsv3-bench")
    ap.add_argument("--out", type=Path, default=Path("bench/results/long_context"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dsv3.io.load import load_model
    from dsv3.io.tokenizer import Tokenizer

    contexts = [int(c) for c in args.contexts.split(",")]
    fams = args.families.split(",")
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown:
        print(f"error: unknown family {unknown[0]!r} (known: {', '.join(FAMILIES)})", file=sys.stderr)
        return 2
    loaded = {}
    for fam in fams:
        d = build(fam, args.cache / f"long_{fam}")
        loaded[fam] = load_model(d, dtype="fp32", progress=False), Tokenizer.from_dir(d)
    rows, measured = [], {fam: [] for fam in fams}
    for L in contexts:  # families alternate at every context, so drift in the machine's load falls on all of them
        for fam in fams:
            model, tok = loaded[fam]
            ms, bpt = decode_ms(model, tok, L, args.steps)
            row = dict(family=fam, context=L, decode_ms=ms, cache_bytes_per_token=bpt)
            done = measured[fam]
            if not done or done[-1][1] * (L / done[-1][0]) ** 2 <= args.prefill_budget:
                row["prefill_s"] = prefill_s(model, tok, L)
                done.append((L, row["prefill_s"]))
            else:  # dense attention: ~L² from the largest measured prefill
                L0, s0 = done[-1]
                row["prefill_s"], row["prefill_estimated"] = s0 * (L / L0) ** 2, True
            rows.append(row)
            print(f"{fam:>4} {L:>7}: decode {ms:8.1f} ms/token, cache {bpt:6d} B/token, prefill "
                  f"{'~' if row.get('prefill_estimated') else ''}{row['prefill_s']:.1f} s", flush=True)
    report(rows, fams, contexts, args.out, args.threads)
    return 0


def report(rows: list[dict], fams: list[str], contexts: list[int], out: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    by = {(r["family"], r["context"]): r for r in rows}
    print(f"\n{'family':<7}{'context':>9}{'decode ms/tok':>15}{'× V3 speed':>12}{'cache B/tok':>13}{'× V3 cache':>12}"
          f"{'prefill s':>12}   ({threads} threads)")
    for r in rows:
        v3 = by.get(("v3", r["context"]))
        speed = f"{v3['decode_ms'] / r['decode_ms']:.2f}" if v3 else "-"
        cache = f"{r['cache_bytes_per_token'] / v3['cache_bytes_per_token']:.2f}" if v3 else "-"
        pre = ("~" if r.get("prefill_estimated") else "") + f"{r['prefill_s']:.1f}"
        print(f"{r['family']:<7}{r['context']:>9}{r['decode_ms']:>15.1f}{speed:>12}{r['cache_bytes_per_token']:>13}"
              f"{cache:>12}{pre:>12}")
    top = max(contexts)
    for fam, (goal, need) in GOALS.items():
        if fam in fams and "v3" in fams:
            got = by[("v3", top)]["decode_ms"] / by[(fam, top)]["decode_ms"]
            print(f"goal {fam}: {goal}; at {top // 1024}K measured {got:.2f}× -> {'met' if got >= need else 'NOT met'}")
    for fam, (goal, need) in CACHE_GOALS.items():
        if fam in fams and "v3" in fams:
            got = by[(fam, top)]["cache_bytes_per_token"] / by[("v3", top)]["cache_bytes_per_token"]
            print(f"goal {fam}: {goal}; at {top // 1024}K measured {got:.3f}× -> {'met' if got <= need else 'NOT met'}")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for fam in fams:
        xs = [r["context"] for r in rows if r["family"] == fam]
        a.plot(xs, [r["decode_ms"] for r in rows if r["family"] == fam], marker="o", label=fam)
        b.plot(xs, [r["prefill_s"] for r in rows if r["family"] == fam], marker="o", label=fam)
    for ax, title in ((a, "decode ms / token"), (b, "prefill seconds (largest contexts may be estimated)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "long_context.png", dpi=110)
    print(f"wrote {out / 'results.json'} and {out / 'long_context.png'}")


if __name__ == "__main__":
    sys.exit(main())
