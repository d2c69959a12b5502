"""The quantization table's helpers: token windows from shards, quality metrics, llama.cpp conversions."""

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from quant_data import BenchDataError, check_tokenizer, shard_windows  # noqa: E402
from quant_metrics import Tally, score  # noqa: E402


def make_shards(d: Path, tokens: dict[str, np.ndarray], tokenizer_sha: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    shards = {}
    for split, t in tokens.items():
        t.astype("<u2").tofile(d / f"{split}-00000.bin")
        shards[split] = [{"file": f"{split}-00000.bin", "tokens": len(t)}]
    (d / "manifest.json").write_text(json.dumps({"dtype": "uint16", "shards": shards, "files": [],
                                                 "tokenizer": {"vocab_size": 1000, "eos_id": 1, "sha256": tokenizer_sha}}))
    return d


def test_shard_windows_spread_evenly_or_cover_the_split(tmp_path):
    held = np.arange(1000) % 997
    d = make_shards(tmp_path / "s", {"train": np.arange(5000) % 997, "heldout": held}, "x")
    w = shard_windows(d, "heldout", 3, 100)
    assert w.shape == (3, 100) and [int(r[0]) for r in w] == [0, 450, 900]  # first, middle, last window
    assert torch.equal(w[1], torch.from_numpy(held[450:550]).long())
    every = shard_windows(d, "heldout", 0, 300)  # all of it, back to back
    assert every.shape == (3, 300) and torch.equal(every.flatten(), torch.from_numpy(held[:900]).long())
    with pytest.raises(BenchDataError, match="fewer than one 2000-token window"):
        shard_windows(d, "heldout", 1, 2000)


def test_shards_of_another_tokenizer_are_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text('{"model": {}}')
    sha = hashlib.sha256(b'{"model": {}}').hexdigest()
    check_tokenizer(make_shards(tmp_path / "ok", {"heldout": np.arange(10)}, sha), model)
    with pytest.raises(BenchDataError, match="another tokenizer"):
        check_tokenizer(make_shards(tmp_path / "bad", {"heldout": np.arange(10)}, "0" * 64), model)


def test_metrics_match_direct_formulas():
    """PPL ratio, KL, top-1 and routing agreement against float64 formulas written out per position."""
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 50, (3, 9), generator=g)
    ref_logits = torch.randn(3, 9, 50, generator=g) * 2
    sys_logits = ref_logits + 0.3 * torch.randn(3, 9, 50, generator=g)
    routes = torch.randint(0, 8, (3, 2, 9, 2), generator=g)
    moved = routes.clone()
    moved[0, 0, :3] = 7 - moved[0, 0, :3]  # 3 of the 54 (token, layer) expert sets differ (7 - e ≠ e for e < 8)

    def system(logits, r):
        def run(w):
            i = next(j for j in range(3) if torch.equal(windows[j], w))
            return logits[i, :-1].log_softmax(-1), r[i]
        return run
    got = score(system(ref_logits, routes), {"q": system(sys_logits, moved)}, windows, progress=False)
    p, q = ref_logits[:, :-1].double().softmax(-1), sys_logits[:, :-1].double().softmax(-1)
    tgt = windows[:, 1:]
    nll_p = -p.log().gather(-1, tgt[..., None]).mean().item()
    nll_q = -q.log().gather(-1, tgt[..., None]).mean().item()
    kl = (p * (p.log() - q.log())).sum(-1).mean().item()
    r = got["q"]
    assert r["ppl"] == pytest.approx(math.exp(nll_q), rel=1e-5) and r["ppl_ratio"] == pytest.approx(math.exp(nll_q - nll_p), rel=1e-5)
    assert r["kl"] == pytest.approx(kl, rel=1e-4)
    assert r["top1"] == pytest.approx((p.argmax(-1) == q.argmax(-1)).double().mean().item())
    assert r["routing"] == pytest.approx(51 / 54)
    per_window = (-(q.log() - p.log()).gather(-1, tgt[..., None])).squeeze(-1).mean(-1)
    assert r["ppl_ratio_se"] == pytest.approx(r["ppl_ratio"] * per_window.std().item() / math.sqrt(3), rel=1e-4)
    assert got["reference"]["kl"] == 0 and got["reference"]["ppl_ratio"] == 1 and got["reference"]["top1"] == 1


def test_tally_refuses_mismatched_shapes():
    t = Tally()
    with pytest.raises(ValueError, match="reference has"):
        t.add((torch.zeros(4, 10), None), (torch.zeros(4, 11), None), torch.zeros(4, dtype=torch.long))


def _llama_ready(cache: Path) -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return any(cache.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py")) or (cache / "llama-cpp-src").exists()


CACHE = Path.home() / ".cache" / "dsv3-bench"


@pytest.mark.slow
@pytest.mark.skipif(not _llama_ready(CACHE), reason="llama-cpp-python or its cached source distribution is missing")
def test_llama_cpp_conversions_score_like_dsv3(tmp_path):
    """A model without num_key_value_heads in config.json converts (the wrapper adds it); llama.cpp's F32 matches
    dsv3 fp32, F16 and Q8_0 GGUFs load (llama.cpp's AMX buffers off) and stay close, Q4_K_M (llama.cpp's quantizer)
    further; mean KL(dsv3 ‖ llama.cpp) bounds grow with the format's coarseness."""
    from dsv3.io.load import load_model
    from dsv3.io.checkpoint import save_model
    from quant_llama import LlamaScorer, linear_ratio, make_gguf
    from tiny_model import make_tiny_model_dir

    d = make_tiny_model_dir(tmp_path / "m", rope_scaling=None, n_group=1, topk_group=1)
    model = load_model(d, dtype="fp32", progress=False)
    with torch.no_grad():  # std-0.2 init amplifies every perturbation through the layers (see test_quant_model)
        for n, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in n and not n.endswith("mlp.gate.weight"):
                p.mul_(0.25)
    save_model(model, d)
    cfg = json.loads((d / "config.json").read_text())
    assert "num_key_value_heads" not in cfg
    ids = torch.randint(3, cfg["vocab_size"], (64,), generator=torch.Generator().manual_seed(0))
    ref = model(ids[None])[0].double().log_softmax(-1)
    kl_bound = {"f32": 1e-8, "f16": 1e-6, "q8_0": 1e-4, "q4_k_m": 5e-3}  # measured 4e-15, 1e-8, 1e-5, 4e-4
    for kind, bound in kl_bound.items():
        gguf = make_gguf(d, kind, CACHE, threads=2, out_dir=tmp_path)
        logp = LlamaScorer(gguf, 64, 2)(ids.tolist()).double().log_softmax(-1)
        assert logp.shape == ref.shape
        kl = (ref.exp() * (ref - logp)).sum(-1).mean().item()
        assert 0 <= kl < bound, (kind, kl)
    assert 0.25 < linear_ratio(make_gguf(d, "q4_k_m", CACHE, out_dir=tmp_path), CACHE) < 0.6
    assert linear_ratio(make_gguf(d, "f16", CACHE, out_dir=tmp_path), CACHE) == pytest.approx(1.0)
