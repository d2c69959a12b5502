"""Fault isolation in the engine: whatever one request raises stops that request only.

Each test injects a fault that fires for one request (by sequence identity, never by content, so it
cannot hit the others) at a point inside `LLMEngine.step` -- the model forward, MTP drafting,
batched sampling, a logits processor, detokenizing -- and checks that the poisoned request ends with
`finish_reason="error"` and an `error`, that every other request's greedy output is token for token
what it is in a run without the poisoned one, that its blocks are freed, and that the engine still
takes new requests.
"""

from __future__ import annotations

import asyncio

import pytest

import dsv3.engine.llm_engine as engine_mod
from dsv3.engine import EngineConfig, LLMEngine, RequestFailedError
from dsv3.engine.async_engine import AsyncLLMEngine
from dsv3.engine.sampling import SamplingParams

PROMPTS = [[5, 9, 14, 22, 31], [7, 7, 40, 41], [12, 13, 14, 15, 16, 17, 18], [50, 3, 60]]
POISON = [33, 34, 35, 36]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def engine(parts, **kw) -> LLMEngine:
    model, tok = parts
    return LLMEngine(model, tok, EngineConfig(max_num_seqs=8, max_model_len=128, num_blocks=64, **kw))


@pytest.fixture(scope="module")
def clean(parts):
    return [o.outputs[0].token_ids for o in engine(parts).generate(PROMPTS, GREEDY)]


def run_with_poison(eng: LLMEngine, poison_params: SamplingParams = GREEDY, arm=lambda eng, seq: None):
    """Queue the four clean prompts and the poisoned one together, arm the fault on the poisoned sequence, run."""
    for i, p in enumerate(PROMPTS[:2]):
        eng.add_request(f"r{i}", p, GREEDY)
    eng.add_request("poison", POISON, poison_params)
    for i, p in enumerate(PROMPTS[2:], 2):
        eng.add_request(f"r{i}", p, GREEDY)
    seq = eng.requests["poison"].seqs[0]
    arm(eng, seq)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return done, seq


def check(eng: LLMEngine, done: dict, clean: list, seq, what: str):
    bad = done["poison"]
    assert bad.error is not None and what in bad.error
    assert bad.outputs[0].finish_reason == "error"
    assert [done[f"r{i}"].outputs[0].token_ids for i in range(4)] == clean
    assert all(done[f"r{i}"].error is None for i in range(4))
    assert not seq.block_table and eng.block_manager.num_free_blocks == eng.block_manager.num_blocks  # nothing leaked
    assert eng.stats["request_errors"] == 1
    again = eng.generate([PROMPTS[0]], GREEDY)[0]  # the engine keeps serving
    assert again.error is None and again.outputs[0].token_ids == clean[0]


def test_model_forward_fault_fails_one_request(parts, clean):
    eng = engine(parts)
    real = eng.runner.execute

    def arm(eng, seq):
        def execute(items):
            if any(it.block_table is seq.block_table for it in items) and seq.num_computed_tokens >= len(POISON) + 2:
                raise RuntimeError("injected forward fault")
            return real(items)
        eng.runner.execute = execute

    done, seq = run_with_poison(eng, arm=arm)
    assert len(done["poison"].outputs[0].token_ids) == 3  # it failed mid-decode, after 3 tokens
    check(eng, done, clean, seq, "injected forward fault")


def test_prefill_fault_fails_one_request(parts, clean):
    eng = engine(parts, max_num_batched_tokens=16)  # prompts are chunked, decodes mix with prefills
    real = eng.runner.execute

    def arm(eng, seq):
        def execute(items):
            if any(it.block_table is seq.block_table and len(it.token_ids) > 1 for it in items):
                raise IndexError("injected prefill fault")
            return real(items)
        eng.runner.execute = execute

    done, seq = run_with_poison(eng, arm=arm)
    assert done["poison"].outputs[0].token_ids == []
    check(eng, done, clean, seq, "IndexError: injected prefill fault")


def test_batched_sampling_fault_fails_one_request(parts, clean, monkeypatch):
    eng = engine(parts)
    poison_params = SamplingParams(max_tokens=12, temperature=0.7, seed=3, ignore_eos=True)
    real = engine_mod.sample

    def sample(logits, params, generators):
        if any(p is poison_params for p in params):
            raise OverflowError("injected sampling fault")
        return real(logits, params, generators)

    monkeypatch.setattr(engine_mod, "sample", sample)
    done, seq = run_with_poison(eng, poison_params)
    check(eng, done, clean, seq, "OverflowError")


def test_logits_processor_fault_fails_one_request(parts, clean):
    def proc(out_ids, logits):
        if len(out_ids) == 4:
            raise RuntimeError("a token outside the grammar was sampled")
        return logits

    eng = engine(parts)
    done, seq = run_with_poison(eng, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logits_processors=[proc]))
    assert len(done["poison"].outputs[0].token_ids) == 4
    check(eng, done, clean, seq, "outside the grammar")


def test_detokenize_fault_fails_one_request(parts, clean):
    def arm(eng, seq):
        real = seq.output.append

        def append(tok):
            if len(seq.output.token_ids) == 2:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
            return real(tok)
        seq.output.append = append

    eng = engine(parts)
    done, seq = run_with_poison(eng, arm=arm)
    check(eng, done, clean, seq, "UnicodeDecodeError")


def test_mtp_draft_fault_fails_one_request(parts, clean):
    eng = engine(parts, num_speculative_tokens=1)
    real = eng.runner.execute_mtp

    def arm(eng, seq):
        def execute_mtp(items, hidden):
            if any(it.block_table is seq.block_table for it in items):
                raise RuntimeError("injected draft fault")
            return real(items, hidden)
        eng.runner.execute_mtp = execute_mtp

    done, seq = run_with_poison(eng, arm=arm)
    check(eng, done, clean, seq, "injected draft fault")
    assert eng.stats["spec_draft_tokens"] > 0  # the others kept speculating


def test_n_sequences_fail_together_and_n_greedy_others_survive(parts, clean):
    """A request with n=3: a fault in one of its sequences stops all three (its client gets one error)."""
    eng = engine(parts)
    params = SamplingParams(n=3, max_tokens=12, temperature=0.8, seed=1, ignore_eos=True)
    real = eng.runner.execute

    def arm(eng, seq):
        sib = eng.requests["poison"].seqs[2]

        def execute(items):
            if any(it.block_table is sib.block_table for it in items) and sib.num_output_tokens == 5:
                raise RuntimeError("injected sibling fault")
            return real(items)
        eng.runner.execute = execute

    done, seq = run_with_poison(eng, params, arm=arm)
    assert {o.finish_reason for o in done["poison"].outputs} == {"error"}
    check(eng, done, clean, seq, "injected sibling fault")


def test_async_front_raises_in_the_failing_stream_only(parts, clean):
    eng = engine(parts)
    real = eng.runner.execute
    front = AsyncLLMEngine(eng)

    async def consume(rid, prompt):
        out = None
        async for out in front.generate(prompt, GREEDY, rid):
            pass
        return out.outputs[0].token_ids

    async def main():
        front.start()
        seqs = {}

        def execute(items):
            s = eng.requests.get("poison")
            if s is not None:
                seqs["poison"] = s.seqs[0]
            p = seqs.get("poison")
            if p is not None and any(it.block_table is p.block_table for it in items) and p.num_output_tokens >= 2:
                raise RuntimeError("injected")
            return real(items)
        eng.runner.execute = execute
        tasks = [asyncio.create_task(consume(f"r{i}", p)) for i, p in enumerate(PROMPTS)]
        bad = asyncio.create_task(consume("poison", POISON))
        results = await asyncio.gather(*tasks)
        with pytest.raises(RequestFailedError, match="injected"):
            await bad
        assert front.errored is None
        assert await consume("after", PROMPTS[1]) == clean[1]
        return results

    try:
        assert asyncio.run(main()) == clean
    finally:
        front.shutdown()


def test_step_failure_outside_isolation_stops_in_flight_requests_only(parts, clean):
    """A fault the engine cannot pin on a request (here: the scheduler) fails the requests of that step,
    frees their blocks, and the loop goes on; three such steps in a row stop the engine."""
    from dsv3.engine import async_engine

    eng = engine(parts)
    front = AsyncLLMEngine(eng)
    real = eng.scheduler.schedule
    fail = {"left": 1}

    def schedule():
        if fail["left"]:
            fail["left"] -= 1
            raise RuntimeError("injected scheduler fault")
        return real()
    eng.scheduler.schedule = schedule

    async def consume(rid, prompt):
        out = None
        async for out in front.generate(prompt, GREEDY, rid):
            pass
        return out.outputs[0].token_ids

    async def main():
        front.start()
        with pytest.raises(RuntimeError, match="the engine failed"):
            await consume("a", PROMPTS[0])
        assert front.errored is None and eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
        assert await consume("b", PROMPTS[0]) == clean[0]
        fail["left"] = async_engine.MAX_STEP_FAILURES
        for i in range(async_engine.MAX_STEP_FAILURES):
            with pytest.raises(RuntimeError):
                await consume(f"c{i}", PROMPTS[0])
        assert front.errored is not None

    try:
        asyncio.run(main())
    finally:
        front.shutdown()
