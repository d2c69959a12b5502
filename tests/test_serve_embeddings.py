"""`/v1/embeddings` and the engine's pooling requests (issue 20, item 3).

The pooled vectors are checked against HF transformers' DeepseekV3Model (its `last_hidden_state`, after the
final norm) on a random model: mean and last pooling, `dimensions`, chunked prefill, a batch mixed with
generations, the prefix cache, preemption. Through the server: the openai SDK (base64, its default) and float
encodings, token-id inputs, the 400s, the API-key gate; LangChain's `OpenAIEmbeddings.embed_documents` on the
embedded default model ranks each paraphrased snippet of code above every unrelated one."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import torch

from dsv3.engine import EngineConfig, LLMEngine
from dsv3.engine.pooling import PoolingParams
from dsv3.engine.sampling import SamplingParams
from dsv3.io.load import load_model
from dsv3.io.tokenizer import Tokenizer
from dsv3.serve import ServeConfig
from dsv3.serve.auth import APIKeys
from hf_oracle import build_hf_model
from serve_harness import serve
from tiny_tokenizer import make_tiny_tokenizer


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """An HF random model with the tiny tokenizer's vocabulary, saved and loaded by dsv3."""
    path = tmp_path_factory.mktemp("hf_embed")
    make_tiny_tokenizer(path)
    tok = Tokenizer.from_dir(path)
    hf = build_hf_model("v3_yarn_groups", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id)
    hf.save_pretrained(path)
    return hf, path, tok


def hf_vector(hf, ids: list[int], pooling: str, dims: int | None = None) -> torch.Tensor:
    with torch.no_grad():
        h = hf.model(input_ids=torch.tensor([ids])).last_hidden_state[0].float()
    v = h.mean(0) if pooling == "mean" else h[-1]
    v = v[:dims] if dims else v
    return v / v.norm()


PROMPTS = ["def add(a, b):\n    return a + b\n" * 4, "x", "import os\nimport sys", "class A:\n    pass\n" * 6]


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_engine_pooling_matches_hf(hf_pair, pooling):
    hf, path, tok = hf_pair
    engine = LLMEngine(load_model(path, dtype="fp32", progress=False), tok,
                       EngineConfig(max_model_len=256, max_num_batched_tokens=24, kv_cache_memory=16 << 20))
    ids = [tok.encode(p) for p in PROMPTS]
    # pooled prompts batched with a generation, prefills chunked at 24 tokens, the last prompt a repeat (prefix cache)
    prompts = ids + [ids[0]]
    outs = engine.generate(prompts + ["def f("], [PoolingParams(pooling)] * len(prompts) + [SamplingParams(max_tokens=4)])
    for p, o in zip(prompts, outs):
        assert o.finished and o.error is None
        assert torch.allclose(o.outputs.data, hf_vector(hf, p, pooling), atol=2e-5)
    assert len(outs[-1].outputs[0].token_ids) == 4
    cut = engine.generate([ids[0]], PoolingParams(pooling, dimensions=16))[0].outputs.data
    assert cut.shape == (16,) and torch.allclose(cut, hf_vector(hf, ids[0], pooling, 16), atol=2e-5)
    raw = engine.generate([ids[2]], PoolingParams(pooling, normalize=False))[0].outputs.data
    assert abs(float(raw.norm()) - 1.0) > 1e-3 and torch.allclose(raw / raw.norm(), hf_vector(hf, ids[2], pooling), atol=2e-5)


def test_engine_pooling_survives_preemption(hf_pair):
    """A generation growing beside a long pooled prompt on 9 blocks: the pooled request is preempted mid-prefill,
    recomputed from scratch later, and still pools exactly its prompt once."""
    hf, path, tok = hf_pair
    engine = LLMEngine(load_model(path, dtype="fp32", progress=False), tok,
                       EngineConfig(max_model_len=256, max_num_batched_tokens=64, num_blocks=9, block_size=16,
                                    enable_prefix_caching=False))
    text = tok.encode("def add(a, b):\n    return a + b\n" * 30)
    gen, pooled = text[:20], text[20:140]
    outs = engine.generate([gen, pooled], [SamplingParams(max_tokens=100, ignore_eos=True), PoolingParams("mean")])
    assert engine.scheduler.num_preemptions > 0
    assert len(outs[0].outputs[0].token_ids) == 100
    assert torch.allclose(outs[1].outputs.data, hf_vector(hf, pooled, "mean"), atol=2e-5)


@pytest.fixture(scope="module")
def hf_srv(hf_pair):
    _, path, _ = hf_pair
    with serve(path, max_model_len=128) as s:
        yield s


def test_openai_sdk_embeddings(hf_srv, hf_pair):
    hf, _, tok = hf_pair
    sdk = openai.OpenAI(base_url=hf_srv.url + "/v1", api_key="x", max_retries=0)
    texts = ["def add(a, b):", "import os", "x = 1"]
    r = sdk.embeddings.create(model="tiny", input=texts)  # the SDK asks for base64 and decodes it
    assert [d.index for d in r.data] == [0, 1, 2] and r.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)
    for t, d in zip(texts, r.data):
        assert np.allclose(d.embedding, hf_vector(hf, tok.encode(t), "mean").numpy(), atol=2e-5)
    floats = sdk.embeddings.create(model="tiny", input=texts[0], encoding_format="float").data[0].embedding
    assert np.allclose(floats, r.data[0].embedding, atol=1e-7)
    raw = sdk.with_raw_response.embeddings.create(model="tiny", input=texts[0], encoding_format="base64").http_response.json()
    assert np.allclose(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4"), floats)
    ids = tok.encode("import os")
    by_ids = sdk.embeddings.create(model="tiny", input=[ids, ids[:2]]).data
    assert np.allclose(by_ids[0].embedding, r.data[1].embedding, atol=1e-6)
    assert np.allclose(sdk.embeddings.create(model="tiny", input=ids).data[0].embedding, r.data[1].embedding, atol=1e-6)
    short = sdk.embeddings.create(model="tiny", input=texts[0], dimensions=8).data[0].embedding
    assert len(short) == 8 and np.allclose(short, hf_vector(hf, tok.encode(texts[0]), "mean", 8).numpy(), atol=2e-5)


@pytest.mark.parametrize("body,match", [
    ({"input": ""}, "empty string"), ({"input": []}, "empty"), ({"input": [[]]}, "empty list"),
    ({"input": "word " * 300}, "max_model_len"), ({"input": [[1, 2, 10 ** 6]]}, "must be in"),
    ({"input": "x", "dimensions": 10 ** 6}, "hidden size"), ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "model": "other"}, "does not exist"), ({"input": "x", "extra_body": {"priority": 2}}, "not supported"),
])
def test_embedding_errors_are_400s(hf_srv, body, match):
    sdk = openai.OpenAI(base_url=hf_srv.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises((openai.BadRequestError, openai.NotFoundError), match=match):
        sdk.embeddings.create(**{"model": "tiny", **body})


def test_embeddings_need_the_api_key(hf_pair):
    _, path, _ = hf_pair
    with serve(path, ServeConfig(served_model_name="tiny", keys=APIKeys.build(["secret-key-1"], None)),
               max_model_len=128) as s:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).embeddings.create(model="tiny", input="x")
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="secret-key-1", max_retries=0)
        assert len(ok.embeddings.create(model="tiny", input="x").data[0].embedding) == 64


PAIRS = [("def add(a, b):\n    return a + b\n", "def sum_two(x, y):\n    return x + y\n"),
         ("def read_file(path):\n    with open(path) as f:\n        return f.read()\n",
          "def load_text(filename):\n    with open(filename) as handle:\n        return handle.read()\n"),
         ("class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n",
          "class LifoQueue:\n    def __init__(self):\n        self.data = []\n\n    def push(self, x):\n        self.data.append(x)\n"),
         ("for i in range(10):\n    print(i)\n", "for n in range(10):\n    print(n)\n"),
         ("import json\nwith open('config.json') as f:\n    config = json.load(f)\n",
          "import json\nwith open('settings.json') as fp:\n    settings = json.load(fp)\n")]


def test_langchain_embeddings_rank_paraphrased_code_first():
    """On the embedded default model (trained on Python): each snippet is closer to its paraphrase than to any
    unrelated snippet. `check_embedding_ctx_length=False` sends text (LangChain would otherwise tokenize with
    tiktoken, which downloads its vocabulary)."""
    from langchain_openai import OpenAIEmbeddings

    from dsv3.io.paths import default_model_dir

    with serve(default_model_dir(), max_model_len=512) as s:
        emb = OpenAIEmbeddings(model="tiny", base_url=s.url + "/v1", api_key="x", check_embedding_ctx_length=False,
                               max_retries=0)
        texts = [t for pair in PAIRS for t in pair]
        vecs = np.array(emb.embed_documents(texts))
        query = np.array(emb.embed_query(PAIRS[0][1]))
    assert vecs.shape == (len(texts), 256) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    sim = vecs @ vecs.T
    for i in range(len(PAIRS)):
        a, b = 2 * i, 2 * i + 1
        others = [j for j in range(len(texts)) if j not in (a, b)]
        assert sim[a, b] > max(sim[a, others].max(), sim[b, others].max()), (i, sim[a, b], sim[a, others].max())
    assert np.allclose(query, vecs[1], atol=1e-5)


@pytest.mark.slow
def test_embeddings_bench_runs_and_agrees_with_hf(capsys):
    """bench/embeddings_bench.py on a small load: both rates measured, every server vector equal to HF's pooling."""
    import importlib.util
    from pathlib import Path

    from dsv3.io.paths import default_model_dir

    spec = importlib.util.spec_from_file_location("embeddings_bench", Path(__file__).resolve().parents[1] / "bench" /
                                                  "embeddings_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    stats = bench.run(str(default_model_dir()), count=24, tokens=32, batch=8, concurrency=2, repeats=1)
    print(bench.report(stats))
    assert stats["min_cosine"] > 0.999 and stats["dim"] == 256
    assert stats["server_emb_per_s"] > 0 and stats["hf_emb_per_s"] > 0 and len(stats["server_s"]) == 1
