"""MTP speculative decoding: greedy output unchanged, accepted drafts handled, rejection sampling exact."""

from __future__ import annotations

import random

import pytest
import torch

from dsv3.engine import EngineConfig, LLMEngine
from dsv3.engine.sequence import Sequence
from dsv3.engine.speculative import Draft, verify
from dsv3.engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def workload(parts):
    model, tok = parts
    rng = random.Random(1)
    prompts = [[rng.randrange(3, tok.vocab_size) for _ in range(rng.randint(1, 60))] for _ in range(16)]
    params = [SamplingParams(max_tokens=rng.randint(2, 30), temperature=0, ignore_eos=True) for _ in prompts]
    ref = [o.outputs[0].token_ids for o in LLMEngine(model, tok).generate(prompts, params)]
    return prompts, params, ref


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_identical_with_mtp_drafts(parts, workload, k):
    model, tok = parts
    prompts, params, ref = workload
    engine = LLMEngine(model, tok, EngineConfig(num_speculative_tokens=k))
    assert [o.outputs[0].token_ids for o in engine.generate(prompts, params)] == ref
    assert engine.drafter.stats.drafted[0] > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_accepted_drafts_keep_output_and_save_steps(parts, workload, monkeypatch):
    """An oracle drafter that proposes the true continuation: every draft is accepted, the text is
    unchanged, and fewer engine steps are needed — exercising the accept path and the cache bookkeeping."""
    model, tok = parts
    prompts, params, ref = workload
    truth = {tuple(p): r for p, r in zip(prompts, ref)}
    engine = LLMEngine(model, tok, EngineConfig(num_speculative_tokens=3))
    real_draft = engine.drafter.draft

    def oracle_draft(chunks):
        drafts = real_draft(chunks)  # runs the MTP module and allocates slots as usual
        for seq, d in drafts.items():
            done = seq.num_output_tokens
            future = truth[tuple(seq.token_ids[: seq.num_prompt_tokens])][done:]
            d.tokens = (future + [0] * len(d.tokens))[: len(d.tokens)]
        return drafts

    monkeypatch.setattr(engine.drafter, "draft", oracle_draft)
    outs = engine.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == ref
    baseline = LLMEngine(model, tok)
    baseline.generate(prompts, params)
    assert engine.stats["steps"] < baseline.stats["steps"]
    assert engine.drafter.stats.acceptance_rate[0] > 0.9
    assert 0.9 * engine.stats["spec_draft_tokens"] < engine.stats["spec_accepted_tokens"] <= engine.stats["spec_draft_tokens"]


def test_rejection_sampling_keeps_the_target_distribution():
    V = 5
    p_logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    p = p_logits[0].softmax(-1)
    q = torch.tensor([0.05, 0.05, 0.6, 0.2, 0.1])
    params = SamplingParams(temperature=1.0, max_tokens=4)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(V)
    trials = 6000
    for _ in range(trials):
        draft_tok = int(torch.multinomial(q, 1, generator=gen))
        seq = Sequence(0, "r", 0, [1], 1, params, None, gen)
        first = verify(seq, Draft([draft_tok], q[None]), p_logits)[0]
        counts[first] += 1
    assert (counts / trials - p).abs().max() < 0.025


def _spy_native(engine) -> list[int]:
    """Count the engine's steps that ran as one native speculative call."""
    calls, real = [], engine.runner.execute_spec

    def spy(items, k):
        out = real(items, k)
        if out is not None:
            calls.append(len(items))
        return out

    engine.runner.execute_spec = spy
    return calls


@pytest.mark.parametrize("k", [1, 2])
def test_native_greedy_step_equals_the_general_path(parts, k):
    """Steady greedy decoding runs as one native call per step (verify, accept, draft the next step). Its tokens are
    plain decoding's, and it proposes the very drafts the general (Python) path proposes: the same acceptance at
    every draft position, step for step. A stop token inside an accepted run ends the sequence there."""
    model, tok = parts
    rng = random.Random(5)
    prompts = [[rng.randrange(3, tok.vocab_size) for _ in range(n)] for n in (7, 30)]
    params = SamplingParams(max_tokens=80, temperature=0, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in LLMEngine(model, tok).generate(prompts, params)]

    def run(native: bool, p=params):
        engine = LLMEngine(model, tok, EngineConfig(num_speculative_tokens=k, spec_min_acceptance=0))
        calls = _spy_native(engine)
        if not native:
            engine.runner.execute_spec = lambda items, k: None
        outs = [[o.outputs[0].token_ids for o in engine.generate([q], p)][0] for q in prompts]  # batch 1
        return outs, engine.drafter.stats.accepted, engine.drafter.stats.drafted, calls

    fast, slow = run(True), run(False)
    assert fast[0] == plain == slow[0]
    assert fast[1:3] == slow[1:3] and sum(fast[2]) > 100
    assert len(fast[3]) > 40 and not slow[3]
    stop = plain[0][40]
    cut = LLMEngine(model, tok).generate(prompts[:1], SamplingParams(max_tokens=80, temperature=0, stop_token_ids=[stop]))
    assert run(True, SamplingParams(max_tokens=80, temperature=0, stop_token_ids=[stop]))[0][0] == cut[0].outputs[0].token_ids


def test_a_request_below_the_break_even_stops_drafting(parts, workload):
    """k per request: once a request has drafted MIN_DRAFTS tokens and accepts fewer than spec_min_acceptance of
    them, it decodes without drafts; the output is unchanged and /metrics counts the switch."""
    from dsv3.engine.speculative import MIN_DRAFTS
    from types import SimpleNamespace

    from dsv3.serve.metrics import _EngineCollector

    model, tok = parts
    engine = LLMEngine(model, tok, EngineConfig(num_speculative_tokens=1, spec_min_acceptance=1.01))
    params = SamplingParams(max_tokens=MIN_DRAFTS + 40, temperature=0, ignore_eos=True)
    prompt = [5, 9, 13]
    out = engine.generate([prompt], params)[0].outputs[0].token_ids
    assert out == LLMEngine(model, tok).generate([prompt], params)[0].outputs[0].token_ids
    assert engine.drafter.switched_off == 1
    assert engine.drafter.stats.drafted[0] == MIN_DRAFTS  # not one draft after the switch
    text = "\n".join(f"{m.name} {s.value}" for m in _EngineCollector(lambda: SimpleNamespace(engine=engine, cache=None)).collect() for s in m.samples)
    assert "dsv3:spec_decode_requests_switched_off 1" in text
    # a switched-off request keeps no hidden states for the MTP module (nothing would consume them)
    engine.add_request("again", prompt, params)
    seq = engine.requests["again"].seqs[0]
    while engine.has_unfinished_requests():
        engine.step()
        if seq.spec_off:
            assert seq.mtp_pending is None or seq.mtp_pending.shape[0] <= 1
    assert seq.spec_off and seq.num_output_tokens == MIN_DRAFTS + 40


def test_a_failing_native_step_falls_back_to_the_general_path(parts, monkeypatch):
    """An error inside the native speculative call costs nothing but speed: the general path re-runs the step."""
    model, tok = parts
    engine = LLMEngine(model, tok, EngineConfig(num_speculative_tokens=1))
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    real, fails = engine.runner.execute_spec, []

    def flaky(items, k):
        if len(fails) < 3:
            fails.append(1)
            raise RuntimeError("boom")
        return real(items, k)

    engine.runner.execute_spec = flaky
    out = engine.generate([[4, 8, 15]], params)[0]
    assert out.outputs[0].token_ids == LLMEngine(model, tok).generate([[4, 8, 15]], params)[0].outputs[0].token_ids
    assert out.outputs[0].finish_reason == "length" and len(fails) == 3
