"""Log-probabilities reported with outputs: sampled tokens (`logprobs`) and prompt tokens (`prompt_logprobs`)."""

from __future__ import annotations

import torch


class TokenLogprobs(dict):
    """{token id: log-prob} at one position (the chosen or prompt token, then the top-k), plus `rank`: that
    token's 1-based rank in the whole distribution (vLLM's `Logprob.rank`)."""

    __slots__ = ("rank",)


def top_logprobs(logprobs: torch.Tensor, targets: list[int], k: int) -> list[dict[int, float]]:
    """Per row: the target token's log-prob and the top-k alternatives (OpenAI's `top_logprobs`)."""
    out = []
    top = logprobs.topk(k, dim=-1) if k else None
    ranks = (logprobs > logprobs.gather(1, torch.tensor(targets, device=logprobs.device)[:, None])).sum(-1) + 1
    for i, t in enumerate(targets):
        entry = TokenLogprobs({int(t): float(logprobs[i, t])})
        entry.rank = int(ranks[i])
        if top is not None:
            entry.update({int(j): float(v) for j, v in zip(top.indices[i], top.values[i])})
        out.append(entry)
    return out


def collect_prompt_logprobs(model, chunks, items, hidden: torch.Tensor) -> None:
    """For sequences asking for prompt logprobs: log p(prompt token | earlier tokens) as each chunk is computed.

    Their prompts bypass the prefix cache (a cached token has no logits), so every position is seen.
    """
    offset = 0
    for c, it in zip(chunks, items):
        seq, n = c.seq, c.num_tokens
        k = seq.params.prompt_logprobs
        if k is not None and c.start < seq.num_prompt_tokens:
            if seq.prompt_logprobs is None:
                seq.prompt_logprobs = [None]
            end = min(c.start + n, seq.num_prompt_tokens - 1)  # predicts tokens start+1 .. end
            if end > c.start:
                lp = model.lm_head(hidden[offset:offset + end - c.start]).float().log_softmax(-1)
                seq.prompt_logprobs.extend(top_logprobs(lp, seq.token_ids[c.start + 1:end + 1], k))
        offset += len(it.token_ids)
