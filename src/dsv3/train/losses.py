"""The pretraining objective: next-token CE + λ·MTP CE (+ α·sequence-wise balance loss).

Windows are packed documents: attention is causal *within* each document (`doc_ids`), positions
restart per document, and a multi-token-prediction target is dropped whenever the input token
or the target lies in a different document from the hidden state it is predicted from. With
`doc_mask=False` a window is one sequence instead (positions 0..T-1, attention across the documents
packed in it, as DeepSeek-V3 pretrained: "document packing ... without cross-sample attention
masking"); V4's compressed attention needs that, its entries follow token positions of one sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.data.packing import IGNORE_INDEX, PackedBatch
from dsv3.models.interface import CausalLM
from dsv3.attention.context import AttentionContext
from dsv3.layers.moe import LoadTracking
from dsv3.train.balance import sequence_balance_loss
from dsv3.train.fused_ce import linear_cross_entropy


class Losses(NamedTuple):
    total: torch.Tensor
    main: torch.Tensor
    mtp: torch.Tensor | None
    seq_aux: torch.Tensor | None
    index: torch.Tensor | None = None  # sparse attention's indexer objective, summed over layers (V4 CSA)


def index_layers(model: nn.Module) -> list[nn.Module]:
    """Attention layers that report an indexer objective after a training forward (`index_loss`)."""
    return [m for m in model.modules() if hasattr(m, "index_loss") and getattr(m, "indexer", None) is not None]


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


def window_inputs(batch: PackedBatch, doc_mask: bool = True) -> tuple[torch.Tensor, AttentionContext | None, torch.Tensor]:
    """(positions, attention context, doc ids) the model sees for a packed batch: per document, or (`doc_mask=False`)
    each row as one sequence from position 0, with no mask (every token in one "document")."""
    ids, _, pos, docs = batch
    if doc_mask:
        return pos, AttentionContext.causal(doc_ids=docs), docs
    T = ids.shape[1]
    return torch.arange(T, device=ids.device).expand_as(ids), None, torch.zeros_like(docs)


def pretrain_losses(model: CausalLM, batch: PackedBatch, mtp_lambda: float = 0.0,
                    seq_aux_alpha: float = 0.0, moes: list[LoadTracking] | None = None,
                    head_dtype: torch.dtype | None = None, doc_mask: bool = True) -> Losses:
    """Forward one packed micro-batch (already on the model's device) and return its losses.

    A model with sparse-attention indexers (V4 CSA) adds their KL objective unweighted: it trains the indexers
    alone, so a weight would only rescale their learning rate.

    The MTP term is the mean over depths; it is computed (and logged) even when λ = 0 so
    that its curve is comparable, but then contributes nothing to the gradient. `head_dtype`
    is the LM head's matmul dtype (None: the hidden states').
    """
    batch = PackedBatch(*batch)
    ids, labels = batch.input_ids, batch.labels
    pos, ctx, docs = window_inputs(batch, doc_mask)
    indexed = index_layers(model)
    for m in indexed:
        m.index_loss = None
    hidden, h = model.training_hidden(ids, pos, ctx)
    index = [m.index_loss for m in indexed if m.index_loss is not None]
    index = torch.stack(index).sum() if index else None
    main = head_loss(model, hidden, labels, head_dtype)
    total, mtp = main, None
    n_mtp = model.num_mtp_layers
    if n_mtp:
        terms = []
        for k in range(n_mtp):
            T = h.shape[1] - 1
            next_ids, targets = mtp_targets(ids, labels, docs, k)
            h = model.mtp_hidden(h[:, :T], next_ids, pos[:, :T], AttentionContext.causal(doc_ids=docs[:, :T]) if doc_mask
                                 else None, k)
            terms.append(head_loss(model, model.mtp_head_hidden(h, k), targets, head_dtype))
        mtp = torch.stack(terms).mean()
        total = total + mtp_lambda * mtp if mtp_lambda else total + 0.0 * mtp
    seq_aux = None
    if seq_aux_alpha > 0:
        seq_aux = sequence_balance_loss(moes or [], ids.shape[0])
        total = total + seq_aux_alpha * seq_aux
    if index is not None:  # its gradient reaches the indexers only (their inputs are detached)
        total = total + index
    return Losses(total, main, mtp, seq_aux, index)


@torch.no_grad()
def heldout_loss(model: CausalLM, batches, device: torch.device, autocast, doc_mask: bool = True) -> tuple[float, int]:
    """Mean next-token CE (nats/token) over `batches` and the number of scored tokens."""
    total, count = 0.0, 0
    for batch in batches:
        batch = PackedBatch(*(t.to(device) for t in batch))
        ids, labels = batch.input_ids, batch.labels
        pos, ctx, _ = window_inputs(batch, doc_mask)
        with autocast():
            logits = model(ids, pos, ctx)
        total += float(F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum"))
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1), count
