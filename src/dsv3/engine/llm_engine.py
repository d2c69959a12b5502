"""LLMEngine: continuous batching of many requests over one model and one paged latent cache.

Faults are isolated per request: whatever one sequence raises in a step -- drafting, the model
forward, prompt logprobs, logits processors, sampling, verification, detokenizing -- finishes that
request with `finish_reason="error"` and an `error` message, frees its blocks, and leaves every
other sequence of the step exactly as if the failing one had not been there. A model forward that
raises is re-run on halves of the batch until the failing chunks are found (the re-runs rewrite the
same cache slots, so survivors are unaffected). Only `EngineDeadError` (a lost parallel rank) ends
the engine.
"""

from __future__ import annotations

import itertools
import math
import logging
import zlib
import time
from dataclasses import dataclass

import torch

from dsv3.models.context_length import check_max_model_len, check_prompt_len
from dsv3.engine.block_manager import BlockManager
from dsv3.engine.logprobs import collect_prompt_logprobs, top_logprobs
from dsv3.engine.runner import ModelRunner, StepItem
from dsv3.engine.scheduler import Scheduler
from dsv3.engine.sequence import Sequence, SequenceStatus
from dsv3.engine.speculative import MTPDrafter, verify
from dsv3.errors import DSV3Error
from dsv3.engine.outputs import (CompletionOutput, EngineRequest, PromptType, RequestError, RequestOutput,
                                 check_prompt_ids)
from dsv3.models.interface import CausalLM
from dsv3.engine.output import OutputTracker
from dsv3.engine import pooling
from dsv3.engine.sampling import SamplingParams, apply_penalties, sample
from dsv3.io.tokenizer import Tokenizer

log = logging.getLogger("dsv3.engine")


class EngineDeadError(RuntimeError):
    """The engine cannot continue (e.g. a parallel rank died); every request fails and health turns 503."""


class RequestFailedError(RuntimeError):
    """One request failed inside the engine and was stopped; the engine and other requests carry on.

    `is_input`: the request itself was at fault (a `DSV3Error`, e.g. a grammar no output can finish)."""

    def __init__(self, message: str, is_input: bool = False):
        super().__init__(message)
        self.is_input = is_input


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
    spec_min_acceptance: float = 0.3  # a request accepting fewer of its drafts stops drafting (above the 0.21 break-even
    # bench/mtp_bound.py measures for k=1 on the embedded model: the native call's cost in plain forwards, minus one)
    seed: int = 0
    lora_adapters: dict[str, str] | None = None  # name -> PEFT adapter dir, served side by side (adapter id = index + 1)
    screened_head: bool = True  # plain greedy steps of > 8 sampled rows pick tokens with the bf16-screened fp32 head
    # (the same argmax: dsv3.ops.screened_greedy); False computes every row's fp32 logits


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    seqs: list[Sequence]
    arrival_time: float
    error: str | None = None
    error_is_input: bool = False  # the error was the request's own fault (a DSV3Error), not the engine's


class LLMEngine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer, config: EngineConfig | None = None):
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
        specs = model.cache_specs()
        stateful = hasattr(model, "paged_state")  # per-sequence state (DeepSeek-V4): slots + paged entries
        block_size, memory, prefix = c.block_size, c.kv_cache_memory, c.enable_prefix_caching
        if stateful:
            block_size, memory = self._stateful_layout(model, specs)
        per_token = max(1, sum(s.bytes_per_token(model.dtype, c.kv_cache_dtype == "int8") for s in specs))
        enough = c.max_num_seqs * (-(-self.max_model_len // block_size)) + 1  # never more than can be used
        num_blocks = c.num_blocks or max(1, min(enough, memory // (per_token * block_size)))
        slots = c.max_num_seqs if stateful else 0
        self.block_manager = BlockManager(num_blocks, block_size, prefix, num_state_slots=slots)
        self.scheduler = Scheduler(self.block_manager, c.max_num_seqs, c.max_num_batched_tokens, c.enable_chunked_prefill)
        self.runner = ModelRunner(model, num_blocks, block_size, c.kv_cache_dtype, num_state_slots=slots,
                                  max_snapshots=4 * slots if prefix else 0)
        if stateful and prefix:
            self.block_manager.snapshots = self.runner.state
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "request_errors": 0,
                      "request_rejections": 0}
        self.eos_ids = set(tokenizer.stop_token_ids) | set(cfg.eos_token_ids)
        self.drafter = None
        if c.num_speculative_tokens:
            if not model.num_mtp_layers:
                raise RequestError("speculative decoding needs a model loaded with its MTP module (num_nextn_predict_layers > 0)")
            self.drafter = MTPDrafter(self.runner, self.block_manager, c.num_speculative_tokens, self.max_model_len,
                                      c.spec_min_acceptance)
            self.stats.update(spec_draft_tokens=0, spec_accepted_tokens=0)
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()

    def _snapshot(self, seq: Sequence) -> None:
        """Per-sequence state (V4): keep the slot's state when a step ends on a cached block's last token."""
        n, bs, bm = seq.num_computed_tokens, self.block_manager.block_size, self.block_manager
        if bm.snapshots is None or not n or n % bs or seq.state_slot < 0:
            return
        block = seq.block_table[n // bs - 1]
        if bm.block_hashes[block] is not None and not bm.snapshots.has(block):
            bm.snapshots.save(seq.state_slot, block)

    def _stateful_layout(self, model: CausalLM, specs: list) -> tuple[int, int]:
        """Block size and entry-pool memory for a model with per-sequence state (DeepSeek-V4): blocks hold whole
        compressed entries (a multiple of every ratio), and the slots' rings and carries come off the budget.
        Combinations it does not run yet are refused here, by name."""
        c = self.config
        if c.kv_cache_dtype == "int8":
            raise RequestError(f"an int8 cache is not supported for {model.config.model_type} (its windows and "
                               "compressed entries stay in the model's dtype)")
        if c.num_speculative_tokens > 1:
            raise RequestError(f"{model.config.model_type} drafts one MTP token per step in the engine "
                               "(num_speculative_tokens 1): a chain of drafts would advance the MTP state past tokens "
                               "that may be rejected")
        if c.lora_adapters:
            raise RequestError(f"serving LoRA adapters is not supported for {model.config.model_type} yet")
        block_size = c.block_size
        for s in specs:
            if s.ratio:
                block_size = math.lcm(block_size, s.ratio)
        es = torch.empty((), dtype=model.dtype).element_size()
        per_slot = sum(s.window * s.width * es + 4 * s.state for s in specs)  # ring + fp32 carry per sequence
        if c.enable_prefix_caching:  # and 4 snapshots of a slot per sequence at cached block ends
            per_slot *= 5
        memory = c.kv_cache_memory - c.max_num_seqs * per_slot
        if memory <= 0:
            raise RequestError(f"kv_cache_memory {c.kv_cache_memory} bytes does not hold the state of max_num_seqs="
                               f"{c.max_num_seqs} sequences ({per_slot} bytes each); raise it or lower max_num_seqs")
        return block_size, memory

    # ---- requests -----------------------------------------------------------------------
    def validate(self, prompt: PromptType, params: SamplingParams) -> EngineRequest:
        """Check a request without queueing it: tokenized, in the vocabulary, within the context; else `RequestError`.
        `params` may be `PoolingParams` (an embedding: see dsv3.engine.pooling)."""
        if isinstance(params, pooling.PoolingParams):
            return pooling.validate(self, prompt, params)
        if not isinstance(params, SamplingParams):
            raise RequestError("params must be a SamplingParams")
        text, ids = self._encode(prompt)
        vocab = self.model.config.vocab_size
        check_prompt_ids(ids, vocab, self.max_model_len)
        check_prompt_len(self.model.config, len(ids))
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise RequestError(f"stop_token_ids holds {bad[0]}, outside the vocabulary [0, {vocab})")
        if params.n > self.config.max_num_seqs:
            raise RequestError(f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        budget = self.max_model_len - len(ids)
        return EngineRequest(text, tuple(ids), params, min(params.max_tokens or budget, budget), checked_by=self)

    def checked(self, prompt: PromptType | EngineRequest, params: SamplingParams | None = None) -> EngineRequest:
        """`prompt` as a checked request: an `EngineRequest` this engine made is taken as it is."""
        if isinstance(prompt, EngineRequest):
            if params is not None and params is not prompt.params:
                raise RequestError("pass the SamplingParams inside the EngineRequest, not beside it")
            return prompt if prompt.checked_by is self else self.validate(list(prompt.prompt_ids), prompt.params)
        return self.validate(prompt, params or SamplingParams())

    def add_request(self, request_id: str, prompt: PromptType | EngineRequest, params: SamplingParams | None = None,
                    adapter_id: int = 0, cache_salt: str | None = None, arrival_time: float | None = None) -> None:
        """Queue a request (checked here unless it is an `EngineRequest` from `validate`); raises `RequestError`
        (a ValueError) before scheduling anything.

        adapter_id: 0 = the base model, k = the k-th of `lora_adapters` (see `adapter_id()`).
        """
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if not isinstance(adapter_id, int) or not 0 <= adapter_id <= len(self.adapter_names):
            raise RequestError(f"adapter id {adapter_id!r} is not loaded (this engine has {len(self.adapter_names)} adapters)")
        req = self.checked(prompt, params)
        params, ids = req.params, list(req.prompt_ids)
        pooler = None
        if isinstance(params, pooling.PoolingParams):  # one sequence that pools its prompt and samples nothing
            pooler, params = pooling.Pooler(params, len(ids)), pooling.POOLING_SAMPLING
        now = arrival_time if arrival_time is not None else time.monotonic()
        seqs = []
        for i in range(params.n):
            gen = None
            if not params.greedy:
                gen = torch.Generator(device=self.runner.device)
                gen.manual_seed((params.seed + i) % (1 << 64) if params.seed is not None and params.seed + i >= 1 << 64
                                else params.seed + i if params.seed is not None else zlib.crc32(f"{self.config.seed}:{request_id}:{i}".encode()))
            seq = Sequence(next(self._seq_ids), request_id, i, list(ids), len(ids), params,
                           OutputTracker(self.tokenizer, ids, params, self.eos_ids, req.max_new_tokens), gen, adapter_id,
                           cache_salt, now, pooler=pooler)
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = _Request(request_id, req.prompt, ids, seqs, now)
        self.stats["prompt_tokens"] += len(ids)

    def adapter_id(self, name: str | None) -> int:
        """The id `add_request` takes for an adapter name (None = the base model)."""
        if name is None:
            return 0
        if name not in self.adapter_names:
            raise RequestError(f"LoRA adapter {name!r} is not loaded (loaded: {', '.join(self.adapter_names) or 'none'})")
        return self.adapter_names.index(name) + 1

    def _encode(self, prompt: PromptType) -> tuple[str | None, list[int]]:
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
        touched: dict[str, None] = {}
        if self.runner.state is not None:
            self.runner.begin_step()
        new_tokens = self._spec_step(chunks, touched) if self.drafter else None
        if new_tokens is None:
            new_tokens = self._general_step(chunks, touched)
        now = time.monotonic()
        for seq, toks in new_tokens.items():
            if seq.is_finished:
                continue
            try:
                seq.first_token_time = seq.first_token_time or now
                for tok in toks:
                    seq.token_ids.append(tok)
                    seq.output.append(tok)
                    self.stats["generation_tokens"] += 1
                    if seq.output.finish_reason:
                        self.scheduler.remove(seq)
                        seq.status = SequenceStatus.FINISHED
                        break
            except Exception as e:
                self._fail(seq, e, touched)
            touched[seq.request_id] = None
        return [self._request_output(self.requests[r]) for r in touched if r in self.requests]

    def _general_step(self, chunks: list, touched: dict[str, None]) -> dict[Sequence, list[int]]:
        """Any step: MTP drafts (the Python path), one model forward over every chunk, then sampling or verification.
        Returns the tokens each sequence gained."""
        drafts = self._draft(chunks, touched)
        items = [StepItem(c.seq.token_ids[c.start:c.start + c.num_tokens] + (drafts[c.seq].tokens if c.seq in drafts else []),
                          c.start, c.seq.block_table, sample=c.completes and c.seq.pooler is None, all_logits=c.seq in drafts,
                          adapter=c.seq.adapter_id, state_slot=c.seq.state_slot, restore=c.seq.restore_state)
                 for c in chunks if not c.seq.is_finished]
        chunks = [c for c in chunks if not c.seq.is_finished]
        for c in chunks:
            c.seq.restore_state = None  # the runner loads it into the slot this step
        # every sampled row plain greedy (and the screened head on): the runner may pick their tokens itself
        sampled = [c.seq for c, it in zip(chunks, items) if it.sample]
        greedy = self.config.screened_head and not drafts and bool(sampled) and all(map(self._plain_greedy, sampled))
        chunks, items, hidden, logits, tokens = self._execute(chunks, items, touched, greedy)
        self.stats["steps"] += 1
        new_tokens: dict[Sequence, list[int]] = {}
        to_sample, sample_rows = [], []
        row = offset = 0
        # a sequence's hidden states are sliced out only for what reads them (a tensor view per sequence per step)
        needs_hidden = self.drafter is not None or any(c.seq.pooler is not None or c.seq.params.prompt_logprobs is not None
                                                       for c in chunks)
        for c, it in zip(chunks, items):
            seq, n_rows = c.seq, (len(it.token_ids) if it.all_logits else int(it.sample))
            h = hidden[offset:offset + len(it.token_ids)] if needs_hidden else None
            offset += len(it.token_ids)
            rows = slice(row, row + n_rows)
            row += n_rows
            try:
                if seq.params.prompt_logprobs is not None:
                    collect_prompt_logprobs(self.model, [c], [it], h)
                if seq.pooler is not None:
                    seq.pooler.add(c.start, h[:c.num_tokens])
                computed = c.num_tokens
                if it.all_logits:
                    draft = drafts[seq]
                    accepted = verify(seq, draft, logits[rows])
                    self._record_draft(seq, len(draft.tokens), len(accepted) - 1)
                    new_tokens[seq] = accepted
                    computed += len(accepted) - 1
                    if self.runner.state is not None and len(accepted) - 1 < len(draft.tokens):
                        # the slot's state took in rejected drafts: rewind it to the tokens that stay
                        self.runner.rewind(StepItem(it.token_ids[:computed], c.start, seq.block_table,
                                                    state_slot=seq.state_slot))
                elif it.sample:
                    to_sample.append(seq)
                    sample_rows.append(rows.start)
                seq.num_computed_tokens += computed
                if self.drafter:
                    self.drafter.keep_hidden(seq, c.start, h[:computed])
                self.block_manager.commit(seq)
                self._snapshot(seq)
                if seq.pooler is not None and c.completes:  # pooled: done once the last prompt token is computed
                    self.scheduler.remove(seq)
                    seq.status, seq.output.finish_reason = SequenceStatus.FINISHED, "stop"
                    touched[seq.request_id] = None
            except Exception as e:
                self._fail(seq, e, touched)
        if to_sample:  # sample_rows are distinct rows in order: all of them (a pure decode step) needs no copy
            if tokens is not None:
                picked = (tokens if len(sample_rows) == tokens.shape[0] else tokens[sample_rows]).tolist()
                new_tokens.update((seq, [tok]) for seq, tok in zip(to_sample, picked) if not seq.is_finished)
            else:
                rows = logits if len(sample_rows) == logits.shape[0] else logits[sample_rows]
                for seq, tok in self._sample(to_sample, rows, touched).items():
                    new_tokens[seq] = [tok]
        return new_tokens

    @staticmethod
    def _plain_greedy(seq: Sequence) -> bool:
        """The sequence's next token is the argmax of its raw logits: nothing reads or changes them first."""
        p = seq.params
        return (p.greedy and p.logprobs is None and not p.logits_processors and p.repetition_penalty == 1
                and not p.presence_penalty and not p.frequency_penalty and not seq.output.banned_ids)

    def _spec_step(self, chunks: list, touched: dict[str, None]) -> dict[Sequence, list[int]] | None:
        """A pure greedy decode step with MTP as one native call (verify, accept, draft the next step), or None when
        the step does not qualify or the model has no native form (the general step runs instead)."""
        d, k = self.drafter, self.drafter.k
        if not self.runner.native_spec or not d.fusable(chunks):
            return None
        try:
            d.catch_up(chunks)
        except EngineDeadError:
            raise
        except Exception:
            return None  # the general step drafts again, chunk by chunk, and fails the sequence that raises
        if any(c.seq.spec_draft is None for c in chunks):
            return None
        items = [StepItem([c.seq.token_ids[c.start]] + c.seq.spec_draft, c.start, c.seq.block_table) for c in chunks]
        try:
            out = self.runner.execute_spec(items, k)
        except EngineDeadError:
            raise
        except Exception as e:  # the general step re-runs it (the drafts stay ready) and isolates the culprit
            log.warning("native speculative step failed (%s: %s); taking the general path", type(e).__name__, e)
            return None
        if out is None:
            return None
        tokens, drafts = out[0].tolist(), out[1].tolist()
        self.stats["steps"] += 1
        new_tokens: dict[Sequence, list[int]] = {}
        for c, toks, nxt in zip(chunks, tokens, drafts):
            seq = c.seq
            toks = toks[:toks.index(-1)] if -1 in toks else toks
            accepted = len(toks) - 1
            self._record_draft(seq, k, accepted)
            seq.num_computed_tokens += 1 + accepted
            seq.mtp_done, seq.mtp_pending = c.start + 1 + accepted, None
            if not seq.spec_off:
                seq.spec_draft = nxt
            self.block_manager.commit(seq)
            new_tokens[seq] = toks
        return new_tokens

    def _record_draft(self, seq: Sequence, drafted: int, accepted: int) -> None:
        """One verified draft: the drafter's per-position and per-request counts, the engine's token counters."""
        self.drafter.record(seq, drafted, accepted)
        self.stats["spec_draft_tokens"] += drafted
        self.stats["spec_accepted_tokens"] += accepted

    # ---- fault isolation ----------------------------------------------------------------
    def _fail(self, seq: Sequence, exc: BaseException, touched: dict[str, None]) -> None:
        """Finish the request `seq` belongs to with an error; free its blocks. Other requests are untouched."""
        if isinstance(exc, EngineDeadError):
            raise exc
        req = self.requests.get(seq.request_id)
        if req is None or req.error is not None:
            return
        if isinstance(exc, DSV3Error):  # the request's own fault (e.g. a schema no output can finish)
            req.error, req.error_is_input = str(exc), True
            self.stats["request_rejections"] += 1
            log.info("request %s stopped: %s", seq.request_id, req.error)
        else:
            req.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else 'no message'}"
            self.stats["request_errors"] += 1
            log.error("request %s failed in the engine and was stopped (%s); other requests continue",
                      seq.request_id, req.error, exc_info=exc)
        for s in req.seqs:
            if not s.is_finished:
                self.scheduler.remove(s)
                s.status = SequenceStatus.FINISHED
                s.output.finish_reason = "error"
        touched[seq.request_id] = None

    def _draft(self, chunks: list, touched: dict[str, None]) -> dict:
        """MTP drafts for the step; a batch that raises is drafted chunk by chunk to find the culprit."""
        if not self.drafter:
            return {}
        try:
            return self.drafter.draft(chunks)
        except EngineDeadError:
            raise
        except Exception as e:
            if len(chunks) == 1:
                self._fail(chunks[0].seq, e, touched)
                return {}
        drafts = {}
        for c in chunks:
            try:
                drafts.update(self.drafter.draft([c]))
            except EngineDeadError:
                raise
            except Exception as e:
                self._fail(c.seq, e, touched)
        return drafts

    def _execute(self, chunks: list, items: list[StepItem], touched: dict[str, None], greedy: bool = False):
        """The model forward over `items`; on an error, bisect until the chunks that raise are found and failed.

        Returns the surviving (chunks, items) with their hidden states, the logits of the sampled rows and None,
        laid out as one run would; or, when `greedy` (every sampled row plain greedy) and the runner picks those
        rows' tokens itself (`execute_greedy`), None and the tokens.
        """
        if not items:
            return [], [], torch.empty(0), torch.empty(0), None
        try:
            out = self.runner.execute_greedy(items) if greedy else None
            if out is not None:
                return chunks, items, out[0], None, out[1]
            hidden, logits = self.runner.execute(items)
            return chunks, items, hidden, logits, None
        except EngineDeadError:
            raise
        except Exception as e:
            if len(items) == 1:
                self._fail(chunks[0].seq, e, touched)
                return [], [], torch.empty(0), torch.empty(0), None
        mid = len(items) // 2  # the halves compute logits: one layout to join
        parts = [self._execute(chunks[:mid], items[:mid], touched), self._execute(chunks[mid:], items[mid:], touched)]
        parts = [p for p in parts if p[1]]
        if not parts:
            return [], [], torch.empty(0), torch.empty(0), None
        return ([c for p in parts for c in p[0]], [it for p in parts for it in p[1]],
                torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts]), None)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, touched: dict[str, None]) -> dict[Sequence, int]:
        """One token per sequence; a sequence whose processors or sampling raise is failed, the rest sampled."""
        raw = logits.clone() if any(s.params.logprobs is not None for s in seqs) else None
        keep = []
        for i, seq in enumerate(seqs):
            params = seq.params
            try:
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
                keep.append(i)
            except Exception as e:
                self._fail(seq, e, touched)
        seqs_kept = [seqs[i] for i in keep]
        if len(keep) != len(seqs):
            logits = logits[keep]
        try:
            tokens = sample(logits, [s.params for s in seqs_kept], [s.generator for s in seqs_kept]).tolist()
        except Exception:  # find the row(s) that raise
            tokens = []
            for j, seq in enumerate(seqs_kept):
                try:
                    tokens.append(int(sample(logits[j:j + 1], [seq.params], [seq.generator])[0]))
                except Exception as e:
                    self._fail(seq, e, touched)
                    tokens.append(None)
        out: dict[Sequence, int] = {}
        for j, (i, seq) in enumerate(zip(keep, seqs_kept)):
            if tokens[j] is None or seq.is_finished:
                continue
            try:
                if seq.params.logprobs is not None:
                    entry = top_logprobs(raw[i:i + 1].log_softmax(-1), [tokens[j]], seq.params.logprobs)[0]
                    seq.logprobs = (seq.logprobs or []) + [entry]
                    seq.cumulative_logprob += entry[tokens[j]]
                out[seq] = tokens[j]
            except Exception as e:
                self._fail(seq, e, touched)
        return out

    def _request_output(self, req: _Request) -> RequestOutput:
        if req.seqs[0].pooler is not None:
            finished = req.seqs[0].is_finished
            if finished:
                self.requests.pop(req.request_id, None)
            return req.seqs[0].pooler.output(req.request_id, req.prompt, req.prompt_ids, finished, req.error,
                                              req.error_is_input)
        outs = [CompletionOutput(s.index, s.output.text[: s.output.emitted], s.output.token_ids[:], s.output.finish_reason,
                                 s.cumulative_logprob if s.logprobs is not None else None,
                                 s.logprobs[:] if s.logprobs is not None else None) for s in req.seqs]
        finished = all(s.is_finished for s in req.seqs)
        if finished:
            self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, finished, req.seqs[0].prompt_logprobs,
                             req.error, req.error_is_input)

    # ---- offline convenience ------------------------------------------------------------
    def generate(self, prompts: list[PromptType], params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False, adapter: str | list[str | None] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; `adapter` names a LoRA adapter for all prompts or one per prompt."""
        from tqdm.auto import tqdm

        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        adapters = [self.adapter_id(a) for a in (adapter if isinstance(adapter, list) else [adapter] * len(prompts))]
        if len(adapters) != len(prompts):
            raise RequestError(f"{len(adapters)} adapter names were given for {len(prompts)} prompts")
        reqs = [self.validate(p, sp) for p, sp in zip(prompts, plist)]  # all or nothing: reject before queueing
        ids = [f"gen-{next(self._seq_ids)}" for _ in prompts]
        for rid, req, a in zip(ids, reqs, adapters):
            self.add_request(rid, req, adapter_id=a)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(prompts), desc="generating", disable=not use_tqdm)
        while self.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [results[r] for r in ids]

