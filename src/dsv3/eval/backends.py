"""What a benchmark needs from a model, and the in-process implementation of it.

Every task is written against three questions a model can answer: how likely is this
continuation after this context (multiple choice), what does it write after this prompt
(generation), and how well does it predict every token of a long text (perplexity). Keeping
tasks behind that interface lets the same scorer run through our engine or any
OpenAI-compatible server, so the two can be compared number for number.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from dsv3.eval.windows import token_windows


@dataclass(frozen=True)
class Loglikelihood:
    """Summed log-probability of a continuation, and whether greedy decoding would produce it."""

    logprob: float
    is_greedy: bool


@dataclass(frozen=True)
class RollingScore:
    """Log-likelihood of a whole text: sum over scored tokens, and how many tokens that was."""

    logprob: float
    tokens: int


class Backend(ABC):
    """A model as the tasks see it; both implementations keep the request order."""

    name: str = "model"

    @abstractmethod
    def loglikelihood(self, requests: Sequence[tuple[str, str]], desc: str = "loglikelihood") -> list[Loglikelihood]:
        """log p(continuation | context) for each (context, continuation) pair."""

    @abstractmethod
    def generate(self, prompts: Sequence[str], *, stop: Sequence[str], max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, n: int = 1, seed: int | None = None, desc: str = "generate") -> list[list[str]]:
        """`n` completions per prompt, each cut before the first stop sequence."""

    @abstractmethod
    def rolling_loglikelihood(self, texts: Sequence[str], window: int, stride: int,
                              desc: str = "perplexity") -> list[RollingScore]:
        """Log-likelihood of each full text, scored in sliding windows of `window` tokens."""

    def extract_json(self, conversations: Sequence[list[dict]], schemas: Sequence[dict], max_tokens: int,
                     desc: str = "extract") -> list[str]:
        """Greedy chat answers, each decoded under its JSON schema's grammar (structured extraction)."""
        from dsv3.errors import DSV3Error

        raise DSV3Error(f"the {type(self).__name__} backend cannot decode under a JSON schema.")


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Truncate at the earliest stop sequence, as lm-eval does after any server-side stopping."""
    cut = len(text)
    for s in stop:
        i = text.find(s) if s else -1
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """Move trailing whitespace of the context onto the continuation (lm-eval `_encode_pair`)."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


class InProcessBackend(Backend):
    """Runs the model through `dsv3.LLM`: batched scoring and generation on this machine."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32", batch_size: int = 16,
                 max_length: int | None = None, llm=None, max_model_len: int | None = None, device: str = "cpu"):
        if llm is None:
            from dsv3 import LLM  # deferred: the engine is heavy and HTTP-only runs never need it
            llm = LLM(str(model_dir), dtype=dtype, max_model_len=max_model_len, device=device)
        self.llm = llm
        self.tok = llm.get_tokenizer()
        self.name = Path(model_dir).name
        self.batch_size = max(1, batch_size)
        self.max_length = max_length or _config_max_length(Path(model_dir))

    def _prefix_token(self) -> int:
        bos = getattr(self.tok, "bos_token_id", None)
        return bos if bos is not None else self.tok.eos_token_id

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, split the way lm-evaluation-harness splits them."""
        context, continuation = split_trailing_space(context, continuation)
        if not context:  # nothing to condition on: the prefix token stands in, as lm-eval's EOT does
            return [self._prefix_token()], self.tok.encode(continuation, add_special_tokens=False)
        whole = self.tok.encode(context + continuation, add_special_tokens=True)
        ctx = self.tok.encode(context, add_special_tokens=True)
        return ctx, whole[len(ctx):]

    def score_sequences(self, sequences: Sequence[list[int]], desc: str) -> list[tuple[list[float], list[bool]]]:
        """Per-token log-probabilities (and greediness) of each sequence, longest first in batches."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: list[tuple[list[float], list[bool]]] = [([], [])] * len(sequences)
        with tqdm(total=len(sequences), desc=desc, unit="seq", disable=None) as bar:
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                for i, s in zip(idx, self.llm.score([list(sequences[i]) for i in idx])):
                    out[i] = (list(s.logprobs), list(s.is_greedy))
                bar.update(len(idx))
        return out

    def loglikelihood(self, requests, desc="loglikelihood"):
        seqs, ncont = [], []
        for context, continuation in requests:
            ctx, cont = self.encode_pair(context, continuation)
            seqs.append((ctx + cont)[-self.max_length:])
            ncont.append(min(len(cont), self.max_length - 1))
        results = []
        for (lps, greedy), k in zip(self.score_sequences(seqs, desc), ncont):
            results.append(Loglikelihood(float(sum(lps[len(lps) - k:])), all(greedy[len(greedy) - k:])))
        return results

    def generate(self, prompts, *, stop, max_tokens, temperature=0.0, top_p=1.0, n=1, seed=None, desc="generate"):
        from dsv3 import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                stop=list(stop), n=n)
        texts: list[list[str]] = []
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=None) as bar:
            for start in range(0, len(prompts), self.batch_size):
                chunk = list(prompts[start:start + self.batch_size])
                for out in self.llm.generate(chunk, params, use_tqdm=False):
                    texts.append([cut_at_stop(o.text, stop) for o in out.outputs])
                bar.update(len(chunk))
        return texts

    def rolling_loglikelihood(self, texts, window, stride, desc="perplexity"):
        window = min(window, self.max_length)
        jobs: list[tuple[int, list[int], int]] = []  # (text index, window tokens, tokens scored at its end)
        for t, text in enumerate(texts):
            ids = self.tok.encode(text, add_special_tokens=False)
            jobs += [(t, seq, k) for seq, k in token_windows(ids, self._prefix_token(), window, stride)]
        sums = [0.0] * len(texts)
        counts = [0] * len(texts)
        for (t, _, k), (lps, _) in zip(jobs, self.score_sequences([j[1] for j in jobs], desc)):
            sums[t] += float(sum(lps[len(lps) - k:]))
            counts[t] += k
        return [RollingScore(s, c) for s, c in zip(sums, counts)]


    def extract_json(self, conversations, schemas, max_tokens, desc="extract"):
        """The chat template, then greedy decoding masked by xgrammar's grammar of each schema."""
        from dsv3 import SamplingParams
        from dsv3.eval.data import DataError
        from dsv3.serve.errors import APIError
        from dsv3.serve.structured import GrammarBackend

        engine = self.llm.engine
        grammar = GrammarBackend(self.tok, engine.model.config.vocab_size, sorted(engine.eos_ids))
        compiled: dict[str, object] = {}
        params = []
        for i, schema in enumerate(schemas):
            key = json.dumps(schema, sort_keys=True)
            if key not in compiled:
                try:
                    compiled[key] = grammar.compile("json_schema", schema)
                except APIError as e:
                    raise DataError(f"record {i + 1}: the schema cannot be compiled to a grammar ({e.message}).") from None
            params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                         logits_processors=[grammar.processor(compiled[key])]))
        prompts = [{"prompt_token_ids": self.llm.chat_prompt_ids(c)} for c in conversations]
        texts: list[str] = []
        try:
            with tqdm(total=len(prompts), desc=desc, unit="doc", disable=None) as bar:
                for start in range(0, len(prompts), self.batch_size):
                    outs = self.llm.generate(prompts[start:start + self.batch_size], params[start:start + self.batch_size],
                                             use_tqdm=False)
                    texts += [o.outputs[0].text for o in outs]
                    bar.update(len(outs))
        finally:
            close = getattr(grammar, "close", None)
            if close is not None:
                close()
        return texts


def _config_max_length(model_dir: Path) -> int:
    """The model's context length from config.json, capped so a CPU run stays tractable."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        return int(min(cfg.get("max_position_embeddings", 4096), 8192))
    except (OSError, ValueError):
        return 4096
