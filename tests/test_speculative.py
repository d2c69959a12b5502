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
