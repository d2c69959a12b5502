"""The multi-process engine gives the same greedy generations as one process (2 ranks over gloo).

This process becomes rank 0 (scheduler, sampling) and spawns rank 1, exactly as
`dsv3 generate --tensor-parallel-size 2` does. The default run covers TP=2 with EP=2, MTP
speculative drafting (`execute_mtp` broadcasts) and prompt logprobs (a head call outside a step);
TP-only and EP-only layouts are slow-marked.
"""

from __future__ import annotations

import pytest
import torch

from dsv3.io.load import load_model
from dsv3.engine import EngineConfig, LLMEngine
from dsv3.parallel.worker import start_engine
from dsv3.engine.sampling import SamplingParams
from dsv3.io.tokenizer import Tokenizer

PROMPTS = [[5, 17, 33, 101, 7], [44, 9, 250, 3, 3, 18, 91, 12, 60, 2, 77], [300, 301]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def run(engine: LLMEngine) -> list:
    params = [SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, prompt_logprobs=2),
              SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)]
    outs = engine.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return [(o.outputs[0].token_ids, o.prompt_logprobs) for o in outs]


def config() -> EngineConfig:
    # small batches and blocks: several steps mix prefill chunks with decodes
    return EngineConfig(max_num_seqs=2, max_num_batched_tokens=8, block_size=4, num_blocks=64, num_speculative_tokens=2)


@pytest.fixture(scope="module")
def reference(model_dir):
    torch.manual_seed(0)
    return run(LLMEngine(load_model(model_dir, dtype="fp32", progress=False), Tokenizer.from_dir(model_dir), config()))


def check(model_dir, reference, tp: int, ep: int) -> None:
    handle = start_engine(model_dir, tp, ep, dtype="fp32", config=config(), progress=False)
    try:
        got = run(handle.engine)
        assert handle.engine.drafter.stats.drafted[0] > 0  # MTP drafting went through the broadcast path
    finally:
        handle.shutdown()
    for (toks, plp), (ref_toks, ref_plp) in zip(got, reference):
        assert toks == ref_toks
        if ref_plp is None:
            assert plp is None
            continue
        assert len(plp) == len(ref_plp)
        for a, b in zip(plp[1:], ref_plp[1:]):
            assert a.keys() == b.keys()
            assert all(abs(a[k] - b[k]) < 1e-4 for k in a)
    assert not any(p.is_alive() for p in handle.procs)  # clean shutdown


def test_tp2_ep2_engine_matches_one_process(model_dir, reference):
    check(model_dir, reference, 2, 2)


def test_world_of_one_is_a_plain_engine(model_dir, reference):
    """start_engine(1, 1) spawns nothing and needs no process group, so callers can always use it."""
    handle = start_engine(model_dir, 1, 1, dtype="fp32", config=config(), progress=False)
    with handle:
        assert handle.procs == [] and handle.healthy()
        assert [t for t, _ in run(handle.engine)] == [t for t, _ in reference]


def test_dead_rank_fails_fast(model_dir):
    """A killed worker makes the next step raise RankFailure at once (no hang) and the handle unhealthy."""
    from dsv3.parallel.worker import RankFailure

    handle = start_engine(model_dir, 2, 1, dtype="fp32", progress=False)
    try:
        assert handle.healthy()
        handle.procs[0].kill()
        handle.procs[0].join()
        assert not handle.healthy()
        with pytest.raises(RankFailure, match="rank stopped"):
            handle.engine.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=3, temperature=0))
    finally:
        handle.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)])
def test_tp_or_ep_engine_matches_one_process(model_dir, reference, tp, ep):
    check(model_dir, reference, tp, ep)
