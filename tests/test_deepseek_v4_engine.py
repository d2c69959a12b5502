"""DeepSeek-V4 in the paged engine: state slots (window ring, compressor carry) and paged compressed entries give
the full forward's tokens and log-probabilities -- for many sequences at different positions decoded in one
batch, chunked prefill, preemption and recompute -- with memory per token that of the entries alone."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from dsv3 import cli
from dsv3.config import ModelConfig
from dsv3.engine import EngineConfig, LLMEngine
from dsv3.engine.sampling import SamplingParams
from dsv3.errors import DSV3Error
from dsv3.io.checkpoint import save_model
from dsv3.io.load import load_model
from dsv3.io.tokenizer import Tokenizer
from dsv3.models.deepseek_v4.model import DeepseekV4ForCausalLM
from test_deepseek_v4 import RELEASED

DEFAULT = Path(__file__).resolve().parents[1] / "src" / "dsv3" / "data" / "default"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The tiny V4 of test_deepseek_v4 (window 8, CSA 4:1 top-3, HCA 8:1, MTP) with the default model's tokenizer."""
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(ModelConfig.from_dict({**RELEASED, "vocab_size": 8192}))  # the tokenizer's
    model.reset_buffers()
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(1), every_tensor=True)
    path = tmp_path_factory.mktemp("v4_engine")
    save_model(model, path, tokenizer_from=DEFAULT)
    return load_model(path, dtype="fp32", progress=False), Tokenizer.from_dir(path), path


_REFERENCE: dict = {}


def _reference(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy continuation by full forwards: the tokens and each one's log-probability (kept for the module)."""
    key = (id(model), tuple(prompt), n)
    if key not in _REFERENCE:
        _REFERENCE[key] = _greedy(model, prompt, n)
    return _REFERENCE[key]


def _greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    ids, lps, margins = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            lp = model(torch.tensor([ids]))[0, -1].float().log_softmax(-1)
            tok = int(lp.argmax())
            ids.append(tok)
            lps.append(float(lp[tok]))
            top2 = lp.topk(2).values
            margins.append(float(top2[0] - top2[1]))
    return ids[len(prompt):], lps, margins


def _check(model, prompts, params, outs) -> None:
    for p, sp, o in zip(prompts, params, outs):
        want, want_lp, _ = _reference(model, p, sp.max_tokens)
        got = o.outputs[0].token_ids
        got_lp = [e[t] for e, t in zip(o.outputs[0].logprobs, got)]
        k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(got))
        assert k == len(got) or abs(got_lp[k] - want_lp[k]) < 1e-4, f"diverged at token {k} without a near-tie"
        assert max(abs(a - b) for a, b in zip(got_lp[:k], want_lp[:k])) < 1e-4


@pytest.mark.parametrize("cfg", [dict(), dict(max_num_batched_tokens=24), dict(num_blocks=8, max_num_seqs=4)],
                         ids=["batched", "chunked", "preempted"])
def test_engine_equals_the_full_forward(parts, cfg):
    """Twelve prompts of 1-70 tokens, 6-25 new tokens each, run together: every position crosses the window and
    several compressed entries (ratios 4 and 8), rows decode at different positions in one batch."""
    model, tok, _ = parts
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 70))] for _ in range(12)]
    params = [SamplingParams(max_tokens=rng.randint(6, 25), temperature=0, ignore_eos=True, logprobs=0)
              for _ in prompts]
    engine = LLMEngine(model, tok, EngineConfig(max_model_len=128, **cfg))
    assert engine.block_manager.block_size % 8 == 0
    outs = engine.generate(prompts, params)
    if "num_blocks" in cfg:
        assert engine.scheduler.num_preemptions > 0
    _check(model, prompts, params, outs)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and len(bm.free_state_slots) == bm.num_state_slots


def test_native_indexer_selects_what_the_reference_selects(parts, monkeypatch):
    """CSA's indexer top-k runs as `dsv3::index_topk` (csrc/index.c) in the engine's prefill and decode when the
    native library is loaded, and mHC's Sinkhorn as `dsv3::hc_sinkhorn` (csrc/hyper.c); the tokens and
    log-probabilities equal full forwards with the library off, where both are the PyTorch references."""
    from dsv3 import kernels

    model, tok, _ = parts
    if not kernels.load():
        pytest.skip("no native library (no C compiler)")
    calls, mixes = [], []
    real, real_hc = torch.ops.dsv3.index_topk, torch.ops.dsv3.hc_sinkhorn
    monkeypatch.setattr(torch.ops.dsv3, "index_topk", lambda *a: calls.append(a[0].shape[1]) or real(*a))
    monkeypatch.setattr(torch.ops.dsv3, "hc_sinkhorn", lambda *a: mixes.append(1) or real_hc(*a))
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (40, 70, 9)]
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0) for _ in prompts]
    outs = LLMEngine(model, tok, EngineConfig(max_model_len=128)).generate(prompts, params)
    assert any(t > 1 for t in calls) and 1 in calls and mixes  # prefill chunks and decode steps
    monkeypatch.setattr(kernels, "load", lambda: False)
    n, m = len(calls), len(mixes)
    for p, sp, o in zip(prompts, params, outs):
        want, want_lp, _ = _greedy(model, p, sp.max_tokens)
        got = o.outputs[0].token_ids
        assert got == want
        assert max(abs(e[t] - w) for e, t, w in zip(o.outputs[0].logprobs, got, want_lp)) < 1e-4
    assert len(calls) == n and len(mixes) == m  # the reference forwards did not call the native ops


def test_prefix_cache_resumes_from_saved_states(parts):
    """A conversation's next turn (its prompt = the last prompt + the answer + a new message) and a repeated prompt
    resume from the slot state saved at the last cached block end -- prompt ends and decode steps save it -- and
    still give the full forward's tokens; a prefix that ends where no state was saved is recomputed."""
    model, tok, _ = parts
    rng = random.Random(1)
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=0)
    engine = LLMEngine(model, tok, EngineConfig(max_model_len=160, max_num_batched_tokens=64))
    bm, bs = engine.block_manager, engine.block_manager.block_size
    first = [rng.randrange(3, 256) for _ in range(2 * bs + 7)]
    out1 = engine.generate([first], sp)[0]
    assert bm.prefix_hits == 0
    follow = first + out1.outputs[0].token_ids + [rng.randrange(3, 256) for _ in range(9)]
    shared_only = first[:bs + 3] + [rng.randrange(3, 256) for _ in range(30)]  # no state saved at block 1's end
    outs = engine.generate([follow, first, shared_only], [sp, sp, sp])
    # the follow-up resumes after the answer's last full block, the repeat after the prompt's, the other not at all
    assert bm.prefix_hits == (len(first) + 20) // bs * bs + len(first) // bs * bs
    _check(model, [follow, first, shared_only], [sp] * 3, outs)
    assert outs[1].outputs[0].token_ids == out1.outputs[0].token_ids


def test_mtp_drafts_keep_the_full_forwards_tokens(parts):
    """MTP speculative decoding (one draft per step): drafts the main model rejects were already in the slot's
    window and carry, so the slot is rewound to the tokens that stay; greedy output equals the full forward's."""
    model, tok, _ = parts
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 50))] for _ in range(8)]
    params = [SamplingParams(max_tokens=rng.randint(10, 30), temperature=0, ignore_eos=True) for _ in prompts]
    engine = LLMEngine(model, tok, EngineConfig(max_model_len=128, num_speculative_tokens=1))
    # a random MTP module's drafts are nearly always rejected: every other draft is replaced by the right token, so
    # both verdicts are exercised (the MTP module still runs over its paged state for every draft)
    real, turn = engine.drafter.draft, [0]

    def draft(chunks):
        drafts = real(chunks)
        for c in chunks:
            if c.seq in drafts and turn[0] % 2:
                prompt = c.seq.token_ids[:c.seq.num_prompt_tokens]
                want = _reference(model, prompt, next(sp.max_tokens for p, sp in zip(prompts, params) if p == prompt))[0]
                drafts[c.seq].tokens[0] = want[c.start + 1 - c.seq.num_prompt_tokens]
            turn[0] += 1
        return drafts

    engine.drafter.draft = draft
    outs = engine.generate(prompts, params)
    stats = engine.drafter.stats
    assert stats.drafted[0] > 20 and 0 < stats.accepted[0] < stats.drafted[0]  # both verdicts happened
    for p, sp, o in zip(prompts, params, outs):
        want, _, margins = _reference(model, p, sp.max_tokens)
        got = o.outputs[0].token_ids
        k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(got))
        assert k == len(got) or margins[k] < 1e-4, f"diverged at token {k} without a near-tie"
    with pytest.raises(DSV3Error, match="one MTP token"):
        LLMEngine(model, tok, EngineConfig(max_model_len=64, num_speculative_tokens=2))


def test_cache_is_entries_per_token_and_a_slot_per_sequence(parts):
    """The block pool holds only compressed entries (+ indexer keys); rings and carries are one slot per sequence."""
    model, tok, _ = parts
    engine = LLMEngine(model, tok, EngineConfig(max_model_len=128, max_num_seqs=4))
    st, cfg = engine.runner.state, model.config
    bs, nb = engine.block_manager.block_size, engine.block_manager.num_blocks
    entry_bytes = 0
    for i in range(cfg.num_hidden_layers):
        r = cfg.compress_ratio(i)
        if r:
            per_entry = cfg.head_dim + (cfg.index_head_dim if i in st.index_keys else 0)
            assert st.entries[i].shape == (nb * bs // r, cfg.head_dim)
            entry_bytes += bs // r * per_entry * 4
        assert st.slots.layers[i].ring.shape == (4, cfg.sliding_window, cfg.head_dim)
    per_token = sum(s.bytes_per_token(torch.float32) for s in model.cache_specs()[:cfg.num_hidden_layers])
    assert entry_bytes == per_token * bs


def test_combinations_not_run_yet_are_refused_by_name(parts):
    model, tok, _ = parts
    for cfg in (dict(kv_cache_dtype="int8"),):
        with pytest.raises(DSV3Error, match="deepseek_v4"):
            LLMEngine(model, tok, EngineConfig(max_model_len=64, **cfg))


def test_dsv3_generate_runs_a_v4_checkpoint(parts, capsys):
    _, _, path = parts
    assert cli.main(["generate", "--model", str(path), "--max-tokens", "4", "--temperature", "0", "hello"]) == 0
    assert capsys.readouterr().out.strip()
    assert cli.main(["generate", "--model", str(path), "--num-speculative-tokens", "2", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "deepseek_v4" in err and "\n" not in err
    assert cli.main(["generate", "--model", str(path), "--tensor-parallel-size", "2", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "DeepSeek-V4" in err and "\n" not in err


def test_a_forward_that_raises_midway_leaves_the_other_sequences_exact(parts):
    """The last layer raises for any batch holding the poisoned request's token, after every earlier layer has
    written rings, carries and entries of all rows: the step is rolled back, re-run on halves, and only the
    poisoned request fails -- the others give exactly the tokens of a clean run (prefill and decode faults)."""
    model, tok, _ = parts
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randint(12, 40))] for _ in range(4)]
    sp = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    clean = [o.outputs[0].token_ids for o in LLMEngine(model, tok, EngineConfig(max_model_len=96)).generate(prompts, sp)]

    def force_poison(ids, logits):
        logits[:] = float("-inf")
        logits[255] = 0.0
        return logits

    ffn = model.model.layers[-1].ffn
    real = ffn.forward

    def forward(x, input_ids):
        if bool((input_ids == 255).any()):
            raise RuntimeError("injected mid-forward fault")
        return real(x, input_ids)

    for poison_prompt in ([7, 8, 9, 10, 11], [7, 8, 255, 10]):  # fails at its first decode / in its prefill
        ffn.forward = forward
        try:
            eng = LLMEngine(model, tok, EngineConfig(max_model_len=96))
            eng.add_request("poison", poison_prompt, SamplingParams(max_tokens=5, logits_processors=[force_poison]))
            for i, p in enumerate(prompts):
                eng.add_request(f"r{i}", p, sp)
            done = {}
            while eng.has_unfinished_requests():
                done.update({o.request_id: o for o in eng.step() if o.finished})
        finally:
            ffn.forward = real
        assert done["poison"].error is not None and "injected mid-forward fault" in done["poison"].error
        assert [done[f"r{i}"].outputs[0].token_ids for i in range(4)] == clean


def test_quantization_and_finetuning_are_refused_in_one_line(parts, tmp_path, capsys):
    _, _, path = parts
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "write f", "output": "def f(): return 1"}\n')
    for argv in (["quantize", "--model", str(path), "--method", "int8", "-o", str(tmp_path / "q")],
                 ["generate", "--model", str(path), "--quantization", "int4", "hi"],
                 ["finetune", "--model", str(path), "--data-files", str(data), "--output-dir", str(tmp_path / "ft")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "not supported for deepseek_v4" in err and "\n" not in err, argv
    assert not (tmp_path / "q").exists() and not (tmp_path / "ft").exists()


def test_served_through_the_openai_client_and_evaluated(parts, tmp_path, capsys):
    """`dsv3 serve` on a V4 checkpoint: chat and streamed completions through the openai SDK give the full forward's
    greedy tokens; `dsv3 eval perplexity` and `dsv3 eval needle` run on it in-process."""
    import openai
    from serve_harness import serve

    model, tok, path = parts
    prompt = tok.encode("def add(a, b):", add_special_tokens=True)
    want, _, margins = _reference(model, prompt, 6)
    with serve(path, max_model_len=512) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
        got = tok.encode(r.choices[0].text, add_special_tokens=False)
        k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        assert k == len(want) or margins[k] < 1e-4, (got, want)
        chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
        chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert chat.choices[0].finish_reason in ("length", "stop") and srv.state.engine is not None
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    assert cli.main(["eval", "perplexity", "--model", str(path), "--data", str(text), "--window", "64"]) == 0
    assert "bits_per_byte" in capsys.readouterr().out
    out = tmp_path / "needle.json"
    assert cli.main(["eval", "needle", "--model", str(path), "--lengths", "96", "--depths", "0,1", "--trials", "1",
                     "--haystack", str(text), "-o", str(out)]) == 0
    assert out.exists() and out.with_suffix(".png").exists()
