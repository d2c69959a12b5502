"""`dsv3 data build`, the shard reader and the packer, on a tiny corpus of stdlib sources."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader

from dsv3.data import DataError, FIMTokens, PackedDataset, TokenShards, fim_transform
from dsv3.data.builder import build, discover, split_of
from dsv3.data.dedup import MinHasher, jaccard, jaccard_estimate, lsh_params, normalize, shingle_hashes

STDLIB = Path(sysconfig.get_paths()["stdlib"])
NAMES = ["bisect.py", "colorsys.py", "fnmatch.py", "glob.py", "heapq.py", "keyword.py", "shlex.py", "textwrap.py"]
SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>"]
REPO = Path(__file__).resolve().parents[1]


def make_tokenizer(directory: Path, files: list[Path], vocab_size: int = 500) -> Tokenizer:
    """A byte-level BPE (lossless decode) with DeepSeek's special tokens, saved HF-style."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": SPECIAL[0], "eos_token": {"content": SPECIAL[1], "special": True}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def edit_lines(text: str, every: int = 100) -> str:
    lines = text.splitlines(keepends=True)
    for i in range(every, len(lines), every):
        lines[i] = f"    edited_{i} = {i} * 2  # changed\n"
    return "".join(lines)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    (src / "sub").mkdir(parents=True)
    for name in NAMES:
        shutil.copy(STDLIB / name, src / name)
    shutil.copy(STDLIB / "textwrap.py", src / "sub" / "textwrap_copy.py")            # exact duplicate
    (src / "sub" / "shlex_edit.py").write_text(edit_lines((STDLIB / "shlex.py").read_text()))  # near duplicate
    (src / "empty.py").write_text("\n")
    (src / "blob.py").write_bytes(b"\x00\x01binary\xff")
    (src / "notes.txt").write_text("not python\n")
    tok = make_tokenizer(root / "tok", [STDLIB / n for n in NAMES[:4]])
    out = root / "shards"
    manifest = build([str(src)], root / "tok", out, include=["*.py"], heldout_fraction=0.3,
                     shard_tokens=6000, seed=3, progress=False)
    return {"root": root, "src": src, "tok": tok, "out": out, "manifest": manifest}


def test_duplicates_removed_and_counted(corpus):
    m = corpus["manifest"]
    assert m["dedup"]["exact_removed"] == 1 and m["dedup"]["near_removed"] == 1
    assert m["dedup"]["skipped"] == {"binary_or_not_utf8": 1, "empty": 1}
    pairs = {r["reason"]: {r["path"], r["duplicate_of"]} for r in m["removed"]}
    assert pairs["exact"] == {"src/textwrap.py", "src/sub/textwrap_copy.py"}
    assert pairs["near"] == {"src/shlex.py", "src/sub/shlex_edit.py"}
    near = next(r for r in m["removed"] if r["reason"] == "near")
    texts = [(corpus["src"] / p.removeprefix("src/")).read_text() for p in pairs["near"]]
    assert 0.85 <= near["similarity"] == pytest.approx(jaccard(*(shingle_hashes(normalize(t)) for t in texts)), abs=1e-4)
    kept = {f["path"] for f in m["files"]}
    assert len(kept) == len(NAMES) and "src/notes.txt" not in kept
    assert json.loads((corpus["out"] / "manifest.json").read_text()) == m


def test_minhash_tracks_exact_jaccard():
    def exact(a: str, b: str, k: int = 16) -> float:
        sa, sb = (normalize(t) for t in (a, b))
        sa, sb = ({s[i:i + k] for i in range(len(s) - k + 1)} for s in (sa, sb))
        return len(sa & sb) / len(sa | sb)

    hasher = MinHasher(seed=0)
    texts = [(STDLIB / n).read_text() for n in ("shlex.py", "glob.py")]
    edited = edit_lines(texts[0], every=25)
    sig = lambda t: hasher.signature(shingle_hashes(normalize(t)))  # noqa: E731
    for a, b in [(texts[0], edited), (texts[0], texts[1]), (texts[1], texts[1])]:
        truth = exact(a, b)
        assert abs(jaccard_estimate(sig(a), sig(b)) - truth) < 0.12
        assert jaccard(shingle_hashes(normalize(a)), shingle_hashes(normalize(b))) == pytest.approx(truth, abs=1e-9)
    assert jaccard_estimate(sig(texts[0]), sig(texts[0] + "\n\n   ")) == 1.0


def test_lsh_bands_put_the_threshold_on_the_s_curve():
    bands, rows = lsh_params(0.85, 128)
    assert bands * rows <= 128
    p = lambda s: 1 - (1 - s**rows) ** bands  # noqa: E731 - probability of becoming a candidate
    assert p(0.95) > 0.95 and p(0.5) < 0.05 and 0.2 < p(0.85) < 0.9


def test_shards_decode_to_original_files(corpus):
    m, out, tok = corpus["manifest"], corpus["out"], corpus["tok"]
    eos, bos = tok.token_to_id(SPECIAL[1]), tok.token_to_id(SPECIAL[0])
    assert m["dtype"] == "uint16" and m["tokenizer"]["eos_id"] == eos and m["tokenizer"]["bos_id"] == bos
    assert len(m["shards"]["train"]) >= 2  # shard_tokens forced a split
    for split, shards in m["shards"].items():
        for s in shards:
            assert (out / s["file"]).stat().st_size == 2 * s["tokens"]
        assert sum(s["tokens"] for s in shards) == sum(f["tokens"] for f in m["files"] if f["split"] == split)
    for f in m["files"]:
        original = (corpus["src"] / f["path"].removeprefix("src/")).read_bytes()
        assert hashlib.sha256(original).hexdigest() == f["sha256"]
        raw = np.fromfile(out / m["shards"][f["split"]][f["shard"]]["file"], dtype="<u2")
        ids = raw[f["offset"]:f["offset"] + f["tokens"]].tolist()
        assert ids[0] == bos and bos not in ids[1:] and ids[-1] == eos and eos not in ids[:-1]
        assert tok.decode(ids[1:-1], skip_special_tokens=False) == original.decode()


def test_heldout_split_by_file_and_stable(corpus, tmp_path):
    m = corpus["manifest"]
    for f in m["files"]:
        h = int.from_bytes(hashlib.sha256(f"3:{f['path']}".encode()).digest()[:8], "big") / 2**64
        assert f["split"] == ("heldout" if h < 0.3 else "train") == split_of(f["path"], 0.3, 3)
    assert {f["split"] for f in m["files"]} == {"train", "heldout"}
    src = tmp_path / "src"
    shutil.copytree(corpus["src"], src)
    for name in ("calendar.py", "base64.py", "string.py"):
        shutil.copy(STDLIB / name, src / name)
    grown = build([str(src)], corpus["root"] / "tok", tmp_path / "out", include=["*.py"],
                  heldout_fraction=0.3, shard_tokens=6000, seed=3, progress=False)
    before = {f["path"]: (f["split"], f["tokens"], f["sha256"]) for f in m["files"]}
    after = {f["path"]: (f["split"], f["tokens"], f["sha256"]) for f in grown["files"]}
    assert len(after) == len(before) + 3 and all(after[p] == v for p, v in before.items())


def test_glob_input_matches_directory_input(corpus):
    by_dir = discover([str(corpus["src"])], ["*.py"])
    by_glob = discover([str(corpus["src"] / "**" / "*.py")])
    assert [r for r, _ in by_glob] == [r for r, _ in by_dir] and len(by_dir) == len(NAMES) + 4


def test_uint32_for_large_vocab(tmp_path):
    words = ["alpha", "beta", "gamma", "delta"]
    vocab = {"[UNK]": 0, "</s>": 1, **{f"filler{i}": i for i in range(2, 69990)}}
    vocab.update({w: 69990 + i for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("alpha beta gamma delta alpha\n")
    (tmp_path / "in" / "b.txt").write_text("delta gamma zeta\n")
    m = build([str(tmp_path / "in")], tmp_path / "tok", tmp_path / "out", heldout_fraction=0.0, progress=False)
    assert m["dtype"] == "uint32" and m["tokenizer"]["vocab_size"] == 69994
    raw = np.fromfile(tmp_path / "out" / "train-00000.bin", dtype="<u4").tolist()
    expected = [69990, 69991, 69992, 69993, 69990, 1, 69993, 69992, 0, 1]
    assert raw == expected and TokenShards(tmp_path / "out").window(0, 10).tolist() == expected


def test_token_shards_reader(corpus):
    m, out = corpus["manifest"], corpus["out"]
    shards = TokenShards(out, "train")
    raw = np.concatenate([np.fromfile(out / s["file"], dtype="<u2") for s in m["shards"]["train"]]).astype(np.int64)
    assert len(shards) == len(raw) == m["totals"]["train"]["tokens"]
    edge = m["shards"]["train"][0]["tokens"]
    assert np.array_equal(shards.window(edge - 50, 100), raw[edge - 50:edge + 50])  # across a shard boundary
    train_files = [f for f in m["files"] if f["split"] == "train"]
    assert shards.num_docs == len(train_files)
    for i, f in enumerate(train_files):
        doc = shards.document(i)
        assert len(doc) == f["tokens"] and doc[-1] == shards.eos_id
    start, win = shards.random_window(64, np.random.default_rng(5))
    assert np.array_equal(win, raw[start:start + 64]) and start == shards.random_window(64, np.random.default_rng(5))[0]
    assert len(TokenShards(out, "heldout")) == m["totals"]["heldout"]["tokens"]
    with pytest.raises(DataError, match="does not exist"):
        TokenShards(out / "nope")


def _docs(tokens: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    cuts = np.flatnonzero(tokens == eos) + 1
    return [tuple(d) for d in np.split(tokens, cuts)[:-1]]


def test_packing_windows_positions_and_doc_ids(corpus):
    shards = TokenShards(corpus["out"], "train")
    eos, L = shards.eos_id, 128
    stream = np.tile(shards.window(0, len(shards)), 3)  # oracle: epochs in file order, back to back
    ds = PackedDataset(shards, L, shuffle=False)
    for i in (0, 1, 7, len(shards) // L, len(shards) // L + 3):
        x, y, pos, doc = ds.sample(i)
        w = stream[i * L:i * L + L + 1]
        assert np.array_equal(x, w[:-1]) and np.array_equal(y[x != eos], w[1:][x != eos]) and (y[x == eos] == -100).all()
    hit, shuffled = 0, PackedDataset(shards, L, seed=1)
    for i in range(shuffled.windows_per_epoch()):
        x, _, pos, doc = shuffled.sample(i)
        starts = np.r_[True, x[:-1] == eos]
        assert np.array_equal(pos == 0, starts) and np.array_equal(np.diff(doc) == 1, starts[1:])
        assert (np.diff(doc) >= 0).all() and (np.diff(pos)[~starts[1:]] == 1).all()
        hit += starts[1:].any()
    assert hit > 0


def test_epoch_covers_every_document_once_and_seed_shuffles(corpus):
    shards = TokenShards(corpus["out"], "train")
    originals = sorted(tuple(shards.document(i)) for i in range(shards.num_docs))
    orders = []
    for seed in (0, 1):
        ds = PackedDataset(shards, 64, seed=seed)
        epoch = _docs(ds.stream(0, len(shards)), shards.eos_id)
        assert sorted(epoch) == originals
        orders.append(epoch)
    assert orders[0] != orders[1]


def test_samples_read_every_window_once_in_a_seeded_order(corpus):
    shards = TokenShards(corpus["out"], "train")
    ds = PackedDataset(shards, 32, seed=3)
    n = ds.windows_per_epoch()
    first, second = ([ds.window_index(i) for i in range(b * n, (b + 1) * n)] for b in (0, 1))
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n, 2 * n))
    assert first != sorted(first) and [w - n for w in second] != first  # shuffled, differently per block
    x, *_ = ds.sample(5)
    assert np.array_equal(x, ds.stream(ds.window_index(5) * 32, 33)[:-1])
    assert [PackedDataset(shards, 32, shuffle=False).window_index(i) for i in range(4)] == [0, 1, 2, 3]


def test_resume_is_exact(corpus):
    shards = TokenShards(corpus["out"], "train")
    fim = FIMTokens.from_tokenizer(corpus["tok"])
    assert fim == tuple(corpus["tok"].token_to_id(SPECIAL[i]) for i in (4, 3, 5))
    kw = dict(seq_len=96, batch_size=6, seed=11, fim_rate=0.5, fim_tokens=fim)
    full = PackedDataset(shards, **kw)
    it = iter(full)
    reference = [next(it) for _ in range(80)]  # > 1 epoch, so it crosses an epoch boundary
    assert full.state_dict()["step"] == 80 and 96 * 6 * 80 > full.epoch_tokens(0)
    assert any(torch.isin(b.input_ids, torch.tensor(fim)).any() for b in reference[37:])
    resumed = PackedDataset(shards, **kw)
    resumed.load_state_dict({**full.state_dict(), "step": 37})
    for a, b in zip(reference[37:], iter(resumed)):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    workers = DataLoader(PackedDataset(shards, start_step=2, **kw), batch_size=None, num_workers=2)
    for a, b in zip(reference[2:6], workers):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    r0, r1 = (PackedDataset(shards, rank=r, world_size=2, **kw).batch(4) for r in (0, 1))
    assert torch.equal(r1.input_ids[0], torch.from_numpy(full.sample((4 * 2 + 1) * 6)[0]))
    assert not torch.equal(r0.input_ids, r1.input_ids)
    with pytest.raises(DataError, match="seq_len"):
        PackedDataset(shards, **{**kw, "seq_len": 64}).load_state_dict(full.state_dict())


def test_fim_transform_psm():
    fim = FIMTokens(1001, 1002, 1003)
    doc = np.arange(10, 60)
    for seed in range(20):
        out = fim_transform(doc, np.random.default_rng(seed), fim)
        b, h, e = (int(np.flatnonzero(out == t)[0]) for t in fim)
        assert b == 0 and b < h < e and len(out) == len(doc) + 3
        assert sorted(out.tolist()) == sorted(doc.tolist() + list(fim))
        prefix, suffix, middle = out[1:h], out[h + 1:e], out[e + 1:]
        assert np.array_equal(np.concatenate([prefix, middle, suffix]), doc)


def test_packed_fim_documents(corpus):
    shards, tok = TokenShards(corpus["out"], "train"), corpus["tok"]
    fim = FIMTokens(tok.token_to_id(SPECIAL[4]), tok.token_to_id(SPECIAL[3]), tok.token_to_id(SPECIAL[5]))
    originals = sorted(tuple(shards.document(i)) for i in range(shards.num_docs))
    for rate in (1.0, 0.5):
        ds = PackedDataset(shards, 64, seed=2, fim_rate=rate, fim_tokens=fim)
        docs = _docs(ds.stream(0, ds.epoch_tokens(0)), shards.eos_id)
        assert len(docs) == shards.num_docs
        restored, n_fim = [], 0
        for d in docs:
            d = np.array(d)
            assert d[0] == shards.bos_id  # BOS stays in front of the FIM sentinels
            if d[1] != fim.begin:
                restored.append(tuple(d))
                continue
            n_fim += 1
            h, e = int(np.flatnonzero(d == fim.hole)[0]), int(np.flatnonzero(d == fim.end)[0])
            assert 1 < h < e
            restored.append(tuple(np.concatenate([d[:1], d[2:h], d[e + 1:-1], d[h + 1:e], d[-1:]])))
        assert sorted(restored) == originals
        assert n_fim == shards.num_docs if rate == 1.0 else 0 < n_fim <= shards.num_docs


# The real `dsv3.cli.main` (parser, dispatch, one-line errors) with only this command registered,
# so the test does not depend on every other sub-command importing cleanly.
_MAIN = "import dsv3.cli as c; c.COMMAND_MODULES = ('dsv3.commands.data',); raise SystemExit(c.main())"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-c", _MAIN, "data", "build", *args], capture_output=True, text=True, env=env)


def test_cli_registers_data_command():
    from dsv3 import cli

    assert "dsv3.commands.data" in cli.COMMAND_MODULES


def test_cli_builds_and_rejects_bad_input(corpus, tmp_path):
    ok = _cli("--inputs", str(corpus["src"]), "--include", "*.py", "--tokenizer", str(corpus["root"] / "tok"),
              "-o", str(tmp_path / "out"), "--heldout-fraction", "0.3", "--seed", "3", "--shard-tokens", "6000", "-q")
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["files"] == corpus["manifest"]["files"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.py").write_text("  \n")
    for args, culprit in [(["--inputs", str(tmp_path / "empty")], "no files matched"),
                          (["--inputs", str(tmp_path / "blank")], "has text"),
                          (["--inputs", str(corpus["src"]), "--include", "*.rs"], "no files matched"),
                          (["--inputs", str(tmp_path / "missing")], "does not exist")]:
        r = _cli(*args, "--tokenizer", str(corpus["root"] / "tok"), "-o", str(tmp_path / "o2"), "-q")
        assert r.returncode == 2 and culprit in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = _cli("--inputs", str(corpus["src"]), "--tokenizer", str(tmp_path / "no_tok"), "-o", str(tmp_path / "o3"))
    assert r.returncode == 2 and "tokenizer.json" in r.stderr and r.stderr.count("\n") == 1, r.stderr
