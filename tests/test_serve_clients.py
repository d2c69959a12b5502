"""Real client libraries against the server: LangChain's ChatOpenAI and LlamaIndex's OpenAILike."""

from __future__ import annotations

import pytest

from dsv3.engine.sampling import SamplingParams
from serve_harness import model_dir, oracle, ref, serve, srv, tiny_model_dir  # noqa: F401 (fixtures)




def greedy_chat(ref, content: str, n: int) -> str:
    gen, tok = ref
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": content}]), add_special_tokens=False)
    return gen.complete(ids, SamplingParams(max_tokens=n, temperature=0)).text


def test_langchain_chat_openai_invoke_and_stream(srv, ref):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tiny", base_url=srv.url + "/v1", api_key="x", temperature=0, max_tokens=10, max_retries=0)
    want = greedy_chat(ref, "def add(a, b):", 10)
    assert llm.invoke("def add(a, b):").content == want
    assert "".join(chunk.content for chunk in llm.stream("def add(a, b):")) == want


def test_llamaindex_openai_like_complete_and_chat(srv, ref):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    gen, tok = ref
    common = dict(model="tiny", api_base=srv.url + "/v1", api_key="x", temperature=0, max_tokens=8, max_retries=0,
                  context_window=256)
    text_llm = OpenAILike(is_chat_model=False, **common)
    want = gen.complete(tok.encode("import sys"), SamplingParams(max_tokens=8, temperature=0)).text
    assert text_llm.complete("import sys").text == want
    chat_llm = OpenAILike(is_chat_model=True, **common)
    reply = chat_llm.chat([ChatMessage(role="user", content="hello there")])
    assert reply.message.content == greedy_chat(ref, "hello there", 8)
