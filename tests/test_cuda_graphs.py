"""CUDA-graph decode steps, checked on CPU: buckets, the static buffer's layout against StepMetadata, which steps
qualify, and the whole static-buffer step (what a graph records) against the eager engine, token for token."""

from __future__ import annotations

import torch

from dsv3.attention.kv_cache import KVCache
from dsv3.attention.metadata import StepMetadata
from dsv3.engine import EngineConfig, LLMEngine
from dsv3.engine.sampling import SamplingParams
from dsv3.engine import cuda_graphs as cg
from dsv3.engine.runner import StepItem


def test_buckets():
    assert cg.batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert cg.batch_buckets(3) == [1, 2]
    b = cg.batch_buckets()
    assert [cg.pick(n, b) for n in (1, 3, 5, 9, 64, 256)] == [1, 4, 8, 16, 64, 256] and cg.pick(257, b) is None
    assert [cg.width_blocks(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


def test_graphs_only_on_one_cuda_process(monkeypatch):
    assert not cg.enabled(torch.device("cpu")) and cg.scratch_blocks(torch.device("cpu")) == 0
    assert cg.enabled(torch.device("cuda"))
    monkeypatch.setenv("DSV3_CUDA_GRAPHS", "0")
    assert not cg.enabled(torch.device("cuda"))


def test_which_steps_qualify():
    dec = lambda **kw: StepItem(**{"token_ids": [5], "start": 7, "block_table": [0], "sample": True, **kw})  # noqa: E731
    assert cg.eligible([dec(), dec(start=30)], multi_lora=False, dsa=False)
    assert not cg.eligible([dec(), dec(token_ids=[1, 2])], False, False)  # a prefill chunk
    assert not cg.eligible([dec(start=0)], False, False)  # a one-token prompt is a prefill
    assert not cg.eligible([dec(all_logits=True)], False, False)  # speculative verification
    assert not cg.eligible([dec(sample=False)], False, False)
    assert not cg.eligible([dec(adapter=1)], False, False) and not cg.eligible([dec()], True, False)
    assert not cg.eligible([dec()], False, True) and not cg.eligible([], False, False)


def test_static_buffer_is_the_step_metadata():
    """The packed buffer, unpacked the way a graph does it, names the same slots StepMetadata.build does; padded
    rows write to and read only the scratch block."""
    bs, scratch = 4, 9
    items = [StepItem([11], 6, [3, 1]), StepItem([12], 13, [0, 2, 5, 7]), StepItem([13], 1, [8])]
    meta = StepMetadata.build([(it.start, 1, it.block_table, i) for i, it in enumerate(items)], bs, torch.device("cpu"))
    buf = cg.pack(items, 4, cg.width_blocks(4), bs, scratch)
    ids, pos, m = cg.unpack(buf, bs)
    assert ids.tolist() == [[11, 12, 13, 0]] and pos.tolist() == [[6, 13, 1, 0]]
    assert torch.equal(m.slot_mapping[:3], meta.slot_mapping) and m.slot_mapping[3] == scratch * bs
    mask = m.decode_mask[:, 0, 0]
    S = meta.decode_slots.shape[1]
    assert torch.equal(mask[:3, :S], meta.decode_mask[:, 0, 0]) and not mask[:3, S:].any()
    assert torch.equal(m.decode_slots[:3, :S][mask[:3, :S]], meta.decode_slots[meta.decode_mask[:, 0, 0]])
    assert mask[3].sum() == 1 and m.decode_slots[3, 0] == scratch * bs


def _engine(model, tok, graphs: bool, num_blocks: int = 40):
    engine = LLMEngine(model, tok, EngineConfig(num_blocks=num_blocks, block_size=4, max_num_seqs=16,
                                                enable_prefix_caching=False))
    if graphs:  # what ModelRunner does on a GPU: one scratch block past the block manager's, then the graphs
        r = engine.runner
        r.cache = KVCache(model.cache_specs(), (num_blocks + 1) * 4, model.dtype, r.device)
        r.graphs = cg.DecodeGraphs(r, scratch_block=num_blocks, capture=False)
    return engine


def test_static_decode_steps_equal_the_eager_engine(parts):
    """9 prompts of different lengths (batch bucket 16, then smaller ones as they finish; context widths crossing
    block buckets): the static-buffer steps give the eager engine's tokens, padded rows disturb nothing."""
    model, tok = parts
    prompts = [[1 + (7 * i + j) % 50 for j in range(3 + 2 * i)] for i in range(9)]
    params = [SamplingParams(max_tokens=3 + i // 2, temperature=0.0) for i in range(9)]
    want = [o.outputs[0].token_ids for o in _engine(model, tok, False).generate(prompts, params)]
    engine = _engine(model, tok, True)
    got = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
    assert got == want
    g = engine.runner.graphs
    assert g.stats["static"] >= 6 and {b for b, _ in g.graphs} >= {16, 8}
    assert all(w & (w - 1) == 0 for _, w in g.graphs)  # power-of-two context widths


def test_sampled_rows_too(parts):
    model, tok = parts
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10]]
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=3)
    want = [o.outputs[0].token_ids for o in _engine(model, tok, False).generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in _engine(model, tok, True).generate(prompts, params)] == want
