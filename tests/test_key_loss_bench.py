"""bench/key_loss.py: passkey retrieval graded in nats per key (issue 25)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_spans_cover_each_key_where_it_is_set_and_asked():
    from key_loss import documents, spans

    from dsv3.io.paths import model_path
    from dsv3.io.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_path("default"))
    doc = documents(["x = 1\n" * 400], 1, 3, 600, 1600, seed=0)[0]
    sets, asks = spans(tok, doc)
    ids = tok.encode(doc)
    keys = {tok.decode(ids[a:b]) for a, b in sets}
    assert len(sets) == len(asks) == 3 and len(keys) == 3 and all(k.isdigit() and len(k) == 5 for k in keys)
    assert {tok.decode(ids[a:b]) for a, b in asks} == keys and min(a for a, _ in asks) > max(b for _, b in sets)


def test_the_default_model_saves_nats_on_asked_keys_and_the_json_matches_the_print(tmp_path, capsys):
    """The embedded V3 model copies: a key is cheaper where it is asked for than where it was set."""
    from key_loss import main

    assert main(["--models", "default", "--docs", "3", "--needles", "4", "--threads", "1", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert row["keys"] == 12 and row["saved"] == pytest.approx(row["set_nll"] - row["ask_nll"])
    assert row["saved"] > 1.0
    assert f"saved {row['saved']:+.2f} nats per key" in capsys.readouterr().out
