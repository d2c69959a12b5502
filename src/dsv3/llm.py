"""`dsv3.LLM`: the Python API, in the shape users know from vLLM."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from dsv3.io.load import load_for_inference
from dsv3.engine import EngineConfig, LLMEngine, RequestFailedError
from dsv3.errors import DSV3Error
from dsv3.engine.outputs import RequestOutput, StreamEvent
from dsv3.io.paths import default_model_dir, model_path
from dsv3.engine.sampling import SamplingParams
from dsv3.io.tokenizer import Tokenizer

Prompt = str | dict[str, Any]


@dataclass
class ScoreOutput:
    """Per-token log-probabilities of a sequence under the model (for perplexity, MMLU, ...)."""

    logprobs: list[float]  # log p(t_i | t_<i) for i = 1 .. n-1
    is_greedy: list[bool]  # whether t_i was the argmax


class LLM:
    """Load a checkpoint directory once; generate, chat and score with it.

    >>> llm = LLM()                                    # the embedded default model
    >>> out = llm.generate(["def fib(n):"], SamplingParams(max_tokens=32, temperature=0))
    >>> out[0].outputs[0].text

    `LLM(path, lora_adapters={"sql": "adapters/sql"})` serves PEFT adapters side by side;
    `llm.generate(prompts, params, lora="sql")` picks one.
    """

    def __init__(self, model: str | Path | None = None, dtype: str | torch.dtype = "auto", device: str = "cpu",
                 max_model_len: int | None = None, seed: int = 0, progress: bool = False, quantization: str | None = None,
                 **engine_args: Any):
        self.model_dir = model_path(model) if model is not None else default_model_dir()
        self.model = load_for_inference(self.model_dir, dtype=dtype, quantization=quantization, device=device, progress=progress)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.engine = LLMEngine(self.model, self.tokenizer, EngineConfig(max_model_len=max_model_len, seed=seed, **engine_args))
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine, model_dir: str | Path) -> "LLM":
        """Wrap an existing engine, e.g. rank 0 of a tensor-parallel run.

        Its model may be sharded across processes, so only the engine is used: `score` needs the whole
        model in this process and is unavailable.
        """
        self = cls.__new__(cls)
        self.model_dir, self._ids = Path(model_dir), itertools.count()
        self.engine, self.model, self.tokenizer = engine, None, engine.tokenizer
        return self

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt_token_ids"), list):
            return None, [int(t) for t in prompt["prompt_token_ids"]]
        raise DSV3Error("a prompt must be a string or {'prompt_token_ids': [...]}")

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | None = None,
                 use_tqdm: bool = True, lora: str | list[str | None] | None = None) -> list[RequestOutput]:
        """Complete each prompt; `sampling_params.n` continuations per prompt.

        `lora` names one of the `lora_adapters` given at construction (for all prompts, or one per prompt);
        prompts for different adapters and for the base model (None) run in the same batches.
        """
        params = sampling_params or SamplingParams()
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        return self.engine.generate(prompts, params, use_tqdm=use_tqdm and len(prompts) > 1, adapter=lora)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False, lora: str | None = None, **template_kwargs: Any) -> list[RequestOutput]:
        """Apply the model's chat template (it already holds BOS) and generate the assistant turn."""
        convs = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [{"prompt_token_ids": self.chat_prompt_ids(c, **template_kwargs)} for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora=lora)

    def chat_prompt_ids(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
               lora: str | None = None) -> Iterator[StreamEvent]:
        """Yield text increments as they are decoded (never a broken UTF-8 character); `lora` as in `generate`."""
        rid = f"stream-{next(self._ids)}"
        self.engine.add_request(rid, prompt, sampling_params or SamplingParams(), adapter_id=self.engine.adapter_id(lora))
        emitted = 0
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    if out.error is not None:
                        raise RequestFailedError(out.error, out.error_is_input)
                    o = out.outputs[0]
                    yield StreamEvent(o.text[emitted:], o.token_ids[-1] if o.token_ids else None, o.finish_reason)
                    emitted = len(o.text)
                    if out.finished:
                        return
        finally:
            self.engine.abort(rid)

    SCORE_CHUNK = 2048  # tokens per forward when scoring: long sequences go through a cache, chunk by chunk

    @torch.inference_mode()
    def score(self, sequences: Sequence[Sequence[int]]) -> list[ScoreOutput]:
        """log p(t_i | t_<i) for every token after the first. A sequence up to `SCORE_CHUNK` tokens is one
        forward pass; a longer one runs in chunks over a contiguous cache, so memory grows with the cache,
        not with [length, vocabulary] logits (a 32K-token text would need 4 GB of them at once)."""
        out = []
        for seq in sequences:
            ids = torch.tensor([list(seq)], device=self.model.device)
            n, step = ids.shape[1], self.SCORE_CHUNK
            cache = self.model.dense_cache(1, n) if n > step else None
            lps, greedy = [], []
            for s in range(0, n - 1, step):
                chunk = ids[:, s:min(n, s + step)]
                logp = self.model(chunk, None, cache).float().log_softmax(-1)[0]
                target = ids[0, s + 1:s + 1 + chunk.shape[1]]
                logp = logp[: target.numel()]
                lps += logp.gather(1, target[:, None])[:, 0].tolist()
                greedy += (logp.argmax(-1) == target).tolist()
            out.append(ScoreOutput(lps, greedy))
        return out
