"""bench/copy_benefit.py: the graded copying diagnostic behind passkey retrieval (issue 25)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_documents_repeat_the_same_list_after_the_filler():
    from copy_benefit import documents, vocabulary

    words = vocabulary()
    assert len(words) > 100
    for doc in documents(words, 7, 3, seed=1):
        first, rest = doc.split("\n", 1)
        fill, second = rest.rstrip("\n").rsplit("\n", 1)
        assert first[len("items = "):] == second[len("again = "):] and len(fill.split()) == 7


def test_the_default_model_copies_and_the_bench_writes_what_it_prints(tmp_path, capsys):
    """The embedded V3 default model saves nats on a list it has just seen (it copies): measured here at the shortest
    distance, and the JSON rows agree with the printed ones."""
    from copy_benefit import main

    assert main(["--models", "default", "--docs", "4", "--fillers", "0,25", "--threads", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    printed = capsys.readouterr().out
    assert [r["filler_words"] for r in rows] == [0, 25]
    for r in rows:
        assert r["benefit"] == pytest.approx(r["first_nll"] - r["second_nll"])
        assert f"saved {r['benefit']:+.2f} nats/token" in printed
    assert rows[0]["benefit"] > 1.0 and rows[0]["distance_tokens"] < rows[1]["distance_tokens"]
    assert (tmp_path / "copy_benefit.png").stat().st_size > 0
