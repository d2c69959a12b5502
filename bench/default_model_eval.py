"""Every measurement issue 7 asks of the embedded default model, on held-out files it never trained on.

    python bench/default_model_eval.py [--model DIR] [--chat-model DIR] [--shards build/shards]
                                       [--out bench/results/default_model] [--quick] [--only bpb,functions,...]

Parts (all through dsv3's own engine, `dsv3.LLM`):
  bpb        bits per byte of the held-out files next to `xz -9e` (per file summed, and concatenated),
             all files and the stdlib subset
  functions  share of held-out signature + docstring completions (greedy, 128 tokens, cut at the
             function's end) that parse with `ast`
  fim        single-line fill-in-the-middle exact match on held-out lines
  mtp        MTP draft acceptance per position and decode speed-up with 1 and 2 draft tokens
             (greedy outputs must equal plain decoding)
  latency    20-token infill latency p50/p90, in-process and through `/v1/completions`
  chat       share of held-out "write a function" instructions the chat model answers with code
             that parses and defines a function
Prints a table, writes results.json and summary.png to --out. Exit status 1 if speculative
decoding changed a greedy output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from default_model import chat, completion, compression, report, speed  # noqa: E402

from dsv3.data.instructions import split_files  # noqa: E402
from dsv3.data.shards import load_manifest  # noqa: E402
from dsv3.errors import DSV3Error  # noqa: E402
from dsv3.llm import LLM  # noqa: E402
from dsv3.io.paths import default_chat_model_dir, default_model_dir  # noqa: E402
from dsv3.engine.sampling import SamplingParams  # noqa: E402

UNSEEN = ", whose signature + docstring is in no train file"
FIM_SAMPLES, FIM_TEMPERATURE = 20, 0.8  # pass@k of the FIM part, here and in long_model_goals.py
PARTS = ("bpb", "functions", "fim", "mtp", "latency", "chat")
# fit: draw only functions / instructions whose reference fits the token budget (None: any length)
FULL = dict(bpb_files=None, functions=100, function_tokens=128, fim=200, mtp_prompts=16, mtp_tokens=64, latency=30, chat=50,
            chat_tokens=256, fit=True)
QUICK = dict(bpb_files=3, functions=6, function_tokens=24, fim=6, mtp_prompts=2, mtp_tokens=12, latency=4, chat=3,
             chat_tokens=24, fit=False)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the embedded default model)")
    p.add_argument("--chat-model", default=None,
                   help="chat-tuned model for the chat part (default: the embedded chat variant, skipped if absent)")
    p.add_argument("--shards", default="build/shards", help="shard directory whose manifest gives the held-out split")
    p.add_argument("--inputs", nargs="+", default=None, help="source directories (default: those the manifest records)")
    p.add_argument("--out", default="bench/results/default_model", help="output directory")
    p.add_argument("--quick", action="store_true", help="small counts, for a smoke test")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {','.join(PARTS)}")
    p.add_argument("--dtype", default="fp32", help="weights/activations dtype (fp32 is the fast one on CPU)")
    p.add_argument("--window", type=int, default=512, help="scoring window in tokens (the training sequence length)")
    p.add_argument("--stride", type=int, default=256, help="new tokens scored per window after the first")
    p.add_argument("--fim-prefix-tokens", type=int, default=384)
    p.add_argument("--fim-suffix-tokens", type=int, default=128)
    p.add_argument("--fim-samples", type=int, default=FIM_SAMPLES,
                   help="sampled infills per line for the pass@k exact match (0: greedy only)")
    p.add_argument("--fim-temperature", type=float, default=FIM_TEMPERATURE)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0, help="seed of every sample of functions, lines and instructions")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 on a busy machine")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run_bpb(llm, tok, files, a, n, progress) -> dict:
    files = sorted(files, key=lambda f: f[1].stat().st_size)[:n] if n else files
    docs = compression.load_docs(tok, files)
    score = lambda seq: llm.score([seq])[0].logprobs  # noqa: E731
    res = compression.evaluate(score, docs, tok.bos_token_id, a.window, a.stride, progress=progress)
    manifest = load_manifest(a.shards)
    sha = hashlib.sha256((Path(llm.model_dir) / "tokenizer.json").read_bytes()).hexdigest()
    res["tokenizer_matches_shards"] = sha == manifest["tokenizer"]["sha256"]
    if res["tokenizer_matches_shards"]:  # then our tokens must be exactly the shards' (BOS excepted)
        want = {e["path"]: e["tokens"] - (manifest["tokenizer"].get("bos_id") is not None) for e in manifest["files"]}
        res["token_count_mismatches"] = [d.path for d in docs if len(d.ids) != want[d.path]]
    return res


def complete_functions(llm, sites, max_tokens, progress) -> dict:
    prompts = [completion.function_prompt(s) for s in sites]
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=progress)
    rows = []
    for s, p, o in zip(sites, prompts, outs):
        code = completion.cut_function(p, o.outputs[0].text)
        parses, body = completion.parse_function(code)
        rows.append({"path": s.path, "function": s.qualname, "code": code, "parses": parses, "with_body": body,
                     "ended": len(code) < len(p + o.outputs[0].text) or o.outputs[0].finish_reason != "length"})
    k = len(rows)
    return {"n": k, "parse_rate": sum(r["parses"] for r in rows) / k, "parse_rate_with_body": sum(r["with_body"] for r in rows) / k,
            "ended_within_budget": sum(r["ended"] for r in rows) / k,
            "examples": [r for r in rows if r["with_body"]][:4] + [r for r in rows if not r["parses"]][:2]}


def run_functions(llm, tok, files, seen, a, n, max_tokens, fit, progress) -> dict:
    """With `fit`, the headline sample holds functions whose own body fits `max_tokens`; the any-length
    sample (most stdlib bodies are longer, so it mostly measures the budget) is reported beside it.
    Both leave out functions whose head also appears in a train file (`seen`)."""
    if not fit:
        return {**complete_functions(llm, completion.function_sites(files, n, a.seed, seen=seen), max_tokens, progress),
                "target": 0.7, "sample": f"held-out documented functions of any length{UNSEEN}"}
    fits = completion.function_sites(files, n, a.seed, fits=completion.body_fits(tok, max_tokens), seen=seen)
    res = {**complete_functions(llm, fits, max_tokens, progress), "target": 0.7,
           "sample": f"held-out documented functions whose body is at most {max_tokens} tokens{UNSEEN}"}
    res["any_length"] = complete_functions(llm, completion.function_sites(files, n, a.seed, seen=seen), max_tokens, progress)
    return res


def fim_prompts(tok, files, a, n) -> list[tuple[completion.FimItem, str, str]]:
    items = completion.fim_items(files, n, a.seed)
    return [(it, *completion.trim(tok, it.prefix, it.suffix, a.fim_prefix_tokens, a.fim_suffix_tokens)) for it in items]


def run_fim(llm, tok, prompts, a, progress) -> dict:
    """Each held-out line infilled from its prefix and suffix, and (what the suffix adds to) the same line written
    left to right from the prefix alone: the prefix-only figures say what the model knows of the line without it."""
    params = SamplingParams(max_tokens=48, temperature=0, stop=["\n"])
    ids = [{"prompt_token_ids": completion.fim_prompt_ids(tok, pre, suf)} for _, pre, suf in prompts]
    outs = llm.generate(ids, params, use_tqdm=progress)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    plain = llm.generate([{"prompt_token_ids": bos + tok.encode(pre, add_special_tokens=False)} for _, pre, _ in prompts],
                         params, use_tqdm=progress)
    rows = [{"path": it.path, "line": it.lineno, "expected": it.middle, "got": completion.first_line(o.outputs[0].text),
             "prefix_only": completion.first_line(p.outputs[0].text)} for (it, _, _), o, p in zip(prompts, outs, plain)]
    for r in rows:
        want = r["expected"].rstrip()
        r["exact"] = r["got"] == want
        r["edit_similarity"] = completion.edit_similarity(r["got"], want)
        r["prefix_only_exact"] = r["prefix_only"] == want
        r["prefix_only_edit_similarity"] = completion.edit_similarity(r["prefix_only"], want)
    k = len(rows)
    sampled = {}
    if a.fim_samples > 0:
        sampled = sampled_fim(llm, ids, rows, a, progress)
        plain_ids = [{"prompt_token_ids": bos + tok.encode(pre, add_special_tokens=False)} for _, pre, _ in prompts]
        sampled["prefix_only_pass_at_k_exact_match"] = sampled_fim(
            llm, plain_ids, rows, a, progress, "prefix_only_")["pass_at_k_exact_match"]
    return {"n": k, "exact_match": sum(r["exact"] for r in rows) / k, **sampled,
            "edit_similarity": sum(r["edit_similarity"] for r in rows) / k,
            "prefix_only_exact_match": sum(r["prefix_only_exact"] for r in rows) / k,
            "prefix_only_edit_similarity": sum(r["prefix_only_edit_similarity"] for r in rows) / k,
            "prefix_token_budget": a.fim_prefix_tokens, "suffix_token_budget": a.fim_suffix_tokens,
            "examples": [r for r in rows if r["exact"]][:3] + [r for r in rows if not r["exact"]][:3]}


def sampled_fim(llm, ids, rows, a, progress, key: str = "") -> dict:
    """pass@k exact match: the share of lines that any of k sampled answers (temperature `fim_temperature`) writes
    exactly. No way of choosing among those k answers -- reranking, voting, a verifier -- can match more lines than
    that, so it bounds what decoding alone can add to the greedy figure. `ids` are the FIM prompts, or with `key`
    "prefix_only_" the prefixes alone (the line written left to right)."""
    k = a.fim_samples
    params = SamplingParams(n=k, max_tokens=48, temperature=a.fim_temperature, stop=["\n"], seed=a.seed)
    outs = llm.generate(ids, params, use_tqdm=progress)
    hits = []
    for r, o in zip(rows, outs):
        want = r["expected"].rstrip()
        got = [completion.first_line(c.text) for c in o.outputs]
        r[key + "samples_exact"] = sum(g == want for g in got)
        hits.append(r[key + "samples_exact"] > 0)
    return {"pass_at_k_exact_match": sum(hits) / len(hits), "samples": k, "sample_temperature": a.fim_temperature,
            "sampled_exact_share": sum(r[key + "samples_exact"] for r in rows) / (k * len(rows))}


def main(argv=None) -> int:
    a = parse_args(argv)
    parts = [p.strip() for p in a.only.split(",") if p.strip()]
    if set(parts) - set(PARTS):
        raise DSV3Error(f"--only {a.only}: unknown part {sorted(set(parts) - set(PARTS))[0]!r} (parts: {', '.join(PARTS)}).")
    counts, progress = QUICK if a.quick else FULL, not a.no_progress
    torch.manual_seed(a.seed)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model = Path(a.model) if a.model else default_model_dir()
    files = split_files(a.shards, "heldout", a.inputs)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    make = lambda path=model, **kw: LLM(path, dtype=a.dtype, max_model_len=a.max_model_len, max_num_seqs=64,  # noqa: E731
                                        kv_cache_memory=256 << 20, seed=a.seed, **kw)
    r: dict = {"model": str(model), "shards": a.shards, "heldout_files": len(files), "quick": a.quick, "dtype": a.dtype,
               "threads": torch.get_num_threads(), "seed": a.seed}
    llm = make()
    tok = llm.tokenizer
    if "bpb" in parts:
        r["bits_per_byte"] = run_bpb(llm, tok, files, a, counts["bpb_files"], progress)
    seen = completion.seen_heads(split_files(a.shards, "train", a.inputs)) if {"functions", "chat"} & set(parts) else None
    if "functions" in parts:
        r["function_completion"] = run_functions(llm, tok, files, seen, a, counts["functions"], counts["function_tokens"],
                                                  counts["fit"], progress)
    fim = fim_prompts(tok, files, a, max(counts["fim"], counts["latency"] + 1)) if {"fim", "latency"} & set(parts) else []
    if "fim" in parts:
        r["fim"] = run_fim(llm, tok, fim[:counts["fim"]], a, progress)
    if "latency" in parts:
        lat = fim[:counts["latency"] + 1]  # the first one warms up
        r["infill_latency"] = {"engine": speed.infill_in_process(llm, [completion.fim_prompt_ids(tok, p, s) for _, p, s in lat],
                                                                 progress=progress)}
        with speed.http_server(lambda: (llm.engine, tok)) as url:
            r["infill_latency"]["http"] = speed.infill_http(url, [(p, s) for _, p, s in lat], progress=progress)
    if "mtp" in parts:
        del llm
        sites = completion.function_sites(files, counts["mtp_prompts"], a.seed + 1)
        prompts = [tok.encode(completion.function_prompt(s)) for s in sites]
        if llm_has_mtp(model):
            r["mtp"] = speed.speculative(make, prompts, counts["mtp_tokens"], progress=progress)
        else:
            r["mtp"] = {"skipped": "the model has no MTP module (num_nextn_predict_layers = 0)"}
    if "chat" in parts:
        chat_dir = Path(a.chat_model) if a.chat_model else default_chat_model_dir()
        if chat_dir is None:
            r["chat"] = {"skipped": "no chat model (pass --chat-model DIR, or ship src/dsv3/data/default-chat)"}
        else:
            budget = counts["chat_tokens"]
            fits = lambda text: len(tok.encode(text, add_special_tokens=False)) <= budget  # noqa: E731
            chat_llm = make(chat_dir)
            anyl = chat.evaluate(chat_llm, chat.heldout_instructions(files, counts["chat"], a.seed, seen=seen), budget)
            if counts["fit"]:
                r["chat"] = {"model": str(chat_dir),
                             "sample": f"held-out instructions whose reference answer is at most {budget} tokens{UNSEEN}",
                             **chat.evaluate(chat_llm, chat.heldout_instructions(files, counts["chat"], a.seed, fits, seen), budget),
                             "any_length": anyl}
            else:
                r["chat"] = {"model": str(chat_dir), "sample": f"held-out instructions of any length{UNSEEN}", **anyl}
    r["elapsed_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(r, indent=1, ensure_ascii=False) + "\n")
    report.plot(r, out / "summary.png")
    print(report.table(r))
    print(f"wrote {out / 'results.json'} and {out / 'summary.png'} ({r['elapsed_s']:.0f} s)")
    differ = [k for k, row in r.get("mtp", {}).get("by_k", {}).items() if row.get("identical_outputs") is False]
    if differ:
        print(f"error: speculative decoding with k={', '.join(differ)} changed greedy outputs", file=sys.stderr)
        return 1
    return 0


def llm_has_mtp(model: Path) -> bool:
    return json.loads((model / "config.json").read_text()).get("num_nextn_predict_layers", 0) > 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DSV3Error as e:
        print(f"default_model_eval: error: {e}", file=sys.stderr)
        sys.exit(2)
