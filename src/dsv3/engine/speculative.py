"""MTP speculative decoding: the model's own multi-token-prediction module drafts, one forward verifies.

MTP pair i combines the main model's hidden state h_i with token x_{i+1} (at position i) and
predicts x_{i+2}. Each decoding sequence keeps the hidden states the MTP module has not consumed
yet; a step first runs the MTP module over them (filling its latent cache with exact inputs) and
drafts k tokens by chaining the module on its own output, then the main model scores
[last token, drafts] in one chunk. Greedy requests accept drafts while they equal the argmax, so
the output is identical to plain decoding; sampled requests use rejection sampling, which keeps
the target distribution exactly.

Greedy decoding steps take a faster road once a sequence is drafted: one native call
(`ModelRunner.execute_spec`, `dsv3::mtp_step`) verifies, accepts, and runs the MTP module on the
accepted pairs to draft the next step's tokens (kept in `Sequence.spec_draft`), so a step is one
call and no hidden states wait in Python. The general path above catches a sequence up (after its
prompt, or a step that mixed in other work) and takes the ready drafts as its own.

Each request keeps its own acceptance; once it has drafted `MIN_DRAFTS` tokens and accepts fewer
than `min_acceptance` of them, it decodes without drafts from then on (k = 0). Below the break-even
a speculative step costs more than the tokens it saves: bench/mtp_bound.py measures it (the native
call's cost in plain forwards, minus one: 0.21 for k=1 on the embedded model); the engine's default
threshold, 0.3, sits above it for margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.engine.sequence import Sequence
from dsv3.engine.sampling import SamplingParams, filter_logits


@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None  # [k, V] draft distributions (None for greedy)


def supports_speculation(params: SamplingParams) -> bool:
    """Speculation needs a plain distribution: no penalties, processors or per-token logprobs."""
    return (params.repetition_penalty == 1 and not params.presence_penalty and not params.frequency_penalty
            and not params.logits_processors and params.logprobs is None and params.min_tokens == 0)


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    return filter_logits(logits.float(), [params] * logits.shape[0]).softmax(-1)


def propose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[int, torch.Tensor | None]:
    """One draft token from MTP logits [V]: argmax when greedy, else a draw from q (returned too)."""
    if params.greedy:
        return int(logits.argmax()), None
    q = target_probs(logits[None], params)[0]
    return int(torch.multinomial(q, 1, generator=generator)), q


def verify(seq: Sequence, draft: Draft, logits: torch.Tensor) -> list[int]:
    """Accepted drafts plus one token from the target: logits [k+1, V] score [last token, drafts]."""
    params, k = seq.params, len(draft.tokens)
    if params.greedy:
        target = logits.argmax(-1).tolist()
        out = []
        for i in range(k):
            if draft.tokens[i] != target[i]:
                break
            out.append(draft.tokens[i])
        return out + [target[len(out)]]
    p = target_probs(logits, params)
    out = []
    for i, tok in enumerate(draft.tokens):
        q = draft.probs[i]
        u = torch.rand((), generator=seq.generator)
        if float(u) * float(q[tok]) <= float(p[i, tok]):  # accept with probability min(1, p/q)
            out.append(tok)
            continue
        residual = (p[i] - q).clamp(min=0)
        total = residual.sum()
        dist = residual / total if total > 0 else p[i]
        return out + [int(torch.multinomial(dist, 1, generator=seq.generator))]
    return out + [int(torch.multinomial(p[k], 1, generator=seq.generator))]


class SpecStats:
    """Acceptance counts per draft position (position j accepted only if 0..j-1 were)."""

    def __init__(self, k: int):
        self.drafted = [0] * k
        self.accepted = [0] * k

    def record(self, num_drafts: int, num_accepted: int) -> None:
        for j in range(num_drafts):
            self.drafted[j] += 1
            self.accepted[j] += j < num_accepted

    @property
    def acceptance_rate(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]

    @property
    def mean_accepted(self) -> float:
        steps = self.drafted[0] if self.drafted else 0
        return sum(self.accepted) / steps if steps else 0.0


MIN_DRAFTS = 32  # drafts a request makes before its acceptance can switch speculation off for it


class MTPDrafter:
    """Runs the MTP module for the decoding sequences of a step and returns their drafts."""

    def __init__(self, runner, block_manager, num_speculative_tokens: int, max_model_len: int,
                 min_acceptance: float = 0.0):
        self.runner, self.bm = runner, block_manager
        self.k, self.max_model_len = num_speculative_tokens, max_model_len
        self.min_acceptance = min_acceptance
        self.stats = SpecStats(num_speculative_tokens)
        self.switched_off = 0  # requests whose acceptance fell below min_acceptance

    def record(self, seq: Sequence, drafted: int, accepted: int) -> None:
        """Count a verified draft for the step's statistics and the request's own acceptance."""
        self.stats.record(drafted, accepted)
        seq.spec_drafted += drafted
        seq.spec_accepted += accepted
        if (not seq.spec_off and seq.spec_drafted >= MIN_DRAFTS
                and seq.spec_accepted < self.min_acceptance * seq.spec_drafted):
            seq.spec_off = True
            seq.spec_draft = None
            self.switched_off += 1

    def keep_hidden(self, seq: Sequence, start: int, hidden: torch.Tensor) -> None:
        """Remember main-model hidden states of newly computed positions for the MTP module (not for a request that
        no longer drafts: nothing would consume them)."""
        if seq.spec_off or not supports_speculation(seq.params):
            return
        if seq.mtp_pending is None:
            seq.mtp_done, seq.mtp_pending = start, hidden
        else:
            seq.mtp_pending = torch.cat([seq.mtp_pending, hidden])

    def _eligible(self, chunk) -> int:
        seq = chunk.seq
        if seq.spec_off:
            return 0
        if seq.spec_draft is not None and seq.mtp_done == chunk.start and chunk.num_tokens == 1 and chunk.completes:
            left = seq.output.max_new - seq.num_output_tokens
            return max(0, min(len(seq.spec_draft), left - 1, self.max_model_len - 1 - chunk.start))
        if not (chunk.num_tokens == 1 and chunk.start > seq.mtp_done and chunk.completes and seq.mtp_pending is not None
                and seq.mtp_pending.shape[0] == chunk.start - seq.mtp_done and supports_speculation(seq.params)):
            return 0
        left = seq.output.max_new - seq.num_output_tokens
        return max(0, min(self.k, left - 1, self.max_model_len - 1 - chunk.start))

    def draft(self, chunks) -> dict[Sequence, Draft]:
        from dsv3.engine.runner import StepItem

        plan, drafts = [], {}
        for c in chunks:
            k = self._eligible(c)
            ready, c.seq.spec_draft = c.seq.spec_draft, None  # a ready draft is used now or not at all
            if not k or not self.bm.ensure_slots(c.seq, 1 + k):
                continue
            if ready is not None:  # drafted by the previous step's native call
                drafts[c.seq] = Draft(ready[:k], None)
            else:
                plan.append((c, k))
        if not plan:
            return drafts
        items = [StepItem(c.seq.token_ids[c.seq.mtp_done + 1:c.start + 1], c.seq.mtp_done, c.seq.block_table, sample=True,
                          state_slot=c.seq.state_slot) for c, _ in plan]
        hidden, logits = self.runner.execute_mtp(items, torch.cat([c.seq.mtp_pending for c, _ in plan]))
        ends = torch.tensor([len(it.token_ids) for it in items]).cumsum(0) - 1
        last = hidden[ends]
        for i, (c, _) in enumerate(plan):
            tok, q = propose(logits[i], c.seq.params, c.seq.generator)
            drafts[c.seq] = Draft([tok], None if q is None else [q])
            c.seq.mtp_done, c.seq.mtp_pending = c.start, c.seq.mtp_pending[:0]  # consumed (the main model's width)
        for j in range(1, max(k for _, k in plan)):
            active = [(i, c) for i, (c, k) in enumerate(plan) if k > j]
            items = [StepItem([drafts[c.seq].tokens[-1]], c.start - 1 + j, c.seq.block_table, sample=True,
                              state_slot=c.seq.state_slot) for _, c in active]
            h, logits = self.runner.execute_mtp(items, torch.stack([last[i] for i, _ in active]))
            for row, (i, c) in enumerate(active):
                last[i] = h[row]
                tok, q = propose(logits[row], c.seq.params, c.seq.generator)
                drafts[c.seq].tokens.append(tok)
                if q is not None:
                    drafts[c.seq].probs.append(q)
        for d in drafts.values():
            d.probs = torch.stack(d.probs) if d.probs else None
        return drafts

    # ---- the native greedy step -------------------------------------------------------------
    def fusable(self, chunks) -> bool:
        """Whether a step of `chunks` can run as one native speculative call: every chunk decodes one token of a
        greedy request that drafts (not switched off), with room for k more tokens in its output and 2k positions
        in the model, and blocks for them."""
        k = self.k
        for c in chunks:
            seq = c.seq
            if (c.num_tokens != 1 or not c.completes or seq.spec_off or seq.pooler is not None or seq.adapter_id
                    or not seq.params.greedy or not supports_speculation(seq.params)
                    or seq.output.max_new - seq.num_output_tokens - 1 < k or c.start + 2 * k > self.max_model_len):
                return False
            if seq.spec_draft is None and not (c.start > seq.mtp_done and seq.mtp_pending is not None
                                               and seq.mtp_pending.shape[0] == c.start - seq.mtp_done):
                return False  # neither drafted nor able to catch up
        return all(self.bm.ensure_slots(c.seq, 2 * k) for c in chunks)

    def catch_up(self, chunks) -> None:
        """Draft (general path) the sequences that have no ready draft yet, so every chunk enters the native step
        with one; a sequence that gets no draft keeps none (the caller then takes the general path)."""
        need = [c for c in chunks if c.seq.spec_draft is None]
        if need:
            for seq, d in self.draft(need).items():
                seq.spec_draft = d.tokens if len(d.tokens) == self.k else None
