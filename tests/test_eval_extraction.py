"""`dsv3 eval extraction`: the field-level scorer against hand-computed figures, and the task end to end,
in-process and over HTTP against a dsv3 test server (greedy decoding under the same grammar: same answers)."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from dsv3 import cli
from dsv3.eval import extraction
from dsv3.eval.data import DataError
from dsv3.eval.extraction import EXAMPLE_DATA, flatten, score
from serve_harness import model_dir, serve  # noqa: F401 (fixture)

# A schema whose every answer fits the token budget (bounded strings, integers and lists), so even a
# random tiny model's answers always parse and in-process and HTTP answers can be compared exactly.
BOUNDED = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "year": {"type": "integer", "minimum": 2000, "maximum": 2030},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2}},
    "required": ["name", "year", "tags"], "additionalProperties": False}


def test_flatten_pairs():
    got = flatten({"a": " Foo  Bar", "b": None, "c": "", "d": [], "n": {"x": 2, "y": [3, "3", True]},
                   "rows": [{"k": "v"}, {"k": "w"}], "m": "1,250.5"})
    assert got == {("a", "s:foo bar"): 1, ("n.x", "n:2.0"): 1, ("n.y[]", "n:3.0"): 2, ("n.y[]", "s:true"): 1,
                   ("rows.0.k", "s:v"): 1, ("rows.1.k", "s:w"): 1, ("m", "n:1250.5"): 1}


def test_scorer_matches_hand_computed_precision_recall_f1():
    gold1 = {"company": "Acme Corp", "fiscal_year": 2023, "revenue_musd": 12.5, "net_income_musd": None,
             "ceo": "Jane Doe", "segments": ["A", "B"]}  # 6 gold pairs: the null field is not one
    pred1 = ('{"company": "ACME  corp", "fiscal_year": "2023", "revenue_musd": 12.50, "net_income_musd": 3.0, '
             '"ceo": "John", "segments": ["b", "C"]}')  # 7 pairs; right: company, year, revenue, segment b
    gold2 = {"a": 1, "b": [{"x": 1}, {"x": 2}]}  # 3 gold pairs
    pred2 = "not json"
    gold3 = {"k": "v", "z": [1, 2]}
    pred3 = '{"z": [2, 1], "k": "V"}'  # exact up to order and case
    metrics, groups, rows = score([pred1, pred2, pred3], [gold1, gold2, gold3])
    tp, n_pred, n_gold = 4 + 0 + 3, 7 + 0 + 3, 6 + 3 + 3
    p, r = Fraction(tp, n_pred), Fraction(tp, n_gold)
    assert metrics["precision"].value == pytest.approx(float(p))
    assert metrics["recall"].value == pytest.approx(float(r))
    assert metrics["f1"].value == pytest.approx(float(2 * p * r / (p + r)))
    doc1 = 2 * Fraction(4, 7) * Fraction(4, 6) / (Fraction(4, 7) + Fraction(4, 6))
    assert metrics["doc_f1"].value == pytest.approx(float((doc1 + 0 + 1) / 3))
    assert metrics["exact_match"].value == pytest.approx(1 / 3) and metrics["valid_json"].value == pytest.approx(2 / 3)
    assert [r_["tp"] for r_ in rows] == [4, 0, 3] and rows[0]["missed"] == ["ceo", "segments[]"]
    assert rows[0]["wrong"] == ["ceo", "net_income_musd", "segments[]"] and not rows[1]["valid_json"]
    assert groups["field/company"]["f1"].value == 1.0 and groups["field/ceo"]["recall"].value == 0.0
    assert groups["field/segments[]"]["precision"].value == pytest.approx(0.5)
    assert score(["{}"], [{"a": None}])[0]["f1"].value == 1.0  # nothing to extract, nothing extracted


def _validate(obj: dict, schema: dict) -> None:
    """The subset of JSON Schema the shipped set uses: types, required, no additional properties."""
    kinds = {"string": str, "integer": int, "number": (int, float), "null": type(None), "array": list}
    assert set(obj) == set(schema["properties"]) == set(schema["required"])
    for key, spec in schema["properties"].items():
        allowed = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
        assert any(isinstance(obj[key], kinds[k]) and not isinstance(obj[key], bool) for k in allowed), (key, obj[key])
        if spec["type"] == "array":
            assert all(isinstance(v, str) for v in obj[key])


def test_shipped_examples_are_consistent():
    records = extraction.load(EXAMPLE_DATA)
    assert len(records) == 10 and len({r["id"] for r in records}) == 10
    for r in records:
        _validate(r["gold"], r["schema"])
        for key, value in r["gold"].items():  # every gold value is written in its document (it is extractable)
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, str):
                    assert v in r["document"], (r["id"], v)
                elif isinstance(v, float):
                    assert f"{abs(v):,.1f}" in r["document"], (r["id"], v)


def test_data_errors_name_the_line(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text(json.dumps({"document": "d", "gold": {"a": 1}}) + "\n")
    with pytest.raises(DataError, match=r"x.jsonl:1: no JSON 'schema'"):
        extraction.load(bad)
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(BOUNDED))
    assert extraction.load(bad, schema)[0]["schema"] == BOUNDED
    bad.write_text(json.dumps({"document": "d", "gold": [1]}) + "\n")
    with pytest.raises(DataError, match=r"x.jsonl:1: 'gold' must be a JSON object"):
        extraction.load(bad, schema)


@pytest.fixture(scope="module")
def bounded_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("ex") / "bounded.jsonl"
    docs = [("Acme was founded in 2011; it sells tools.", {"name": "Acme", "year": 2011, "tags": ["tools"]}),
            ("Brix, est. 2020, makes bricks and tiles.", {"name": "Brix", "year": 2020, "tags": ["bricks", "tiles"]}),
            ("Cato (2005) runs ferries.", {"name": "Cato", "year": 2005, "tags": ["ferry"]})]
    path.write_text("".join(json.dumps({"id": str(i), "document": d, "schema": BOUNDED, "gold": g}) + "\n"
                            for i, (d, g) in enumerate(docs)))
    return path


def test_in_process_and_http_give_the_same_answers(model_dir, bounded_data, tmp_path, capsys):
    from dsv3.eval.http_backend import OpenAIBackend

    out = tmp_path / "res" / "local.json"
    rc = cli.main(["eval", "extraction", "--model", str(model_dir), "--data", str(bounded_data), "--max-tokens", "96",
                   "--dtype", "fp32", "-o", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "extraction" in printed and "f1 *" in printed and "field/year" in printed
    local = json.loads(out.read_text())
    assert local["task"] == "extraction" and local["primary"] == "f1"
    assert set(local["metrics"]) == {"f1", "precision", "recall", "doc_f1", "exact_match", "valid_json"}
    assert local["metrics"]["valid_json"]["value"] == 1.0  # decoded under the grammar, within budget: always parses
    for s in local["samples"]:
        answer = json.loads(s["answer"])
        assert set(answer) == {"name", "year", "tags"} and 2000 <= answer["year"] <= 2030 and len(answer["name"]) <= 10
    with serve(model_dir, max_model_len=1024) as srv:
        remote = extraction.evaluate(OpenAIBackend(srv.url, model="tiny"), bounded_data, max_tokens=96)
    assert [s["answer"] for s in remote.samples] == [s["answer"] for s in local["samples"]]
    assert remote.metrics["f1"].value == pytest.approx(local["metrics"]["f1"]["value"])


def test_default_run_uses_the_shipped_examples(model_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["eval", "extraction", "--model", str(model_dir), "--limit", "2", "--max-tokens", "8", "--dtype", "fp32",
                   "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["config"]["data"] == str(EXAMPLE_DATA) and [s["id"] for s in res["samples"]] == ["report-01", "report-02"]
    assert res["metrics"]["f1"]["n"] == 7 + 8  # gold pairs: 5 scalar fields each, plus 2 and 3 segments
