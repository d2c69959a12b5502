"""The pretraining objective: next-token CE + λ·MTP CE (+ α·sequence-wise balance loss).

Windows are packed documents: attention is causal *within* each document (`doc_ids`), positions
restart per document, and a multi-token-prediction target is dropped whenever the input token
or the target lies in a different document from the hidden state it is predicted from.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from dsv3.data.packing import IGNORE_INDEX, PackedBatch
from dsv3.models.interface import CausalLM
from dsv3.attention.context import AttentionContext
from dsv3.layers.moe import MoE
from dsv3.train.balance import sequence_balance_loss
from dsv3.train.fused_ce import linear_cross_entropy


class Losses(NamedTuple):
    total: torch.Tensor
    main: torch.Tensor
    mtp: torch.Tensor | None
    seq_aux: torch.Tensor | None


def mtp_targets(input_ids: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor, depth: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(next_ids, targets), both [B, T-depth-1], for MTP depth `depth` (0-based).

    At position i the module sees token i+depth+1 and predicts token i+depth+2 (= labels[i+depth+1]);
    both must belong to position i's document.
    """
    s = depth + 1
    next_ids = input_ids[:, s:]
    targets = labels[:, s:].clone()
    targets[doc_ids[:, s:] != doc_ids[:, :-s]] = IGNORE_INDEX
    return next_ids, targets


def head_loss(model: CausalLM, hidden: torch.Tensor, targets: torch.Tensor,
              head_dtype: torch.dtype | None = None) -> torch.Tensor:
    """CE of the LM head on `hidden`: fused and chunked (`linear_cross_entropy`) for a plain
    bias-free head, through the module (LoRA, quantized heads) otherwise."""
    head = model.lm_head
    if type(head) is torch.nn.Linear and head.bias is None:
        return linear_cross_entropy(hidden, head.weight, targets, dtype=head_dtype)
    return F.cross_entropy(head(hidden).float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def pretrain_losses(model: CausalLM, batch: PackedBatch, mtp_lambda: float = 0.0,
                    seq_aux_alpha: float = 0.0, moes: list[MoE] | None = None,
                    head_dtype: torch.dtype | None = None) -> Losses:
    """Forward one packed micro-batch (already on the model's device) and return its losses.

    The MTP term is the mean over depths; it is computed (and logged) even when λ = 0 so
    that its curve is comparable, but then contributes nothing to the gradient. `head_dtype`
    is the LM head's matmul dtype (None: the hidden states').
    """
    ids, labels, pos, docs = batch
    hidden = model.hidden_states(ids, pos, AttentionContext.causal(doc_ids=docs))
    main = head_loss(model, hidden, labels, head_dtype)
    total, mtp = main, None
    n_mtp = model.num_mtp_layers
    if n_mtp:
        terms, h = [], hidden
        for k in range(n_mtp):
            T = h.shape[1] - 1
            next_ids, targets = mtp_targets(ids, labels, docs, k)
            h = model.mtp_hidden(h[:, :T], next_ids, pos[:, :T], AttentionContext.causal(doc_ids=docs[:, :T]), k)
            terms.append(head_loss(model, h, targets, head_dtype))
        mtp = torch.stack(terms).mean()
        total = total + mtp_lambda * mtp if mtp_lambda else total + 0.0 * mtp
    seq_aux = None
    if seq_aux_alpha > 0:
        seq_aux = sequence_balance_loss(moes or [], ids.shape[0])
        total = total + seq_aux_alpha * seq_aux
    return Losses(total, main, mtp, seq_aux)


@torch.no_grad()
def heldout_loss(model: CausalLM, batches, device: torch.device, autocast) -> tuple[float, int]:
    """Mean next-token CE (nats/token) over `batches` and the number of scored tokens."""
    total, count = 0.0, 0
    for batch in batches:
        ids, labels, pos, docs = (t.to(device) for t in batch)
        with autocast():
            logits = model(ids, pos, AttentionContext.causal(doc_ids=docs))
        total += float(F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum"))
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1), count
