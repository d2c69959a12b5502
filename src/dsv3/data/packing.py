"""Sequence packing with document boundaries, and the fill-in-the-middle (FIM) transform.

Each epoch shuffles the documents of a split, applies FIM to a seeded `fim_rate` share of them
and concatenates the result into one stream that is cut into windows of `seq_len + 1` tokens
(stride `seq_len`, so every token is a label exactly once). Samples read the windows in a seeded
order (a permutation per block of one epoch's worth of windows), so the rows of a batch come from
different files: consecutive windows would make each batch one or two files and the gradient as
noisy as a batch that size. Everything about a window follows from (seed, sample index): document
lengths are known up front (FIM adds exactly three sentinels), so the trainer's step counter is
the whole state and resume is exact.

FIM comes at one of three levels. `document` transforms whole files before packing (as DeepSeek-Coder,
whose 16K windows hold whole files); when files are much longer than a window, prefix, suffix and
middle land in different windows and the model rarely sees all three together. `context` (Bavarian
et al. 2022, "Efficient Training of Language Models to Fill in the Middle") transforms each file
piece of a packed window after packing and cuts the result back to the window's length, so every
FIM example is complete within its window and its prefix may start mid-file, as an editor's does.
`line` is `context` with the cut made in the decoded text at a line (or from a cursor to its end) and
prefix, suffix and middle tokenized apart (`dsv3.data.fim.fim_lines_context`), the way an infill request's
prompt is built; it needs the tokenizer (`dsv3.io.tokenizer.Tokenizer`).
`DataMix` builds batches whose rows come from several shard sets in fixed shares.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dsv3.data.fim import FIMTokens, fim_context, fim_lines_context, fim_transform
from dsv3.data.shards import DataError, TokenShards

IGNORE_INDEX = -100
_ORDER, _FIM, _SPLIT, _WINDOWS, _CONTEXT = 1, 2, 3, 4, 5  # tags that keep the seeded random streams independent


class PackedBatch(NamedTuple):
    """`[batch, seq_len]` int64 tensors; `labels` is `input_ids` shifted left by one."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor


def boundaries(inputs: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(position_ids, doc_ids): a new document starts at the window start and after every EOS;
    positions restart at 0 there and the document id goes up by one."""
    starts = np.zeros(len(inputs), dtype=bool)
    starts[0] = True
    starts[1:] = inputs[:-1] == eos_id
    doc_ids = np.cumsum(starts) - 1
    position_ids = np.arange(len(inputs)) - np.flatnonzero(starts)[doc_ids]
    return position_ids, doc_ids


class _Epoch(NamedTuple):
    order: np.ndarray  # document ids in stream order
    fim: np.ndarray    # per document id: FIM applied this epoch
    cum: np.ndarray    # stream offset of each position of `order` (len = docs + 1)


class PackedDataset(IterableDataset):
    """Yields `PackedBatch`es for steps `start_step, start_step + 1, ...` forever.

    Sample `(step * world_size + rank) * batch_size + j` is batch row `j`, so ranks read
    disjoint windows. With DataLoader workers (use `batch_size=None` on the loader) worker `w`
    produces steps `w, w + n, ...` and the loader's round-robin restores the order.
    """

    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int = 1, seed: int = 0,
                 shuffle: bool = True, fim_rate: float = 0.0, fim_tokens: FIMTokens | None = None,
                 rank: int = 0, world_size: int = 1, start_step: int = 0, mask_eos_label: bool = True,
                 fim_level: str = "document", tokenizer=None):
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len {seq_len} and batch_size {batch_size} must be positive.")
        if not 0.0 <= fim_rate <= 1.0:
            raise DataError(f"fim_rate {fim_rate} must be in [0, 1].")
        if fim_rate > 0 and fim_tokens is None:
            raise DataError("fim_rate > 0 needs the FIM sentinel ids (fim_tokens).")
        if fim_level not in ("document", "context", "line"):
            raise DataError(f"fim_level {fim_level!r} must be document, context or line.")
        if fim_level == "line" and fim_rate > 0 and tokenizer is None:
            raise DataError("fim_level line needs the tokenizer (a dsv3.io.tokenizer.Tokenizer) to cut the text at lines.")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}.")
        self.shards, self.seq_len, self.batch_size, self.seed = shards, seq_len, batch_size, seed
        self.shuffle, self.fim_rate, self.fim_tokens, self.fim_level = shuffle, fim_rate, fim_tokens, fim_level
        self.tokenizer = tokenizer  # fim_level line: decodes pieces and encodes their cut parts
        self.rank, self.world_size, self.step, self.mask_eos_label = rank, world_size, start_step, mask_eos_label
        self.eos_id = shards.eos_id
        starts, ends = shards.doc_bounds()
        self.doc_starts, self.doc_lens = starts, ends - starts
        self._epoch_starts = [0]
        self._epochs: OrderedDict[int, _Epoch] = OrderedDict()
        self._docs: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._window_orders: OrderedDict[int, np.ndarray] = OrderedDict()

    # -- the stream ------------------------------------------------------------------------
    def _fim_mask(self, epoch: int) -> np.ndarray:
        if self.fim_rate == 0.0 or self.fim_level != "document":
            return np.zeros(len(self.doc_lens), dtype=bool)
        return np.random.default_rng([self.seed, _FIM, epoch]).random(len(self.doc_lens)) < self.fim_rate

    def _epoch(self, epoch: int) -> _Epoch:
        if epoch not in self._epochs:
            n = len(self.doc_lens)
            order = np.random.default_rng([self.seed, _ORDER, epoch]).permutation(n) if self.shuffle else np.arange(n)
            fim = self._fim_mask(epoch)
            lens = self.doc_lens[order] + 3 * fim[order]
            self._epochs[epoch] = _Epoch(order, fim, np.concatenate([[0], np.cumsum(lens)]))
            if len(self._epochs) > 4:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def epoch_tokens(self, epoch: int) -> int:
        """Length of epoch `epoch` of the stream: the split plus three sentinels per FIM document."""
        return int(self.doc_lens.sum() + 3 * self._fim_mask(epoch).sum())

    def _locate(self, offset: int) -> tuple[int, int]:
        """(epoch, offset inside that epoch) of a global stream offset."""
        while self._epoch_starts[-1] <= offset:
            e = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + self.epoch_tokens(e))
        e = bisect_right(self._epoch_starts, offset) - 1
        return e, offset - self._epoch_starts[e]

    def _fim_doc(self, epoch: int, doc: int) -> np.ndarray:
        key = (epoch, doc)
        if key not in self._docs:
            tokens = self.shards.window(int(self.doc_starts[doc]), int(self.doc_lens[doc]))
            rng = np.random.default_rng([self.seed, _SPLIT, epoch, doc])
            head = 1 if self.shards.bos_id is not None and tokens[0] == self.shards.bos_id else 0  # BOS stays first
            self._docs[key] = np.concatenate([tokens[:head], fim_transform(tokens[head:-1], rng, self.fim_tokens), tokens[-1:]])
            if len(self._docs) > 8:
                self._docs.popitem(last=False)
        return self._docs[key]

    def stream(self, offset: int, length: int) -> np.ndarray:
        """Tokens `[offset, offset + length)` of the endless epoch-after-epoch stream."""
        pieces = []
        while length > 0:
            e, local = self._locate(offset)
            ep = self._epoch(e)
            k = int(np.searchsorted(ep.cum, local, side="right")) - 1
            doc, within = int(ep.order[k]), local - int(ep.cum[k])
            take = min(length, int(ep.cum[k + 1]) - local)
            if ep.fim[doc]:
                pieces.append(self._fim_doc(e, doc)[within:within + take])
            else:
                pieces.append(self.shards.window(int(self.doc_starts[doc]) + within, take))
            offset, length = offset + take, length - take
        return np.concatenate(pieces)

    # -- windows and batches ---------------------------------------------------------------
    def window_index(self, index: int) -> int:
        """The stream window that sample `index` reads: with `shuffle`, block `b` of samples (one
        epoch's worth of windows, `n`) reads windows `b * n + permutation_b`, so each window is
        still read exactly once while a batch's rows come from anywhere in the split."""
        n = max(1, self.windows_per_epoch())
        if not self.shuffle or n == 1:
            return index
        block, k = divmod(index, n)
        if block not in self._window_orders:
            self._window_orders[block] = np.random.default_rng([self.seed, _WINDOWS, block]).permutation(n)
            if len(self._window_orders) > 2:
                self._window_orders.popitem(last=False)
        return block * n + int(self._window_orders[block][k])

    def sample(self, index: int) -> tuple[np.ndarray, ...]:
        """(input_ids, labels, position_ids, doc_ids) of sample `index` as numpy arrays."""
        w = self.window_index(index)
        window = self.stream(w * self.seq_len, self.seq_len + 1)
        if self.fim_level != "document" and self.fim_rate > 0:
            rng = np.random.default_rng([self.seed, _CONTEXT, w])
            args = (window, rng, self.fim_rate, self.fim_tokens, self.eos_id, self.shards.bos_id)
            window = fim_context(*args) if self.fim_level == "context" else fim_lines_context(*args, self.tokenizer)
        inputs, labels = window[:-1], window[1:].copy()
        if self.mask_eos_label:
            labels[inputs == self.eos_id] = IGNORE_INDEX  # never predict across a boundary
        position_ids, doc_ids = boundaries(inputs, self.eos_id)
        return inputs, labels, position_ids, doc_ids

    def batch(self, step: int) -> PackedBatch:
        first = (step * self.world_size + self.rank) * self.batch_size
        rows = [self.sample(first + j) for j in range(self.batch_size)]
        return PackedBatch(*(torch.from_numpy(np.stack(col)).long() for col in zip(*rows)))

    def windows_per_epoch(self) -> int:
        """Whole windows in one pass over the split without FIM (e.g. for held-out eval)."""
        return (int(self.doc_lens.sum()) - 1) // self.seq_len

    def eval_batches(self) -> Iterator[PackedBatch]:
        """One pass over the first epoch in order of window index; the last batch may be short."""
        n = self.windows_per_epoch()
        for first in range(0, n, self.batch_size):
            rows = [self.sample(i) for i in range(first, min(n, first + self.batch_size))]
            yield PackedBatch(*(torch.from_numpy(np.stack(col)).long() for col in zip(*rows)))

    def __iter__(self) -> Iterator[PackedBatch]:
        info = get_worker_info()
        if info is None:
            while True:
                batch = self.batch(self.step)
                self.step += 1
                yield batch
        step = self.step + info.id
        while True:
            yield self.batch(step)
            step += info.num_workers

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "batch_size", "world_size"):
            if state[key] != getattr(self, key):
                raise DataError(f"cannot resume: the checkpoint's data {key} is {state[key]}, this run's is {getattr(self, key)}.")
        self.step = int(state["step"])


class DataMix:
    """Batches whose rows come from several `PackedDataset`s: source i gives its own `batch_size`
    rows of every step (the shares of a `mix`), so the mix, like each source, is a pure function of
    the step and resume stays exact."""

    def __init__(self, sources: list[PackedDataset]):
        if not sources:
            raise DataError("a data mix needs at least one source.")
        self.sources = sources

    @property
    def step(self) -> int:
        return self.sources[0].step

    @step.setter
    def step(self, value: int) -> None:
        for s in self.sources:
            s.step = value

    def batch(self, step: int) -> PackedBatch:
        parts = [s.batch(step) for s in self.sources]
        return PackedBatch(*(torch.cat(col) for col in zip(*parts)))

    def state_dict(self) -> dict:
        return {"step": self.step, "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        got = state.get("sources", [state])
        if len(got) != len(self.sources):
            raise DataError(f"cannot resume: the checkpoint's data mix has {len(got)} sources, this run's has {len(self.sources)}.")
        for s, st in zip(self.sources, got):
            s.load_state_dict(st)
