"""Prompt scoring (issue 20, item 4): `max_tokens: 0` with echo + logprobs, vLLM's `prompt_logprobs` (values and
ranks), `/tokenizer_info`, and lm-evaluation-harness's `local-completions` loglikelihood with its default tokenizer
settings (it finds /tokenizer_info and tokenizes through /tokenize: nothing is downloaded), each against the
model's own full forward pass."""

from __future__ import annotations

import json

import pytest
import torch

from serve_harness import client, model_dir, serve, srv  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def parts(model_dir):
    from dsv3.io.load import load_model
    from dsv3.io.tokenizer import Tokenizer

    return load_model(model_dir, dtype="fp32", progress=False), Tokenizer.from_dir(model_dir)


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(. | ids[:i+1]) for every position: one forward pass without any cache (the oracle)."""
    with torch.no_grad():
        return model(torch.tensor([ids])).float().log_softmax(-1)[0]


def test_max_tokens_zero_scores_the_prompt(srv, parts):
    model, tok = parts
    prompt = "def add(a, b):\n    return a + b"
    with client(srv) as c:
        r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ch = body["choices"][0]
    ids = tok.encode(prompt)
    lp = full_logprobs(model, ids)
    assert ch["text"] == prompt and ch["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 0
    assert len(ch["logprobs"]["tokens"]) == len(ids) and ch["logprobs"]["token_logprobs"][0] is None
    want = [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert ch["logprobs"]["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    for i in range(1, len(ids)):  # the top-2 alternatives at each position
        top = lp[i - 1].topk(2)
        got = ch["logprobs"]["top_logprobs"][i]  # keyed by text: tokens spelling the same text share one key
        assert max(got.values()) == pytest.approx(float(top.values[0]), abs=1e-4) and len(got) <= 2


def test_prompt_logprobs_values_and_ranks(srv, parts):
    model, tok = parts
    prompt = "import os\nprint(os.getcwd())"
    ids = tok.encode(prompt)
    lp = full_logprobs(model, ids)
    with client(srv) as c:
        cmpl = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 3}).json()
        msgs = [{"role": "user", "content": prompt}]
        chat = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1, "prompt_logprobs": 0}).json()
    plp = cmpl["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for i in range(1, len(ids)):
        entry = plp[i]
        own = entry[str(ids[i])]
        assert own["logprob"] == pytest.approx(float(lp[i - 1, ids[i]]), abs=1e-4)
        assert own["rank"] == int((lp[i - 1] > lp[i - 1, ids[i]]).sum()) + 1
        assert own["decoded_token"] == tok.decode([ids[i]], skip_special_tokens=False)
        top = lp[i - 1].topk(3)
        for r, (j, v) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
            assert entry[str(j)]["logprob"] == pytest.approx(v, abs=1e-4) and entry[str(j)]["rank"] == r
    chat_ids = tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False)
    clp = full_logprobs(model, chat_ids)
    got = [None if e is None else e[str(chat_ids[i])]["logprob"] for i, e in enumerate(chat["prompt_logprobs"])]
    assert got[0] is None and got[1:] == pytest.approx([float(clp[i - 1, chat_ids[i]]) for i in range(1, len(chat_ids))],
                                                      abs=1e-4)


def test_tokenizer_info(srv, parts):
    _, tok = parts
    with client(srv) as c:
        info = c.get("/tokenizer_info").json()
        assert info["eos_token"] == "<｜end▁of▁sentence｜>" and info["bos_token"] == "<｜begin▁of▁sentence｜>"
        assert info["model_max_length"] == 256 and "add_generation_prompt" in info["chat_template"]
        eos = c.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
        assert eos == [tok.eos_token_id]


DOCS = [{"question": "def add(a, b):\n    return", "choices": ["a + b", "a - b", "None"], "answer": 0},
        {"question": "import", "choices": ["os", "sys", "json\nimport re"], "answer": 1},
        {"question": "for i in range(10):\n", "choices": ["    print(i)", "    pass"], "answer": 0}]


def test_lm_eval_local_completions_loglikelihood(tmp_path, model_dir, parts, monkeypatch):
    """lm-eval's `local-completions` with its defaults (tokenizer_backend auto -> remote, tokenized_requests true,
    batch_size 1): a local multiple-choice task's loglikelihoods equal the model's own, with no download."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    model, tok = parts
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")  # any download attempt fails the test
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "dsv3_mc.yaml").write_text(
        "task: dsv3_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    with serve(model_dir) as s:
        out = lm_eval.simple_evaluate(model="local-completions",
                                      model_args={"model": "tiny", "base_url": s.url + "/v1/completions", "max_retries": 1},
                                      tasks=["dsv3_mc"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                      log_samples=True)
    samples = sorted(out["samples"]["dsv3_mc"], key=lambda x: x["doc_id"])
    assert len(samples) == len(DOCS)
    for doc, sample in zip(DOCS, samples):
        context = doc["question"].rstrip()  # lm-eval moves the context's trailing whitespace to the continuation
        ctx = tok.encode(context, add_special_tokens=False)
        for choice, resp in zip(doc["choices"], sample["resps"]):
            whole = tok.encode(doc["question"] + " " + choice, add_special_tokens=False)  # target_delimiter " "
            cont = whole[len(ctx):]  # lm-eval scores context ids + these (not `whole`, whose start may merge differently)
            lp = full_logprobs(model, ctx + cont)
            want = sum(float(lp[len(ctx) + k - 1, t]) for k, t in enumerate(cont))
            greedy = all(int(lp[len(ctx) + k - 1].argmax()) == t for k, t in enumerate(cont))
            ll, is_greedy = resp[0]
            assert ll == pytest.approx(want, abs=1e-3) and bool(is_greedy) == greedy
    assert 0.0 <= out["results"]["dsv3_mc"]["acc,none"] <= 1.0
