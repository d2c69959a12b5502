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
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("v4_engine")
    save_model(model, path, tokenizer_from=DEFAULT)
    return load_model(path, dtype="fp32", progress=False), Tokenizer.from_dir(path), path


def _reference(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy continuation by full forwards: the tokens and each one's log-probability."""
    ids, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            lp = model(torch.tensor([ids]))[0, -1].float().log_softmax(-1)
            tok = int(lp.argmax())
            ids.append(tok)
            lps.append(float(lp[tok]))
    return ids[len(prompt):], lps


def _check(model, prompts, params, outs) -> None:
    for p, sp, o in zip(prompts, params, outs):
        want, want_lp = _reference(model, p, sp.max_tokens)
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
    assert engine.block_manager.block_size % 8 == 0 and not engine.block_manager.enable_prefix_caching
    outs = engine.generate(prompts, params)
    if "num_blocks" in cfg:
        assert engine.scheduler.num_preemptions > 0
    _check(model, prompts, params, outs)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and len(bm.free_state_slots) == bm.num_state_slots


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
    for cfg in (dict(kv_cache_dtype="int8"), dict(num_speculative_tokens=1)):
        with pytest.raises(DSV3Error, match="deepseek_v4"):
            LLMEngine(model, tok, EngineConfig(max_model_len=64, **cfg))


def test_dsv3_generate_runs_a_v4_checkpoint(parts, capsys):
    _, _, path = parts
    assert cli.main(["generate", "--model", str(path), "--max-tokens", "4", "--temperature", "0", "hello"]) == 0
    assert capsys.readouterr().out.strip()
    assert cli.main(["generate", "--model", str(path), "--num-speculative-tokens", "1", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "deepseek_v4" in err and "\n" not in err
    assert cli.main(["generate", "--model", str(path), "--tensor-parallel-size", "2", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "DeepSeek-V4" in err and "\n" not in err
