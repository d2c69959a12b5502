"""Instruction data for supervised fine-tuning: JSONL records -> token ids with a response-only loss mask.

Two record forms: `{"instruction", "input"?, "output", "system"?}` and chat `{"messages": [...]}`. The
prompt comes from the model's chat template (default) or the Alpaca template. Prompt and response
text are tokenized *separately* and concatenated, so the trained response tokens are exactly what
the model must generate after the tokenized prompt (no BPE merge across the boundary, the failure
behind TRL's "could not find response key"). Every assistant turn of a chat is trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from dsv3.errors import DSV3Error
from dsv3.io.tokenizer import Tokenizer

ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:")
TEMPLATES = ("chat", "alpaca")


class DataError(DSV3Error):
    """A training record is malformed, incomplete, empty or too long (message names file and line)."""


@dataclass
class Example:
    """One tokenized record: `mask[i] = 1` where token i is a response token the loss is taken on."""

    ids: list[int]
    mask: list[int]
    where: str


def read_jsonl(path: Path) -> Iterator[tuple[str, dict | DataError]]:
    """(file:line, record) per non-blank line; a malformed line yields a DataError instead of a record."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            where = f"{path}:{n}"
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, DataError(f"{where}: malformed JSON ({e.msg})")
                continue
            yield where, rec if isinstance(rec, dict) else DataError(f"{where}: a record must be a JSON object")


def _text(rec: dict, key: str, where: str, required: bool = True) -> str:
    value = rec.get(key, None if required else "")
    if value is None:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string")
    return value


def to_messages(rec: dict, where: str) -> list[dict]:
    """Either record form as a chat; an instruction record becomes system? + user + assistant."""
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in msgs):
            raise DataError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}}")
        answers = [m for m in msgs if m["role"] == "assistant"]
        if not answers:
            raise DataError(f"{where}: the conversation has no assistant message to train on")
        if any(not m["content"].strip() for m in answers):
            raise DataError(f"{where}: an assistant message is empty")
        return msgs
    instruction, extra, output = _text(rec, "instruction", where), _text(rec, "input", where, False), _text(rec, "output", where)
    if not output.strip():
        raise DataError(f"{where}: empty 'output'")
    user = instruction + (f"\n\n{extra}" if extra.strip() else "")
    system = [{"role": "system", "content": rec["system"]}] if isinstance(rec.get("system"), str) and rec["system"] else []
    return system + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def chat_segments(tok: Tokenizer, msgs: list[dict], where: str) -> list[tuple[str, bool]]:
    """(text, is_response) pieces whose concatenation is the rendered conversation."""
    segs, prev = [], ""
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(msgs[:k], add_generation_prompt=True)
        full = tok.apply_chat_template(msgs[:k + 1], add_generation_prompt=False)
        if not prompt.startswith(prev) or not full.startswith(prompt):
            raise DataError(f"{where}: the chat template does not render this conversation prefix-stably; use template: alpaca")
        segs += [(prompt[len(prev):], False), (full[len(prompt):], True)]
        prev = full
    return segs


def alpaca_segments(rec: dict, msgs: list[dict], where: str) -> list[tuple[str, bool]]:
    if "messages" in rec:
        raise DataError(f"{where}: chat records need template: chat (the Alpaca template has one turn)")
    extra = rec.get("input") or ""
    prompt = (ALPACA_INPUT if extra.strip() else ALPACA_NO_INPUT).format(instruction=rec["instruction"], input=extra)
    return [(prompt, False), (rec["output"], True)]


def tokenize_record(tok: Tokenizer, rec: dict, where: str, template: str, max_seq_len: int) -> Example:
    msgs = to_messages(rec, where)
    ids: list[int] = []
    mask: list[int] = []
    if template == "chat":
        segs = chat_segments(tok, msgs, where)
    else:
        segs = alpaca_segments(rec, msgs, where)
        if tok.bos_token_id is not None:
            ids, mask = [tok.bos_token_id], [0]
    for text, is_response in segs:
        piece = tok.encode(text, add_special_tokens=False) if text else []
        ids += piece
        mask += [int(is_response)] * len(piece)
    if template == "alpaca" and tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
        mask.append(1)
    if not any(mask):
        raise DataError(f"{where}: the response is empty after tokenization")
    if len(ids) > max_seq_len:
        raise DataError(f"{where}: example is {len(ids)} tokens, longer than max_seq_len {max_seq_len}")
    return Example(ids, mask, where)


def load_examples(paths: Sequence[str | Path], tok: Tokenizer, template: str = "chat", max_seq_len: int = 2048,
                  on_bad: str = "skip", log=print) -> tuple[list[Example], dict]:
    """Tokenize every record; bad ones are reported with file:line and skipped, or fatal with on_bad='error'."""
    if template not in TEMPLATES:
        raise DataError(f"template must be one of {TEMPLATES}, got {template!r}")
    if on_bad not in ("skip", "error"):
        raise DataError(f"on_bad_example must be 'skip' or 'error', got {on_bad!r}")
    if not paths:
        raise DataError("no data files given (set data_files)")
    examples, skipped = [], []
    for path in paths:
        for where, rec in read_jsonl(Path(path)):
            try:
                if isinstance(rec, DataError):
                    raise rec
                examples.append(tokenize_record(tok, rec, where, template, max_seq_len))
            except DataError as e:
                if on_bad == "error":
                    raise
                skipped.append(str(e))
                log(f"skipping {e}")
    if not examples:
        raise DataError(f"no usable training examples in {', '.join(map(str, paths))} ({len(skipped)} skipped)")
    return examples, {"used": len(examples), "skipped": len(skipped)}
