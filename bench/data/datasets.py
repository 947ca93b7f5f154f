"""The two shapes data takes for training: fixed examples (tasks) and token streams (text, Markov).

Batches are a pure function of (seed, step): a resumed run draws exactly the batches it would have
drawn, and every variant of a study with the same seed sees the same data. Validation batches are
fixed by the dataset alone, so every run is evaluated on exactly the same tokens.

Training goes through the data in epochs: each epoch is a seeded permutation of the training
examples (tasks) or of non-overlapping windows (streams, on a grid shifted by a seeded offset each
epoch), so no example or token is seen twice before every one has been seen once. Until then
(``single_pass_steps``) each batch's loss, taken before the update, is a loss on unseen data: the
online loss is a held-out measure.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs (B, T), targets (B, T) with -1 = no loss
CALIBRATION_STREAM = 1  # (seed, 0, 1) seeds calibration windows
EPOCH_STREAM = 2  # (seed, epoch, 2) seeds an epoch's order of training examples and its window grid


@dataclass
class Dataset:
    vocab_size: int
    kind: Literal["task", "text", "markov", "tokens"]
    seq_len: int | None  # fixed by the data (tasks), or None: any window length
    fingerprint: dict = field(default_factory=dict)  # source hash, tokenizer, sizes: stored with results
    loss_floor: float | None = None  # the best achievable loss in nats (Markov entropy rate)
    token_bytes: np.ndarray | None = None  # UTF-8 bytes of each token id, for bits per byte

    def val_batches(self, n_sequences: int | None, seq_len: int, chunk: int) -> list[Batch]:
        """The fixed validation set: n_sequences windows (None: all there are, or a default), in
        batches of `chunk` sequences. Chunking never changes which tokens are evaluated."""
        raise NotImplementedError

    def calibration_batch(self, seed: int, n_sequences: int, seq_len: int) -> torch.Tensor:
        """(n_sequences, seq_len) token ids from the training split, fixed by `seed` and drawn from a
        stream of their own (no training step's batch), for calibrating post-training quantization."""
        return self._draw(np.random.default_rng([seed, 0, CALIBRATION_STREAM]), n_sequences, seq_len)[0]

    def _draw(self, rng: np.random.Generator, batch_size: int, seq_len: int) -> Batch:
        raise NotImplementedError

    def examples_per_epoch(self, seq_len: int) -> int:
        """How many training examples (task rows, or windows of seq_len + 1 tokens) one epoch holds."""
        raise NotImplementedError

    def _examples(self, epoch: int, positions: np.ndarray, seed: int, seq_len: int) -> Batch:
        """The examples at `positions` of `epoch`'s order."""
        raise NotImplementedError

    def train_batch(self, step: int, seed: int, batch_size: int, seq_len: int) -> Batch:
        """Training step `step`'s batch for `seed`: the same for every run with that seed. Examples
        step·batch_size onwards of the seed's sequence of epochs."""
        self.check_seq_len(seq_len)
        per_epoch = self.examples_per_epoch(seq_len)
        index = step * batch_size + np.arange(batch_size)
        parts = [self._examples(int(e), index[index // per_epoch == e] % per_epoch, seed, seq_len)
                 for e in np.unique(index // per_epoch)]  # a batch may straddle two epochs
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    def single_pass_steps(self, batch_size: int, seq_len: int) -> int:
        """Steps whose batches hold only examples not seen before (the first epoch's whole batches)."""
        return self.examples_per_epoch(seq_len) // batch_size

    def check_seq_len(self, seq_len: int) -> None:
        if self.seq_len is not None and seq_len != self.seq_len:
            raise ValueError(f"this {self.kind} data has sequences of {self.seq_len} tokens, not {seq_len}")


@functools.lru_cache(maxsize=4)
def _order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Epoch `epoch`'s permutation of n examples for `seed`."""
    return np.random.default_rng([seed, epoch, EPOCH_STREAM]).permutation(n)


def _tensors(x: np.ndarray, y: np.ndarray) -> Batch:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)), torch.from_numpy(
        np.ascontiguousarray(y, dtype=np.int64)
    )


@dataclass
class ExampleDataset(Dataset):
    """Fixed train and test examples (N, T); training samples rows with replacement."""

    train: tuple[np.ndarray, np.ndarray] = None
    test: tuple[np.ndarray, np.ndarray] = None

    def _draw(self, rng, batch_size, seq_len):
        self.check_seq_len(seq_len)
        rows = rng.integers(0, len(self.train[0]), batch_size)
        return _tensors(self.train[0][rows], self.train[1][rows])

    def examples_per_epoch(self, seq_len):
        return len(self.train[0])

    def _examples(self, epoch, positions, seed, seq_len):
        rows = _order(seed, epoch, len(self.train[0]))[positions]
        return _tensors(self.train[0][rows], self.train[1][rows])

    def val_batches(self, n_sequences, seq_len, chunk):
        self.check_seq_len(seq_len)
        n = len(self.test[0]) if n_sequences is None else min(len(self.test[0]), n_sequences)
        return [_tensors(self.test[0][i : min(i + chunk, n)], self.test[1][i : min(i + chunk, n)])
                for i in range(0, n, chunk)]


@dataclass
class StreamDataset(Dataset):
    """A token stream split into train and val; windows of any length are cut from it.

    doc_len: the stream is made of independent documents of this length (Markov chains); windows
    never cross a document boundary.
    """

    train_tokens: np.ndarray = None
    val_tokens: np.ndarray = None
    doc_len: int | None = None

    def _offsets(self, tokens: np.ndarray, seq_len: int, count: int, rng: np.random.Generator | None) -> np.ndarray:
        span = self.doc_len or len(tokens)
        if span <= seq_len:
            raise ValueError(f"windows of {seq_len + 1} tokens do not fit in {span} tokens of {self.kind} data")
        if rng is None:  # validation: evenly spaced, the same for every run
            flat = np.linspace(0, len(tokens) // span * (span - seq_len - 1) - 1, count).astype(np.int64)
        else:
            flat = rng.integers(0, len(tokens) // span * (span - seq_len - 1), count)
        doc, within = np.divmod(flat, span - seq_len - 1)
        return doc * span + within

    def _windows(self, tokens: np.ndarray, offsets: np.ndarray, seq_len: int) -> Batch:
        windows = np.stack([np.asarray(tokens[o : o + seq_len + 1]) for o in offsets])
        return _tensors(windows[:, :-1], windows[:, 1:])

    def _draw(self, rng, batch_size, seq_len):
        return self._windows(self.train_tokens, self._offsets(self.train_tokens, seq_len, batch_size, rng), seq_len)

    def _grid(self, seq_len: int) -> tuple[int, int, int]:
        """(span, documents, windows per document) of the epoch grid: windows of seq_len + 1 tokens
        every seq_len tokens (targets do not overlap), as many as fit at any offset below seq_len."""
        span = self.doc_len or len(self.train_tokens)
        per_document = (span - seq_len) // seq_len
        if per_document < 1:
            raise ValueError(f"windows of {seq_len + 1} tokens do not fit in {span} tokens of {self.kind} data")
        return span, len(self.train_tokens) // span, per_document

    def examples_per_epoch(self, seq_len):
        _, documents, per_document = self._grid(seq_len)
        return documents * per_document

    def _examples(self, epoch, positions, seed, seq_len):
        span, documents, per_document = self._grid(seq_len)
        shift = np.random.default_rng([seed, epoch, EPOCH_STREAM, 1]).integers(0, seq_len)
        windows = _order(seed, epoch, documents * per_document)[positions]
        document, within = np.divmod(windows, per_document)
        return self._windows(self.train_tokens, document * span + shift + within * seq_len, seq_len)

    def val_batches(self, n_sequences, seq_len, chunk):
        offsets = self._offsets(self.val_tokens, seq_len, n_sequences or 256, None)
        return [self._windows(self.val_tokens, offsets[i : i + chunk], seq_len) for i in range(0, len(offsets), chunk)]
