"""The tests' reference decoder: one request, prefill then one token at a time over a contiguous cache.

No scheduler, no paging, no batching, no speculation: the same model code driven the simplest way,
so the continuous-batching engine (`dsv3.engine`) can be checked against it token for token. It
honours every `SamplingParams` field but `n`, with the engine's sampler and output tracker.
"""

from __future__ import annotations

from typing import Iterator

import torch

from dsv3.attention import DenseLatentCache
from dsv3.engine.output import OutputTracker
from dsv3.engine.outputs import CompletionOutput, StreamEvent, check_prompt_ids
from dsv3.engine.sampling import SamplingParams, apply_penalties, sample
from dsv3.io.tokenizer import Tokenizer
from dsv3.models.context_length import check_prompt_len
from dsv3.models.deepseek_v3 import DeepseekV3ForCausalLM


class Generator:
    """Decodes one prompt with a `DenseLatentCache`, honouring every `SamplingParams` field but `n`."""

    def __init__(self, model: DeepseekV3ForCausalLM, tokenizer: Tokenizer, max_model_len: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len = max_model_len or model.config.max_position_embeddings

    def check_prompt(self, prompt_ids: list[int]) -> None:
        check_prompt_ids(prompt_ids, self.model.config.vocab_size, self.max_model_len)
        check_prompt_len(self.model.config, len(prompt_ids))

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], params: SamplingParams, seed: int | None = None) -> Iterator[StreamEvent]:
        self.check_prompt(prompt_ids)
        cfg, dev = self.model.config, self.model.device
        budget = self.max_model_len - len(prompt_ids)
        max_new = min(params.max_tokens or budget, budget)
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=dev)
            gen.manual_seed(seed if seed is not None else (params.seed if params.seed is not None else torch.seed()))
        eos = set(self.tokenizer.stop_token_ids) | set(cfg.eos_token_ids)
        out = OutputTracker(self.tokenizer, prompt_ids, params, eos, max_new)
        cache = DenseLatentCache.for_model(self.model, 1, len(prompt_ids) + max_new)
        logits = self.model(torch.tensor([prompt_ids], device=dev), None, cache)[:, -1].float()
        penalties = params.repetition_penalty != 1 or params.presence_penalty or params.frequency_penalty
        seen = torch.zeros(1, cfg.vocab_size, dtype=torch.bool, device=dev)
        seen[0, prompt_ids] = True
        counts = torch.zeros(1, cfg.vocab_size, device=dev)
        while True:
            if out.banned_ids:
                logits[:, out.banned_ids] = float("-inf")
            if penalties:
                logits = apply_penalties(logits, [params], seen, counts)
            token = int(sample(logits, [params], [gen])[0])
            seen[0, token] = True
            counts[0, token] += 1
            text = out.append(token)
            yield StreamEvent(text, token, out.finish_reason)
            if out.finish_reason:
                return
            logits = self.model(torch.tensor([[token]], device=dev), None, cache)[:, -1].float()

    def complete(self, prompt_ids: list[int], params: SamplingParams, index: int = 0, seed: int | None = None) -> CompletionOutput:
        text, tokens, reason = [], [], None
        for ev in self.stream(prompt_ids, params, seed):
            text.append(ev.text)
            if ev.token_id is not None:
                tokens.append(ev.token_id)
            reason = ev.finish_reason or reason
        return CompletionOutput(index, "".join(text), tokens, reason)
