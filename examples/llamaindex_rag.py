"""LlamaIndex against `dsv3 serve`: a vector-store RAG over a folder of code. The files are split into
chunks, embedded through the server's `/v1/embeddings` (LlamaIndex's `OpenAILikeEmbedding`), kept in
LlamaIndex's in-memory vector store, and a question is answered by the served chat model
(`OpenAILike`) from the chunks closest to it.

    dsv3 serve --model DIR &
    python examples/llamaindex_rag.py --base-url http://127.0.0.1:8000/v1 --folder src/ \\
        "def load_file(name):\\n    with open(name) as handle:\\n        return handle.read()"

Needs `llama-index-llms-openai-like` and `llama-index-embeddings-openai-like` (dsv3 test dependencies).
Token counts (chunk sizes, what fits the context) use the served model's own tokenizer through the
server's `/tokenize`, so nothing is downloaded. The embeddings are a causal code model's pooled hidden
states, not a trained retrieval model's (docs/serve.md): they find code by code, so the best queries
look like the code you want (a signature, a few lines); a plain-English question retrieves less well.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx

SUFFIXES = (".py",)


class ServerTokenizer:
    """The served model's tokenizer as LlamaIndex wants one (text -> token list), through `POST /tokenize`."""

    def __init__(self, base_url: str, model: str, api_key: str):
        root = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.client = httpx.Client(base_url=root, headers={"Authorization": f"Bearer {api_key}"}, timeout=60)
        self.encode = lru_cache(maxsize=4096)(self._encode)

    def _encode(self, text: str) -> tuple[int, ...]:
        r = self.client.post("/tokenize", json={"model": self.model, "prompt": text, "add_special_tokens": False})
        r.raise_for_status()
        return tuple(r.json()["tokens"])

    def __call__(self, text: str) -> list[int]:
        return list(self.encode(text))


def served_model(base_url: str, api_key: str) -> tuple[str, int]:
    """The first model the server lists (`GET /v1/models`) and its context length."""
    import openai

    m = openai.OpenAI(base_url=base_url, api_key=api_key).models.list().data[0]
    return m.id, int(getattr(m, "max_model_len", None) or 4096)


def load_documents(folder: str | Path, suffixes: tuple[str, ...] = SUFFIXES):
    """Every source file under `folder`, each with its path relative to the folder as metadata (it is embedded
    with the chunk: a file's name says something about its code)."""
    from llama_index.core import SimpleDirectoryReader

    root = Path(folder).resolve()
    reader = SimpleDirectoryReader(str(root), recursive=True, required_exts=list(suffixes),
                                   file_metadata=lambda p: {"file_path": str(Path(p).resolve().relative_to(root))})
    return reader.load_data()


def build_index(folder: str | Path, base_url: str, model: str, api_key: str, tokenizer: ServerTokenizer,
                chunk_size: int = 256):
    """Split (counting the served model's tokens), embed (through the server) and index the folder's files."""
    from llama_index.core import VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    embed = OpenAILikeEmbedding(model_name=model, api_base=base_url, api_key=api_key, embed_batch_size=16, max_retries=1)
    splitter = SentenceSplitter(chunk_size=chunk_size, chunk_overlap=16, tokenizer=tokenizer, paragraph_separator="\n\n\n")
    return VectorStoreIndex.from_documents(load_documents(folder), embed_model=embed, transformations=[splitter])


def query_engine(index, base_url: str, model: str, api_key: str, tokenizer: ServerTokenizer, context_window: int,
                 max_tokens: int, top_k: int):
    """Retrieve `top_k` chunks and answer from them with the served chat model; the retrieved text is packed
    into the context by the served model's token counts."""
    from llama_index.core import PromptHelper, get_response_synthesizer
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(model=model, api_base=base_url, api_key=api_key, is_chat_model=True, context_window=context_window,
                     max_tokens=max_tokens, temperature=0, max_retries=1, tokenizer=tokenizer)
    helper = PromptHelper(context_window=context_window, num_output=max_tokens, tokenizer=tokenizer)
    synthesizer = get_response_synthesizer(llm=llm, prompt_helper=helper)
    return index.as_query_engine(llm=llm, similarity_top_k=top_k, response_synthesizer=synthesizer)


def run(question: str, folder: str | Path, base_url: str, model: str | None = None, api_key: str = "none",
        top_k: int = 2, max_tokens: int = 64, out=sys.stdout) -> dict[str, Any]:
    """Index `folder`, retrieve the `top_k` chunks closest to `question`, answer from them; print and return
    the answer and the sources (path, score), best first."""
    name, context = served_model(base_url, api_key)
    model = model or name
    tokenizer = ServerTokenizer(base_url, model, api_key)
    index = build_index(folder, base_url, model, api_key, tokenizer)
    engine = query_engine(index, base_url, model, api_key, tokenizer, context, max_tokens, top_k)
    response = engine.query(question)
    sources = [(n.node.metadata["file_path"], float(n.score)) for n in response.source_nodes]
    print(f"answer: {response.response}", file=out)
    for path, score in sources:
        print(f"source: {path} ({score:.3f})", file=out)
    return {"model": model, "answer": response.response, "sources": sources,
            "nodes": [n.node for n in response.source_nodes]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("question", help="what to look for; code-shaped queries retrieve best")
    p.add_argument("--folder", default=".", help="the folder of code to index (its .py files, recursively)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI API root")
    p.add_argument("--model", default=None, help="served model name (default: the server's first)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    p.add_argument("--top-k", type=int, default=2, help="chunks retrieved per question")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)
    if not Path(args.folder).is_dir():
        print(f"llamaindex_rag: error: {args.folder} is not a folder", file=sys.stderr)
        return 2
    run(args.question.replace("\\n", "\n"), args.folder, args.base_url, args.model, args.api_key, args.top_k,
        args.max_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
