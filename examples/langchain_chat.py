"""LangChain against `dsv3 serve` (or any OpenAI-compatible server): a prompt-template chain, the
same chain streamed, and structured output decoded under a JSON schema.

    dsv3 serve --model DIR &
    python examples/langchain_chat.py --base-url http://127.0.0.1:8000/v1 "Write a function that reverses a string."

Needs `langchain-openai` (a dsv3 test dependency: `pip install langchain-openai`). The served model
is the server's first one unless `--model NAME` picks another (e.g. a `--lora` adapter's name).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

SYSTEM = "You are a concise Python assistant."
# Python names of bounded length keep even a small model's answer inside a 160-token budget, so it always parses.
FUNCTION_SCHEMA = {
    "title": "Function", "description": "A Python function's name and argument names.", "type": "object",
    "properties": {"name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,23}$"},
                   "arguments": {"type": "array", "items": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,11}$"},
                                 "maxItems": 4}},
    "required": ["name", "arguments"], "additionalProperties": False,
}


def served_model(base_url: str, api_key: str) -> str:
    """The first model the server lists (`GET /v1/models`)."""
    import openai

    return openai.OpenAI(base_url=base_url, api_key=api_key).models.list().data[0].id


def chat_model(base_url: str, model: str, api_key: str, max_tokens: int):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=base_url, model=model, api_key=api_key, temperature=0, max_tokens=max_tokens,
                      max_retries=1)


def build_chain(llm):
    """prompt template | chat model | plain text."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    prompt = ChatPromptTemplate.from_messages([("system", SYSTEM), ("human", "{question}")])
    return prompt | llm | StrOutputParser()


def run(question: str, base_url: str, model: str | None = None, api_key: str = "none", max_tokens: int = 128,
        out=sys.stdout) -> dict[str, Any]:
    """Ask `question` three ways; print and return the answer, the streamed answer and the structured one."""
    model = model or served_model(base_url, api_key)
    llm = chat_model(base_url, model, api_key, max_tokens)
    chain = build_chain(llm)
    answer = chain.invoke({"question": question})
    print(f"answer: {answer}", file=out)
    print("streamed: ", end="", file=out)
    pieces = []
    for piece in chain.stream({"question": question}):
        pieces.append(piece)
        print(piece, end="", file=out, flush=True)
    print(file=out)
    # response_format json_schema; a budget that fits the schema's longest answer, so it always completes
    structured = chat_model(base_url, model, api_key, max(max_tokens, 160)).with_structured_output(
        FUNCTION_SCHEMA, method="json_schema")
    function = structured.invoke(f"Name a Python function for this task, and its arguments: {question}")
    print(f"structured: {json.dumps(function)}", file=out)
    return {"model": model, "answer": answer, "streamed": "".join(pieces), "structured": function}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("question", nargs="?", default="Write a function that reverses a string.")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI API root")
    p.add_argument("--model", default=None, help="served model name (default: the server's first)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args(argv)
    run(args.question, args.base_url, args.model, args.api_key, args.max_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
