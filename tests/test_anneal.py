"""Continued pretraining pieces: context-level FIM, batches mixed from several shard sets, `init_from`,
and `dsv3 data functions` (the annealing stage of the embedded default model)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from dsv3.data import DataError, DataMix, FIMTokens, PackedDataset, TokenShards, cut_lines, fim_context, fim_lines_context
from dsv3.io.tokenizer import Tokenizer
from dsv3.train.config import PretrainConfig, PretrainConfigError
from test_data import SPECIAL, corpus  # noqa: F401  (pytest fixture)
from test_pretrain import shards  # noqa: F401  (pytest fixture)
from test_pretrain_run import run_config

FIM = FIMTokens(1001, 1002, 1003)
BOS, EOS = 7, 9


def _undo(piece: np.ndarray) -> np.ndarray:
    """A PSM piece back in document order (BOS/EOS around it kept)."""
    b, h, e = (int(np.flatnonzero(piece == t)[0]) for t in FIM)
    return np.concatenate([piece[:b], piece[b + 1:h], piece[e + 1:], piece[h + 1:e]])


def test_fim_context_transforms_each_piece_in_place():
    window = np.array([20, 21, 22, EOS, BOS, 30, 31, 32, 33, EOS, BOS, *range(40, 60)])
    out = fim_context(window, np.random.default_rng(0), 1.0, FIM, EOS, BOS)
    assert len(out) == len(window) and out.dtype == np.int64
    assert (out == FIM.begin).sum() == 3  # every piece of >= 2 tokens, the cut first and last ones too
    ends = np.flatnonzero(out == EOS)
    assert len(ends) == 2 and out[ends[0] + 1] == BOS and out[ends[1] + 1] == BOS  # boundaries stay
    first, second = out[:ends[0]], out[ends[0] + 1:ends[1] + 1]
    assert np.array_equal(_undo(first), window[:3])
    assert second[0] == BOS and second[1] == FIM.begin and second[-1] == EOS
    assert np.array_equal(np.concatenate([second[:1], _undo(second[1:-1]), second[-1:]]), window[4:10])
    assert out[ends[1] + 2] == FIM.begin  # the last piece, cut back to the window's length
    kept = fim_context(window, np.random.default_rng(0), 0.0, FIM, EOS, BOS)
    assert np.array_equal(kept, window)
    again = fim_context(window, np.random.default_rng(0), 1.0, FIM, EOS, BOS)
    assert np.array_equal(again, out)


def test_context_fim_windows_are_deterministic_and_complete(corpus):
    shards, tok = TokenShards(corpus["out"], "train"), corpus["tok"]
    fim = FIMTokens.from_tokenizer(tok)
    plain = PackedDataset(shards, 64, 4, seed=5)
    ds = PackedDataset(shards, 64, 4, seed=5, fim_rate=1.0, fim_tokens=fim, fim_level="context")
    assert ds.epoch_tokens(0) == plain.epoch_tokens(0)  # the stream itself is untouched
    for i in range(12):
        x, y = plain.sample(i), ds.sample(i)
        assert np.array_equal(y[0], ds.sample(i)[0])
        assert len(y[0]) == 64 and (y[0] == fim.begin).sum() >= 1
        sentinels = np.isin(y[0], list(fim))
        got, orig = np.sort(y[0][~sentinels]), np.sort(np.concatenate([x[0], [x[1][-1]]]))
        assert set(got.tolist()) <= set(orig.tolist())  # only tokens of the window, rearranged
    with pytest.raises(DataError, match="fim_level"):
        PackedDataset(shards, 64, fim_rate=0.5, fim_tokens=fim, fim_level="file")


def test_data_mix_rows_and_resume(corpus):
    shards = TokenShards(corpus["out"], "train")
    a, b = PackedDataset(shards, 32, 3, seed=1), PackedDataset(shards, 32, 1, seed=2)
    mix = DataMix([a, b])
    batch = mix.batch(5)
    assert batch.input_ids.shape == (4, 32)
    assert torch.equal(batch.input_ids[:3], a.batch(5).input_ids) and torch.equal(batch.input_ids[3:], b.batch(5).input_ids)
    mix.step = 9
    other = DataMix([PackedDataset(shards, 32, 3, seed=1), PackedDataset(shards, 32, 1, seed=2)])
    other.load_state_dict(mix.state_dict())
    assert other.step == 9 and all(s.step == 9 for s in other.sources)
    with pytest.raises(DataError, match="2 sources, this run's has 1"):
        DataMix([PackedDataset(shards, 32, 3, seed=1)]).load_state_dict(mix.state_dict())


@pytest.mark.parametrize("raw, culprit", [
    ({"mix": [["x", 1.5]]}, "0 < share < 1"),
    ({"mix": [["x", 0.5], ["y", 0.5]]}, "needs at least one"),
    ({"mix": [["x", 0.01]]}, "rounds to no rows"),
    ({"mix": ["x"]}, "must be"),
    ({"fim_level": "file"}, "fim_level"),
    ({"model": {}}, "init_from"),
])
def test_config_rejects_bad_mix_and_fim_level(raw, culprit):
    with pytest.raises(PretrainConfigError, match=culprit):
        PretrainConfig.from_dict({"model": {"hidden_size": 8}, "data": "d", "batch_size": 8, **raw})


def test_init_from_continues_a_run_and_mixes_data(shards, tmp_path):
    from dsv3.io.load import load_model
    from dsv3.errors import CheckpointError
    from dsv3.train.pretrain import pretrain

    first = pretrain(run_config(shards, tmp_path / "base", max_steps=2, save_dtype="float32"))
    data = str(shards / "shards")
    # lr 0 and no bias moves: the annealed model must be the init model, tensor for tensor
    frozen = pretrain(run_config(shards, tmp_path / "frozen", model={}, init_from=first["final"], lr=0.0, bias_update_rate=0.0,
                                 max_steps=2, mix=[[data, 0.5]], fim_level="context", save_dtype="float32"))
    a, b = load_model(first["final"], progress=False).state_dict(), load_model(frozen["final"], progress=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("mtp" in k for k in a) and any("e_score_correction_bias" in k and a[k].abs().sum() > 0 for k in a)
    rows = [json.loads(line) for line in (tmp_path / "base/metrics.jsonl").read_text().splitlines()]
    anneal_rows = [json.loads(line) for line in (tmp_path / "frozen/metrics.jsonl").read_text().splitlines()]
    assert anneal_rows[0]["loss"] < rows[0]["loss"]  # starts where the first run got to, not from scratch
    # a resumed mixed run equals a straight one
    straight = pretrain(run_config(shards, tmp_path / "s", model={}, init_from=first["final"], mix=[[data, 0.5]], max_steps=3))
    pretrain(run_config(shards, tmp_path / "r", model={}, init_from=first["final"], mix=[[data, 0.5]], max_steps=3, stop_after=1))
    resumed = pretrain(run_config(shards, tmp_path / "r", model={}, init_from=first["final"], mix=[[data, 0.5]], max_steps=3))
    assert resumed["start_step"] == 1 and resumed["loss"] == straight["loss"]
    other = tmp_path / "other-shards"  # the same tokens, but recorded as another tokenizer's
    shutil.copytree(shards / "shards", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="another tokenizer"):
        pretrain(run_config(shards, tmp_path / "mixbad", mix=[[str(other), 0.5]], max_steps=1))
    with pytest.raises(CheckpointError, match="shape"):
        pretrain(run_config(shards, tmp_path / "bad", model={"moe_intermediate_size": 24}, init_from=first["final"], max_steps=1))


def test_cli_data_functions(corpus, tmp_path):
    main = "import dsv3.cli as c; c.COMMAND_MODULES = ('dsv3.commands.data',); raise SystemExit(c.main())"
    run = lambda *a: subprocess.run([sys.executable, "-c", main, "data", *a], capture_output=True, text=True)  # noqa: E731
    out = tmp_path / "fns"
    r = run("functions", "--shards", str(corpus["out"]), "--inputs", str(corpus["src"]), "-o", str(out), "-q")
    assert r.returncode == 0, r.stderr
    files = sorted(out.glob("*.py"))
    assert files and str(len(files)) in r.stdout
    import ast
    for f in files:
        tree = ast.parse(f.read_text())
        fn = tree.body[0]
        assert len(tree.body) == 1 and ast.get_docstring(fn) and len(f.read_text()) <= 800 and fn.col_offset == 0
    r = run("functions", "--shards", str(corpus["out"]), "--inputs", str(corpus["src"]), "-o", str(tmp_path / "x"), "--max-chars", "0")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "--max-chars" in r.stderr


@pytest.mark.parametrize("name", ["pretrain-tiny.yaml", "anneal-tiny.yaml"])
def test_shipped_recipe_configs_are_valid(name):
    from pathlib import Path

    cfg = PretrainConfig.load(Path(__file__).parent.parent / "configs" / name)
    assert cfg.max_steps > 0 and (cfg.model or cfg.init_from)
    if cfg.init_from:  # the annealing stage starts from the first stage's output and mixes functions in
        assert cfg.init_from.endswith("final") and cfg.mix_rows() == [("build/functions", 6)] and cfg.fim_level == "context"


def test_context_extension_continues_at_a_longer_length_with_yarn(shards, tmp_path):
    """The DeepSeek recipe (4K → 32K → 128K) at toy scale: continue from a run at 32 tokens to 128 tokens with
    YaRN (factor 4 over the original 32 positions); the extended model records its YaRN and trained length."""
    from dsv3.config import ModelConfig
    from dsv3.io.load import load_model
    from dsv3.train.pretrain import pretrain

    from test_pretrain import MODEL

    base = pretrain(run_config(shards, tmp_path / "base", max_steps=2,
                               model={**MODEL, "max_position_embeddings": 32, "rope_scaling": None}))
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 1.0}
    with pytest.raises(PretrainConfigError, match="max_position_embeddings"):  # a longer window needs the longer length
        pretrain(run_config(shards, tmp_path / "x", model={}, init_from=base["final"], seq_len=128, max_steps=1))
    ext = pretrain(run_config(shards, tmp_path / "ext", model={"rope_scaling": yarn, "max_position_embeddings": 128},
                              init_from=base["final"], seq_len=128, batch_size=1, max_steps=2))
    cfg = ModelConfig.from_dir(ext["final"])
    assert cfg.rope_scaling.factor == 4.0 and cfg.rope_scaling.original_max_position_embeddings == 32
    assert cfg.max_position_embeddings == 128 and cfg.extra["training_seq_len"] == 128
    rows = [json.loads(line) for line in (tmp_path / "ext/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["tokens"] == 2 * 128 * 2  # steps × seq_len × (batch 1 × grad_accum 2)
    model = load_model(ext["final"], progress=False)
    ids = torch.randint(3, cfg.vocab_size, (1, 128))
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()


def test_cut_lines_cuts_like_an_editor():
    text = "import os\n\ndef f(x):\n    y = x + 1\n    return y\n"
    rng = np.random.default_rng(0)
    whole = inner = 0
    for _ in range(200):
        pre, mid, suf = cut_lines(text, rng)
        assert pre + mid + suf == text and mid and not mid.startswith("\n") and not mid.endswith("\n")
        if (pre == "" or pre.endswith("\n")) and (suf == "" or suf.startswith("\n")):
            whole += 1  # whole lines: the prefix ends with the newline before them, the suffix starts with the one after
        else:
            assert "\n" not in mid and suf.startswith("\n") and not pre.endswith("\n")  # the rest of a line
            inner += 1
    assert whole > 140 and 10 < inner < 60
    assert cut_lines("\n  \n", rng) is None


def test_line_fim_tokenizes_prefix_suffix_middle_apart(corpus):
    """Each FIM piece is `begin enc(prefix) hole enc(suffix) end enc(middle)` with the three parts encoded
    separately, the layout of an infill request (a cut between tokens of the whole file would differ)."""
    tok = corpus["tok"]
    fim, text = FIMTokens.from_tokenizer(tok), Tokenizer.from_dir(corpus["root"] / "tok")
    docs = ["import os\n\n\ndef f(x):\n    y = x + 1\n    z = y * 2\n    return os.path.join(str(y), str(z))\n",
            "class A:\n    def get(self):\n        return self.x\n\n    def set(self, x):\n        self.x = x\n",
            "import os\nfor name in os.listdir('.'):\n    if name.endswith('.py'):\n        print(name, os.sep)\n"]
    window = np.concatenate([[BOS, *text.encode(d, add_special_tokens=False), EOS] for d in docs]).astype(np.int64)
    done = 0
    for seed in range(20):
        out = fim_lines_context(window, np.random.default_rng(seed), 1.0, fim, EOS, BOS, text)
        assert len(out) == len(window) and out.dtype == np.int64
        assert np.array_equal(out, fim_lines_context(window, np.random.default_rng(seed), 1.0, fim, EOS, BOS, text))
        pieces = np.split(out, np.flatnonzero(out == EOS) + 1)
        pieces = [p for p in pieces if len(p) and p[0] == BOS]  # EOS padding of a piece re-tokenized shorter
        assert len(pieces) == len(docs)
        for doc, piece in zip(docs, pieces):
            if piece[1] != fim.begin:  # the cut's middle took more than half the room: the piece stays as it was
                assert text.decode(piece[1:-1].tolist(), skip_special_tokens=False) == doc
                continue
            assert piece[-1] == EOS  # every middle closed by EOS
            done += 1
            h, e = int(np.flatnonzero(piece == fim.hole)[0]), int(np.flatnonzero(piece == fim.end)[0])
            pre, suf, mid = piece[2:h], piece[h + 1:e], piece[e + 1:-1]
            parts = [text.decode(p.tolist(), skip_special_tokens=False) for p in (pre, mid, suf)]
            at = doc.find(parts[0] + parts[1])  # room for the sentinels: the suffix's far end, then the prefix's start
            assert at >= 0 and doc[at + len(parts[0] + parts[1]):].startswith(parts[2]) and parts[1]
            assert at == 0 or parts[2] in ("", "\n")
            assert 1 <= len(doc) - len("".join(parts)) <= 16
            for p, ids in zip(parts, (pre, mid, suf)):
                assert text.encode(p, add_special_tokens=False) == ids.tolist()  # tokenized apart
    assert done >= 40
    assert np.array_equal(fim_lines_context(window, np.random.default_rng(0), 0.0, fim, EOS, BOS, text), window)


def test_line_fim_windows(corpus):
    shards, tok = TokenShards(corpus["out"], "train"), corpus["tok"]
    fim = FIMTokens.from_tokenizer(tok)
    ds = PackedDataset(shards, 128, 2, seed=3, fim_rate=1.0, fim_tokens=fim, fim_level="line",
                       tokenizer=Tokenizer.from_dir(corpus["root"] / "tok"))
    for i in range(6):
        y = ds.sample(i)[0]
        assert len(y) == 128 and np.array_equal(y, ds.sample(i)[0]) and (y == fim.begin).sum() >= 1
    with pytest.raises(DataError, match="needs the tokenizer"):
        PackedDataset(shards, 64, fim_rate=0.5, fim_tokens=fim, fim_level="line")
