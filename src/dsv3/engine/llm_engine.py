"""LLMEngine: continuous batching of many requests over one model and one paged latent cache."""

from __future__ import annotations

import itertools
import zlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from dsv3.context import check_max_model_len, check_prompt_len
from dsv3.engine.block_manager import BlockManager
from dsv3.engine.logprobs import collect_prompt_logprobs, top_logprobs
from dsv3.engine.runner import ModelRunner, StepItem
from dsv3.engine.scheduler import Scheduler
from dsv3.engine.sequence import Sequence, SequenceStatus
from dsv3.engine.speculative import MTPDrafter, verify
from dsv3.generate import CompletionOutput, RequestError, RequestOutput, check_prompt_ids
from dsv3.model import DeepseekV3ForCausalLM
from dsv3.output import OutputTracker
from dsv3.sampling import SamplingParams, apply_penalties, sample
from dsv3.tokenizer import Tokenizer


@dataclass
class EngineConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int = 1 << 30  # bytes for the latent cache
    num_blocks: int | None = None  # overrides kv_cache_memory
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kv_cache_dtype: str = "auto"  # auto | int8
    num_speculative_tokens: int = 0  # MTP drafts per step (needs a model with MTP weights)
    seed: int = 0
    lora_adapters: dict[str, str] | None = None  # name -> PEFT adapter dir, served side by side (adapter id = index + 1)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    seqs: list[Sequence]
    arrival_time: float


class LLMEngine:
    def __init__(self, model: DeepseekV3ForCausalLM, tokenizer: Tokenizer, config: EngineConfig | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = c = config or EngineConfig()
        cfg = model.config
        self.max_model_len = c.max_model_len or cfg.max_position_embeddings
        check_max_model_len(cfg, c.max_model_len)  # one warning line past the trained/declared length
        self.adapter_names: list[str] = list(c.lora_adapters or {})
        if self.adapter_names:
            from dsv3.lora.multi import load_stacked

            load_stacked(model, [str(c.lora_adapters[n]) for n in self.adapter_names])  # before the runner looks
        if c.kv_cache_dtype not in ("auto", "int8"):
            raise RequestError(f"kv_cache_dtype must be auto or int8, got {c.kv_cache_dtype!r}")
        per_token = (cfg.num_hidden_layers + len(model.model.mtp)) * (
            cfg.latent_dim * (1 if c.kv_cache_dtype == "int8" else model.dtype.itemsize) + (8 if c.kv_cache_dtype == "int8" else 0))
        enough = c.max_num_seqs * (-(-self.max_model_len // c.block_size)) + 1  # never more than can be used
        num_blocks = c.num_blocks or max(1, min(enough, c.kv_cache_memory // (per_token * c.block_size)))
        self.block_manager = BlockManager(num_blocks, c.block_size, c.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, c.max_num_seqs, c.max_num_batched_tokens, c.enable_chunked_prefill)
        self.runner = ModelRunner(model, num_blocks, c.block_size, c.kv_cache_dtype)
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0}
        self.eos_ids = set(tokenizer.stop_token_ids) | set(cfg.eos_token_ids)
        self.drafter = None
        if c.num_speculative_tokens:
            if not len(model.model.mtp):
                raise RequestError("speculative decoding needs a model loaded with its MTP module (num_nextn_predict_layers > 0)")
            self.drafter = MTPDrafter(self.runner, self.block_manager, c.num_speculative_tokens, self.max_model_len)
            self.stats.update(spec_draft_tokens=0, spec_accepted_tokens=0)
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()

    # ---- requests -----------------------------------------------------------------------
    def validate(self, prompt: str | list[int] | dict[str, Any], params: SamplingParams) -> tuple[str | None, list[int], int]:
        """Check a request without queueing it: (prompt text, prompt ids, max new tokens) or `RequestError`."""
        if not isinstance(params, SamplingParams):
            raise RequestError("params must be a SamplingParams")
        text, ids = self._encode(prompt)
        check_prompt_ids(ids, self.model.config.vocab_size, self.max_model_len)
        check_prompt_len(self.model.config, len(ids))
        if params.n > self.config.max_num_seqs:
            raise RequestError(f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        budget = self.max_model_len - len(ids)
        return text, ids, min(params.max_tokens or budget, budget)

    def add_request(self, request_id: str, prompt: str | list[int] | dict[str, Any], params: SamplingParams | None = None,
                    adapter_id: int = 0, cache_salt: str | None = None, arrival_time: float | None = None) -> None:
        """Validate and queue a request; raises `RequestError` (a ValueError) before scheduling anything.

        adapter_id: 0 = the base model, k = the k-th of `lora_adapters` (see `adapter_id()`).
        """
        params = params or SamplingParams()
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if not isinstance(adapter_id, int) or not 0 <= adapter_id <= len(self.adapter_names):
            raise RequestError(f"adapter id {adapter_id!r} is not loaded (this engine has {len(self.adapter_names)} adapters)")
        text, ids, max_new = self.validate(prompt, params)
        now = arrival_time if arrival_time is not None else time.monotonic()
        seqs = []
        for i in range(params.n):
            gen = None
            if not params.greedy:
                gen = torch.Generator(device=self.runner.device)
                gen.manual_seed(params.seed + i if params.seed is not None else zlib.crc32(f"{self.config.seed}:{request_id}:{i}".encode()))
            seq = Sequence(next(self._seq_ids), request_id, i, list(ids), len(ids), params,
                           OutputTracker(self.tokenizer, ids, params, self.eos_ids, max_new), gen, adapter_id, cache_salt, now)
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = _Request(request_id, text, list(ids), seqs, now)
        self.stats["prompt_tokens"] += len(ids)

    def adapter_id(self, name: str | None) -> int:
        """The id `add_request` takes for an adapter name (None = the base model)."""
        if name is None:
            return 0
        if name not in self.adapter_names:
            raise RequestError(f"LoRA adapter {name!r} is not loaded (loaded: {', '.join(self.adapter_names) or 'none'})")
        return self.adapter_names.index(name) + 1

    def _encode(self, prompt: str | list[int] | dict[str, Any]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt_token_ids"), list):
            prompt = prompt["prompt_token_ids"]
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, list(prompt)
        raise RequestError("a prompt must be a string, a list of token ids or {'prompt_token_ids': [...]}")

    def abort(self, request_id: str) -> None:
        """Stop a request and free all its blocks (unknown or finished ids are ignored)."""
        req = self.requests.pop(request_id, None)
        for seq in req.seqs if req else []:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                seq.status = SequenceStatus.FINISHED
                seq.output.finish_reason = seq.output.finish_reason or "abort"

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step -----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once (after MTP drafting), sample or verify, report progress."""
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        drafts = self.drafter.draft(chunks) if self.drafter else {}
        items = [StepItem(c.seq.token_ids[c.start:c.start + c.num_tokens] + (drafts[c.seq].tokens if c.seq in drafts else []),
                          c.start, c.seq.block_table, sample=c.completes, all_logits=c.seq in drafts, adapter=c.seq.adapter_id)
                 for c in chunks]
        hidden, logits = self.runner.execute(items)
        self.stats["steps"] += 1
        collect_prompt_logprobs(self.model, chunks, items, hidden)
        new_tokens: dict[Sequence, list[int]] = {}
        to_sample, sample_rows = [], []
        row = offset = 0
        for c, it in zip(chunks, items):
            seq, computed = c.seq, c.num_tokens
            if it.all_logits:
                draft = drafts[seq]
                accepted = verify(seq, draft, logits[row:row + len(it.token_ids)])
                self.drafter.stats.record(len(draft.tokens), len(accepted) - 1)
                self.stats["spec_draft_tokens"] += len(draft.tokens)
                self.stats["spec_accepted_tokens"] += len(accepted) - 1
                new_tokens[seq] = accepted
                computed += len(accepted) - 1
                row += len(it.token_ids)
            elif it.sample:
                to_sample.append(seq)
                sample_rows.append(row)
                row += 1
            seq.num_computed_tokens += computed
            if self.drafter:
                self.drafter.keep_hidden(seq, c.start, hidden[offset:offset + computed])
            self.block_manager.commit(seq)
            offset += len(it.token_ids)
        if to_sample:
            for seq, tok in zip(to_sample, self._sample(to_sample, logits[sample_rows])):
                new_tokens[seq] = [tok]
        touched: dict[str, None] = {}
        now = time.monotonic()
        for seq, toks in new_tokens.items():
            seq.first_token_time = seq.first_token_time or now
            for tok in toks:
                seq.token_ids.append(tok)
                seq.output.append(tok)
                self.stats["generation_tokens"] += 1
                if seq.output.finish_reason:
                    self.scheduler.remove(seq)
                    seq.status = SequenceStatus.FINISHED
                    break
            touched[seq.request_id] = None
        return [self._request_output(self.requests[r]) for r in touched if r in self.requests]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        raw = logits.clone() if any(s.params.logprobs is not None for s in seqs) else None
        for i, seq in enumerate(seqs):
            params = seq.params
            if seq.output.banned_ids:
                logits[i, seq.output.banned_ids] = float("-inf")
            if params.repetition_penalty != 1 or params.presence_penalty or params.frequency_penalty:
                V = logits.shape[-1]
                seen = torch.zeros(1, V, dtype=torch.bool, device=logits.device)
                seen[0, seq.token_ids] = True
                counts = torch.bincount(torch.tensor(seq.token_ids[seq.num_prompt_tokens:], dtype=torch.long), minlength=V).float()[None]
                logits[i:i + 1] = apply_penalties(logits[i:i + 1], [params], seen, counts.to(logits.device))
            for proc in params.logits_processors:
                logits[i] = proc(seq.token_ids[seq.num_prompt_tokens:], logits[i])
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs]).tolist()
        if raw is not None:
            lp = raw.log_softmax(-1)
            for i, seq in enumerate(seqs):
                if seq.params.logprobs is not None:
                    entry = top_logprobs(lp[i:i + 1], [tokens[i]], seq.params.logprobs)[0]
                    seq.logprobs = (seq.logprobs or []) + [entry]
                    seq.cumulative_logprob += entry[tokens[i]]
        return tokens

    def _request_output(self, req: _Request) -> RequestOutput:
        outs = [CompletionOutput(s.index, s.output.text[: s.output.emitted], s.output.token_ids[:], s.output.finish_reason,
                                 s.cumulative_logprob if s.logprobs is not None else None,
                                 s.logprobs[:] if s.logprobs is not None else None) for s in req.seqs]
        finished = all(s.is_finished for s in req.seqs)
        if finished:
            self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, finished, req.seqs[0].prompt_logprobs)

    # ---- offline convenience ------------------------------------------------------------
    def generate(self, prompts: list[Any], params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False, adapter: str | list[str | None] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; `adapter` names a LoRA adapter for all prompts or one per prompt."""
        from tqdm.auto import tqdm

        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        adapters = [self.adapter_id(a) for a in (adapter if isinstance(adapter, list) else [adapter] * len(prompts))]
        if len(adapters) != len(prompts):
            raise RequestError(f"{len(adapters)} adapter names were given for {len(prompts)} prompts")
        for p, sp in zip(prompts, plist):
            self.validate(p, sp)  # all or nothing: reject before any request is queued
        ids = [f"gen-{next(self._seq_ids)}" for _ in prompts]
        for rid, p, sp, a in zip(ids, prompts, plist, adapters):
            self.add_request(rid, p, sp, adapter_id=a)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(prompts), desc="generating", disable=not use_tqdm)
        while self.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [results[r] for r in ids]

