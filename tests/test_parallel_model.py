"""TP / EP / TP+EP logits equal one process (fp32, 1e-5) on random HF DeepSeek models: 2 ranks over gloo.

One spawn runs every layout (process start-up dominates on this machine); rank 0 and rank 1 each
save what they computed, and the parent compares against `load_model` in one process. Both the
expanded (prefill) and the absorbed (decode) attention forms are checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dsv3.io.load import load_model
from dsv3.attention import DenseLatentCache
from dsv3.parallel import ParallelConfig, ParallelError

LAYOUTS = [(2, 1), (1, 2), (2, 2)]  # (tp, ep)


def forward_both(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Full-sequence logits (expanded MLA) and a prefill + absorbed single-token decode."""
    with torch.inference_mode():
        full = model(ids).float()
        cache = DenseLatentCache.for_model(model, ids.shape[0], ids.shape[1], impl="absorb")
        model(ids[:, :-1], ctx=cache)
        cache.impl = "absorb"
        last = model(ids[:, -1:], ctx=cache).float()
    return {"full": full, "decode": last}


def _rank_main(rank: int, port: int, dirs: list[str], out: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from dsv3.parallel import dist as pdist
    from dsv3.parallel.load import load_sharded

    torch.set_num_threads(1)
    pdist.init(rank, 2, "cpu", "127.0.0.1", port)
    results = {}
    try:
        for d in dirs:
            ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
            for tp, ep in LAYOUTS:
                model = load_sharded(d, ParallelConfig(tp, ep, rank), "fp32", progress=False)
                res = forward_both(model, ids)
                res["weights"] = torch.tensor(sum(t.nbytes for t in model.state_dict().values()))
                results[(Path(d).name, tp, ep)] = res
    finally:
        pdist.shutdown()
    torch.save(results, Path(out) / f"rank{rank}.pt")


def spawn(dirs: list[Path], out: Path) -> list[dict]:
    from dsv3.parallel.dist import free_port

    mp.spawn(_rank_main, args=(free_port(), [str(d) for d in dirs], str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def single(d: Path) -> tuple[dict, int]:
    """One process: logits and weight bytes."""
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    model = load_model(d, dtype="fp32", progress=False)
    return forward_both(model, ids), sum(t.nbytes for t in model.state_dict().values())


def check_logits(d: Path, ref: dict, results: list[dict], tp: int, ep: int) -> None:
    assert ref["full"].abs().max() > 0.1  # a real signal to compare
    for rank in range(2):
        got = results[rank][(d.name, tp, ep)]
        for key in ("full", "decode"):
            assert got[key].shape == ref[key].shape
            torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=0, msg=f"rank {rank} {key}")


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory) -> Path:
    """V3 router (sigmoid, noaux_tc, groups), q_lora, YaRN, a dense layer."""
    from hf_oracle import build_hf_model

    d = tmp_path_factory.mktemp("hf") / "v3_yarn_groups"
    build_hf_model("v3_yarn_groups").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def v32_dir(tmp_path_factory) -> Path:
    """DeepSeek-V3.2 (DSA): the indexer is replicated on every rank, so every rank keeps the same tokens."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    from test_deepseek_v32 import HF_V32

    torch.manual_seed(0)
    hf = DeepseekV32ForCausalLM(DeepseekV32Config(**{**HF_V32, "vocab_size": 320, "index_topk": 4}))
    with torch.no_grad():
        for _, p in hf.named_parameters():
            p.normal_(0, 0.1 if p.dim() > 1 else 0.5)
    d = tmp_path_factory.mktemp("hf") / "v32_dsa"
    hf.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def reference(v3_dir):
    return single(v3_dir)


@pytest.fixture(scope="module")
def parallel_results(v3_dir, v32_dir, tmp_path_factory):
    return spawn([v3_dir, v32_dir], tmp_path_factory.mktemp("out"))


@pytest.mark.parametrize("tp,ep", LAYOUTS)
def test_logits_match_one_process(v3_dir, reference, parallel_results, tp, ep):
    check_logits(v3_dir, reference[0], parallel_results, tp, ep)


@pytest.mark.parametrize("tp,ep", LAYOUTS)
def test_sparse_attention_logits_match_one_process(v32_dir, parallel_results, tp, ep):
    check_logits(v32_dir, single(v32_dir)[0], parallel_results, tp, ep)


@pytest.mark.parametrize("tp,ep", LAYOUTS)
def test_each_rank_holds_a_share(v3_dir, reference, parallel_results, tp, ep):
    """Sharded loading keeps only this rank's slices: well under the full model per rank."""
    for rank in range(2):
        share = int(parallel_results[rank][(v3_dir.name, tp, ep)]["weights"]) / reference[1]
        assert share < (0.6 if tp > 1 else 0.85), (rank, share)


@pytest.mark.slow
def test_tied_q_proj_model_logits(tmp_path):
    """Moonlight-style: q_proj (no q_lora), tied embeddings (vocab-parallel head shares the embedding shard)."""
    from hf_oracle import build_hf_model

    d = tmp_path / "v3_plain_tied"
    build_hf_model("v3_plain_tied").save_pretrained(d)
    results = spawn([d], tmp_path)
    ref = single(d)[0]
    for tp, ep in LAYOUTS:
        check_logits(d, ref, results, tp, ep)


def test_layout_errors_name_the_culprit():
    with pytest.raises(ParallelError, match="expert-parallel-size"):
        ParallelConfig(tp=2, ep=4)
    with pytest.raises(ParallelError, match="tensor-parallel-size"):
        ParallelConfig(tp=0)
