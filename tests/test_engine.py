"""The batching engine: identical greedy output to the single-request generator, cache accounting, validation."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from dsv3.engine import EngineConfig, LLMEngine
from dsv3.engine.async_engine import AsyncLLMEngine
from reference_decoder import Generator
from dsv3.layers.moe import Gate
from dsv3.engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def workload(parts):
    model, tok = parts
    rng = random.Random(0)
    prompts = [[rng.randrange(3, tok.vocab_size) for _ in range(rng.randint(1, 90))] for _ in range(64)]
    shared = prompts[0][:40]
    prompts[1:6] = [shared + p[:10] for p in prompts[1:6]]  # some shared prefixes for the prefix cache
    params = [SamplingParams(max_tokens=rng.randint(1, 24), temperature=0, ignore_eos=True) for _ in prompts]
    gen = Generator(model, tok)
    ref = [gen.complete(p, sp).token_ids for p, sp in zip(prompts, params)]
    return prompts, params, ref


@torch.no_grad()
def decision_margin(model, seq: list[int]) -> float:
    """Smallest decision margin on the last position of `seq`: the top-2 logit gap and, in every MoE
    layer, the gap between the K-th and (K+1)-th biased expert score (how close routing is to a tie)."""
    margins = []

    def hook(gate: Gate, inputs, output):
        _, _, scores = output
        choice = scores + (gate.e_score_correction_bias if gate.e_score_correction_bias is not None else 0)
        top = choice[-1].topk(gate.top_k + 1).values
        margins.append(float(top[-2] - top[-1]))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Gate)]
    try:
        top2 = model(torch.tensor([seq]))[0, -1].topk(2).values
    finally:
        for h in handles:
            h.remove()
    return min([float(top2[0] - top2[1])] + margins)


@pytest.mark.parametrize("cfg", [
    dict(),
    dict(enable_prefix_caching=False),
    dict(max_num_batched_tokens=48),  # prompts are chunked across steps, mixed with decodes
    dict(num_blocks=60, max_num_batched_tokens=256),  # forces preemption by recompute
], ids=["default", "no-prefix-cache", "chunked", "preempt"])
def test_batched_greedy_equals_single_request(parts, workload, cfg):
    model, tok = parts
    prompts, params, ref = workload
    engine = LLMEngine(model, tok, EngineConfig(**cfg))
    outs = engine.generate(prompts, params)
    if "num_blocks" in cfg:
        assert engine.scheduler.num_preemptions > 0
    if "max_num_batched_tokens" in cfg and "num_blocks" not in cfg:
        assert engine.stats["steps"] > max(len(p) for p in prompts) // 48
    for p, r, o in zip(prompts, ref, outs):
        got = o.outputs[0].token_ids
        if got == r:
            continue
        k = next(i for i, (a, b) in enumerate(zip(got, r)) if a != b)
        margin = decision_margin(model, p + r[:k])
        assert margin < 1e-4, f"divergence at output token {k} with decision margin {margin:.2e}"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_prefix_cache_hits_and_salt(parts):
    model, tok = parts
    engine = LLMEngine(model, tok, EngineConfig(block_size=16))
    prefix = list(range(10, 10 + 100))
    sp = SamplingParams(max_tokens=2, temperature=0)
    engine.generate([prefix + [200, 201]], sp)
    hits = engine.block_manager.prefix_hits
    engine.generate([prefix + [300, 301, 302]], sp)
    assert engine.block_manager.prefix_hits - hits == 96  # six full 16-token blocks of the shared prefix
    engine.add_request("salted", prefix + [400], sp, cache_salt="tenant-b")
    before = engine.block_manager.prefix_hits
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.prefix_hits == before  # a different salt never shares blocks
    assert engine.block_manager.prefix_queries >= 3 * 100


def test_seed_gives_same_text_whatever_the_batch(parts):
    model, tok = parts
    sp = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = LLMEngine(model, tok).generate([[5, 6, 7, 8]], sp)[0].outputs[0].token_ids
    others = [SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True) for _ in range(7)]
    batch = LLMEngine(model, tok).generate([[9, 9, 9]] * 3 + [[5, 6, 7, 8]] + [[11, 12]] * 4, others[:3] + [sp] + others[3:])
    assert batch[3].outputs[0].token_ids == alone


@pytest.mark.parametrize("bad", [
    lambda: SamplingParams(max_tokens=0), lambda: SamplingParams(top_p=0), lambda: SamplingParams(top_p=1.01),
    lambda: SamplingParams(temperature=-0.5), lambda: SamplingParams(stop=[1, 2]),
])
def test_invalid_sampling_params(bad):
    with pytest.raises(ValueError):
        bad()


def test_invalid_requests_rejected_before_scheduling(parts):
    model, tok = parts
    engine = LLMEngine(model, tok, EngineConfig(max_model_len=64, max_num_seqs=4))
    for prompt, sp in [(list(range(3, 80)), SamplingParams()), ([5, 6], SamplingParams(n=5)), ([], SamplingParams()),
                       ([10 ** 6], SamplingParams())]:
        with pytest.raises(ValueError):
            engine.add_request("r", prompt, sp)
    with pytest.raises(ValueError):  # one bad prompt rejects the whole batch
        engine.generate([[5, 6], list(range(3, 80))], SamplingParams(max_tokens=2))
    assert not engine.has_unfinished_requests() and not engine.requests


def test_abort_frees_all_blocks(parts):
    model, tok = parts
    engine = LLMEngine(model, tok, EngineConfig(enable_prefix_caching=False))
    for i in range(4):
        engine.add_request(f"r{i}", list(range(3, 60)), SamplingParams(max_tokens=50, n=2, temperature=0.5))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    for i in range(4):
        engine.abort(f"r{i}")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()


def test_async_streams_and_cancellation(parts):
    model, tok = parts
    engine = LLMEngine(model, tok)
    front = AsyncLLMEngine(engine)

    async def main():
        async def collect(rid):
            outs = [o async for o in front.generate([5, 6, 7], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), rid)]
            return outs

        async def cancel_after_two():
            agen = front.generate([8, 9], SamplingParams(max_tokens=500, temperature=0, ignore_eos=True), "long")
            got = [await agen.__anext__(), await agen.__anext__()]
            await agen.aclose()
            return got

        a, b = await asyncio.gather(collect("a"), cancel_after_two())
        await asyncio.sleep(0.2)
        return a, b

    try:
        a, b = asyncio.run(main())
    finally:
        front.shutdown()
    assert a[-1].finished and len(a[-1].outputs[0].token_ids) == 12
    assert [len(o.outputs[0].token_ids) for o in a] == sorted(len(o.outputs[0].token_ids) for o in a)
    assert len(b) == 2 and "long" not in engine.requests
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_int8_latent_cache_is_close(parts):
    model, tok = parts
    prompts = [[random.Random(i).randrange(3, tok.vocab_size) for _ in range(40)] for i in range(8)]
    sp = SamplingParams(max_tokens=1, temperature=0, logprobs=None)
    fp = LLMEngine(model, tok, EngineConfig(kv_cache_dtype="auto"))
    q8 = LLMEngine(model, tok, EngineConfig(kv_cache_dtype="int8"))
    assert q8.runner.cache.bytes_per_token() < fp.runner.cache.bytes_per_token() / 3
    agree = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(fp.generate(prompts, sp), q8.generate(prompts, sp)))
    assert agree >= 6


def test_logprobs_prompt_logprobs_and_logits_processors(parts):
    model, tok = parts
    engine = LLMEngine(model, tok)
    ids = [5, 6, 7, 8, 9, 10, 11]
    out = engine.generate([ids], SamplingParams(max_tokens=4, temperature=0, logprobs=3, prompt_logprobs=2, ignore_eos=True))[0]
    seq = ids + out.outputs[0].token_ids
    with torch.no_grad():
        ref = model(torch.tensor([seq]))[0].float().log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for i in range(1, len(ids)):
        assert abs(out.prompt_logprobs[i][ids[i]] - float(ref[i - 1, ids[i]])) < 1e-4
        assert len(out.prompt_logprobs[i]) <= 3
    for j, entry in enumerate(out.outputs[0].logprobs):
        t = out.outputs[0].token_ids[j]
        assert abs(entry[t] - float(ref[len(ids) - 1 + j, t])) < 1e-4 and len(entry) == 3  # greedy: chosen is in the top 3
    assert abs(out.outputs[0].cumulative_logprob - sum(e[t] for e, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids))) < 1e-4

    def only_token_42(prev, logits):
        mask = torch.full_like(logits, float("-inf"))
        mask[42] = 0
        return logits + mask

    forced = engine.generate([ids], SamplingParams(max_tokens=5, temperature=0.8, logits_processors=[only_token_42], ignore_eos=True))
    assert forced[0].outputs[0].token_ids == [42] * 5


def test_greedy_choice_is_argmax_with_ties_and_nans():
    """`greedy_choice` (max on CPU) picks what argmax over NaN-as--inf picks: the first of tied maxima, never a NaN,
    a row of only -inf or only NaN at index 0."""
    import torch

    from dsv3.engine.sampling import greedy_choice

    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        x = torch.randint(-3, 3, (16, 200), generator=g).float()  # many ties
        if trial % 2:
            x[3, 5] = float("nan")
            x[4] = float("nan")
            x[6, ::2] = float("nan")
        if trial % 3 == 0:
            x[7] = float("-inf")
        want = torch.nan_to_num(x, nan=float("-inf")).argmax(-1)
        assert torch.equal(greedy_choice(x), want), trial
