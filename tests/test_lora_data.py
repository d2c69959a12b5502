"""Fine-tuning data: response-only loss, packing without leaks, and bad records reported by file:line."""

from __future__ import annotations

import json

import pytest
import torch

from dsv3.io.load import load_model
from dsv3.lora.batching import IGNORE, collate, pack_bfd
from dsv3.lora.data import DataError, Example, load_examples, tokenize_record
from dsv3.lora.trainer import token_loss
from dsv3.attention import AttentionContext
from dsv3.io.tokenizer import Tokenizer
from tiny_model import make_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_dir(model_dir)


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_loss_mask_covers_exactly_the_response(tok, template):
    rec = {"instruction": "Sort the list", "input": "3 1 2", "output": "1 2 3"}
    ex = tokenize_record(tok, rec, "x:1", template, 512)
    response = [t for t, m in zip(ex.ids, ex.mask) if m]
    prompt = [t for t, m in zip(ex.ids, ex.mask) if not m]
    assert ex.mask == sorted(ex.mask)  # prompt first, then the response
    assert tok.decode(response, skip_special_tokens=True) == "1 2 3"
    assert response[-1] == tok.eos_token_id  # the model learns to stop
    text = tok.decode(prompt, skip_special_tokens=False)
    assert "Sort the list" in text and "3 1 2" in text and ("### Response:" in text) == (template == "alpaca")


def test_every_assistant_turn_is_trained_in_a_chat(tok):
    rec = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a?"},
                        {"role": "assistant", "content": "one"}, {"role": "user", "content": "b?"},
                        {"role": "assistant", "content": "two"}]}
    ex = tokenize_record(tok, rec, "x:1", "chat", 512)
    spans, cur = [], []
    for t, m in zip(ex.ids, ex.mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur)
    assert [tok.decode(s) for s in spans] == ["one", "two"]
    full = tok.apply_chat_template(rec["messages"], add_generation_prompt=False)
    assert tok.decode(ex.ids, skip_special_tokens=False) == full


def test_prompt_positions_get_no_gradient(model_dir, tok):
    """The loss ignores prompt labels: d loss / d final hidden state is exactly 0 wherever the next token is prompt."""
    model = load_model(model_dir, dtype=torch.float32, progress=False)
    ex = tokenize_record(tok, {"instruction": "Name a colour", "output": "blue"}, "x:1", "chat", 512)
    batch = collate([[ex]])
    grads = {}
    model.model.norm.weight.requires_grad_(True)

    def keep_grad(module, inputs, out):
        out.register_hook(lambda g: grads.setdefault("g", g))

    model.model.norm.register_forward_hook(keep_grad)
    loss, n = token_loss(model, batch, "cpu")
    loss.backward()
    g = grads["g"][0].abs().sum(-1)
    trained = batch["targets"][0] != IGNORE
    assert n == sum(ex.mask) and bool(trained.any())
    assert torch.all(g[~trained] == 0) and torch.all(g[trained] > 0)


def test_packing_does_not_leak_between_examples(model_dir):
    model = load_model(model_dir, dtype=torch.float32, progress=False)
    a = Example(list(range(5, 25)), [0] * 10 + [1] * 10, "a")
    b = Example(list(range(40, 52)), [0] * 6 + [1] * 6, "b")
    packed = collate([[a, b]])
    with torch.no_grad():
        both = model(packed["input_ids"], packed["positions"], AttentionContext.causal(doc_ids=packed["doc_ids"]))
        alone_a = model(torch.tensor([a.ids]))
        alone_b = model(torch.tensor([b.ids]))
        leaky = model(packed["input_ids"], packed["positions"], AttentionContext.causal())
    assert (both[0, :20] - alone_a[0]).abs().max() <= 1e-5
    assert (both[0, 20:] - alone_b[0]).abs().max() <= 1e-5
    assert (leaky[0, 20:] - alone_b[0]).abs().max() > 1e-3  # the same row without document masking does leak
    assert packed["targets"][0, 19] == IGNORE  # a's last token never predicts b's first
    assert packed["positions"][0, 20] == 0


def test_bfd_packing_places_every_example_within_the_limit():
    exs = [Example([1] * n, [1] * n, str(i)) for i, n in enumerate([9, 7, 6, 5, 4, 3, 3, 2, 1])]
    rows = pack_bfd(exs, 10)
    assert sorted(e.where for r in rows for e in r) == sorted(e.where for e in exs)
    assert all(sum(len(e.ids) for e in r) <= 10 for r in rows)
    assert len(rows) == 4  # 40 tokens in rows of 10: best fit leaves no slack here


def test_bad_records_are_reported_with_file_and_line(tok, tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        {"instruction": "ok", "output": "fine"},
        "{not json",
        {"instruction": "no output"},
        {"instruction": "empty", "output": "  "},
        {"instruction": "long " * 400, "output": "x"},
        {"messages": [{"role": "user", "content": "no answer"}]},
    ])
    logs = []
    examples, report = load_examples([path], tok, "chat", 256, "skip", log=logs.append)
    assert report == {"used": 1, "skipped": 5} and len(examples) == 1
    for line, word in [(2, "malformed JSON"), (3, "missing field 'output'"), (4, "empty 'output'"),
                       (5, "longer than max_seq_len"), (6, "no assistant message")]:
        assert any(f"d.jsonl:{line}:" in m and word in m for m in logs), (line, logs)
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON"):
        load_examples([path], tok, "chat", 256, "error")
