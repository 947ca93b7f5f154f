"""Synthetic tasks, generated deterministically from a seed and scored on their answer positions.

MAD (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid Architectures") with its baseline
settings as defaults, Zoology's multi-query associative recall (Arora et al. 2023), and induction
copying. Each generator returns ``inputs`` (N, T) and ``answers`` (N, T): the token the model must
predict at each position, -1 where nothing is asked. Logits at position t are compared with
answers[t], as in a language model's shifted targets.
"""

from __future__ import annotations

import itertools
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from bench.data.datasets import ExampleDataset
from bench.data.source import Source

IGNORE = -1


def _rows_choice(rng: np.random.Generator, n: int, low: int, high: int, size: int) -> np.ndarray:
    """n rows of `size` distinct integers from [low, high)."""
    return np.stack([rng.choice(np.arange(low, high), size, replace=False) for _ in range(n)])


def _next_token_targets(sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return sequences[:, :-1], sequences[:, 1:]


def mqar(n: int, rng: np.random.Generator, vocab_size: int, seq_len: int, num_kv_pairs: int,
         power_a: float) -> tuple[np.ndarray, np.ndarray]:
    """Zoology's MQAR: key-value pairs first (keys from the lower half of the vocabulary, values from
    the upper), then each key queried once at a power-law distributed gap; the answer at a query
    is its value. Other positions hold random tokens."""
    context = 2 * num_kv_pairs
    half = vocab_size // 2
    keys = _rows_choice(rng, n, 1, half, num_kv_pairs)  # 0 marks empty query slots below
    values = _rows_choice(rng, n, half, vocab_size, num_kv_pairs)
    kvs = np.stack([keys, values], axis=2).reshape(n, context)
    space = (seq_len - context) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    gaps = np.stack([rng.choice(space, num_kv_pairs, replace=False, p=p / p.sum()) for _ in range(n)])
    queries = np.zeros((n, seq_len - context + 1), dtype=np.int64)
    np.put_along_axis(queries, 2 * gaps, keys, axis=1)
    sequences = np.concatenate([kvs, queries], axis=1)  # (n, seq_len + 1)
    labels = np.full_like(sequences, IGNORE)
    np.put_along_axis(labels, context + 2 * gaps + 1, values, axis=1)
    inputs, answers = sequences[:, :-1].copy(), labels[:, 1:].copy()
    empty = inputs == 0
    inputs[empty] = rng.integers(0, vocab_size, size=int(empty.sum()))
    return inputs, answers


def in_context_recall(n: int, rng: np.random.Generator, vocab_size: int, seq_len: int,
                      noise_vocab_size: int = 0, frac_noise: float = 0.0) -> np.ndarray:
    """MAD's in-context recall: key-value pairs under a per-sequence random map, then a copy prefix
    and a probe key whose value must be recalled. Noise pairs (noisy recall) come from their own
    tokens. Returns the full next-token sequence; the answer is its last token."""
    prefix = vocab_size - 1
    regular = vocab_size - 1 - noise_vocab_size
    n_keys = regular // 2
    pairs = seq_len // 2 - 1
    kv_map = rng.integers(n_keys, regular, size=(n, n_keys))  # the value of each key, per sequence
    keys = rng.integers(0, n_keys, size=(n, pairs))
    values = np.take_along_axis(kv_map, keys, axis=1)
    tokens = np.stack([keys, values], axis=2)  # (n, pairs, 2)
    noise = rng.random((n, pairs)) < frac_noise
    noise[np.arange(n), rng.integers(0, pairs, n)] = False  # at least one real pair
    if frac_noise > 0:
        noise_tokens = rng.integers(regular, regular + noise_vocab_size, size=(n, pairs, 2))
        tokens = np.where(noise[..., None], noise_tokens, tokens)
    pick = np.where(noise, -1.0, rng.random((n, pairs))).argmax(axis=1)  # a real pair to probe
    probe = tokens[np.arange(n), pick]  # (n, 2)
    sequences = np.concatenate([tokens.reshape(n, -1), np.full((n, 1), prefix), probe], axis=1)
    return sequences  # (n, seq_len + 1)


def fuzzy_recall(n: int, rng: np.random.Generator, vocab_size: int, seq_len: int, k_motif_size: int,
                 v_motif_size: int, train: bool) -> tuple[np.ndarray, int]:
    """MAD's fuzzy recall: keys and values are runs of 1..motif_size distinct tokens (test keys at
    the full size); after the copy prefix, a probe key's whole value must be recalled. Sequences are
    left-padded. Returns next-token sequences and, per row, the number of answer tokens."""
    prefix, pad = vocab_size - 1, vocab_size - 2
    regular = vocab_size - 2
    key_vocab, value_vocab = range(regular // 2), range(regular // 2, regular)
    # every run of 1..size distinct tokens, by size (MAD's vocabulary permutations)
    keys = {s: np.array(list(itertools.permutations(key_vocab, s))) for s in range(1, k_motif_size + 1)}
    values = {s: np.array(list(itertools.permutations(value_vocab, s))) for s in range(1, v_motif_size + 1)}
    room = seq_len - 2 * (k_motif_size + v_motif_size)
    sequences = np.full((n, seq_len + 1), pad, dtype=np.int64)
    answer_len = np.zeros(n, dtype=np.int64)
    for row in range(n):
        kv_map: dict[tuple, tuple] = {}
        tokens: list[int] = []
        while len(tokens) < room:
            k_size = int(rng.integers(1, k_motif_size + 1)) if train else k_motif_size
            key = tuple(keys[k_size][rng.integers(len(keys[k_size]))].tolist())
            if key not in kv_map:
                v_size = int(rng.integers(1, v_motif_size + 1))
                kv_map[key] = tuple(values[v_size][rng.integers(len(values[v_size]))].tolist())
            tokens += [*key, *kv_map[key]]
        probe = list(kv_map)[int(rng.integers(len(kv_map)))]
        tokens += [prefix, *probe, *kv_map[probe]]
        sequences[row, -len(tokens):] = tokens
        answer_len[row] = len(kv_map[probe])
    return sequences, answer_len


def selective_copying(n: int, rng: np.random.Generator, vocab_size: int, seq_len: int,
                      num_tokens_to_copy: int) -> tuple[np.ndarray, np.ndarray]:
    """MAD's selective copying: tokens scattered among blanks, then a copy token and blanks at which
    the scattered tokens must be output in order."""
    copy_token, blank = vocab_size - 1, vocab_size - 2
    k = num_tokens_to_copy
    region = seq_len - k - 1
    to_copy = rng.integers(0, vocab_size - 2, size=(n, k))
    slots = np.sort(rng.random((n, region)).argsort(axis=1)[:, :k], axis=1)
    scattered = np.full((n, region), blank)
    np.put_along_axis(scattered, slots, to_copy, axis=1)
    inputs = np.concatenate([scattered, np.full((n, 1), copy_token), np.full((n, k), blank)], axis=1)
    answers = np.full_like(inputs, IGNORE)
    answers[:, region + 1 :] = to_copy
    return inputs, answers


def compression(n: int, rng: np.random.Generator, vocab_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """MAD's compression, as a GPT can be scored on it: random tokens, a compression token, then
    blanks at which the sequence must be reproduced. (MAD decodes the sequence from the compression
    token's output with a separate decoder; here the model itself reconstructs it, looking back.)"""
    comp, blank = vocab_size - 1, vocab_size - 2
    m = (seq_len - 1) // 2
    tokens = rng.integers(0, vocab_size - 2, size=(n, m))
    inputs = np.full((n, seq_len), blank)
    inputs[:, :m], inputs[:, m] = tokens, comp
    answers = np.full_like(inputs, IGNORE)
    answers[:, m : 2 * m] = tokens  # the compression token predicts the first token, blanks the rest
    return inputs, answers


def memorization(n: int, rng: np.random.Generator, vocab_size: int, seq_len: int,
                 kv_map_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MAD's memorization: one fixed key→value map shared by every sequence (a fact table that must
    be stored in the weights); pairs (key, insert token), the value is the answer at the insert token."""
    insert = vocab_size - 1
    regular = vocab_size - 1
    n_keys = regular // 2
    table = np.random.default_rng(kv_map_seed).permutation(np.arange(n_keys, 2 * n_keys))  # key → value
    keys = rng.integers(0, n_keys, size=(n, seq_len // 2))
    inputs = np.stack([keys, np.full_like(keys, insert)], axis=2).reshape(n, -1)
    answers = np.stack([np.full_like(keys, IGNORE), table[keys]], axis=2).reshape(n, -1)
    return inputs, answers


def induction(n: int, rng: np.random.Generator, vocab_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Induction-head copying: m distinct random tokens, then the same m again; in the repeat every
    next token is determined by its first occurrence (A B … A → B)."""
    m = seq_len // 2
    first = rng.random((n, vocab_size)).argsort(axis=1)[:, :m]  # distinct tokens per row
    inputs = np.concatenate([first, first], axis=1)
    answers = np.full_like(inputs, IGNORE)
    answers[:, m : 2 * m - 1] = first[:, 1:]
    return inputs, answers


# -- configuration: one model per task, defaults = the published baseline settings -------------------


class _Task(Source):
    source: Literal["task"] = "task"
    n_train: int = Field(12_800, ge=1)
    n_test: int = Field(1_280, ge=1)
    seed: int = Field(1234, description="data seed: every run and variant sees the same examples")

    def generate(self, n: int, rng: np.random.Generator, train: bool) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def load(self) -> ExampleDataset:
        train = self.generate(self.n_train, np.random.default_rng([self.seed, 0]), True)
        test = self.generate(self.n_test, np.random.default_rng([self.seed, 1]), False)
        return ExampleDataset(vocab_size=self.vocab_size, kind="task", seq_len=self.seq_len,
                              fingerprint={"source": "task", "task": self.task}, train=train, test=test)


class MQAR(_Task):
    task: Literal["mqar"] = "mqar"
    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01
    n_train: int = 20_000
    n_test: int = 1_000

    @model_validator(mode="after")
    def _fits(self):
        if self.vocab_size <= self.seq_len:
            raise ValueError(f"mqar needs vocab_size > seq_len (got {self.vocab_size} ≤ {self.seq_len})")
        if 4 * self.num_kv_pairs > self.seq_len or self.seq_len % 2:
            raise ValueError(f"mqar needs 4·num_kv_pairs ≤ seq_len and an even seq_len "
                             f"(got {self.num_kv_pairs} pairs, seq_len {self.seq_len})")
        return self

    def generate(self, n, rng, train):
        return mqar(n, rng, self.vocab_size, self.seq_len, self.num_kv_pairs, self.power_a)


class _RecallTask(_Task):
    # what training is scored on: the answers only, or every next token (MAD's recall training)
    train_on: Literal["answers", "all"] = "all"


class InContextRecall(_RecallTask):
    task: Literal["in_context_recall"] = "in_context_recall"
    vocab_size: int = 16
    seq_len: int = 128

    def generate(self, n, rng, train):
        seq = in_context_recall(n, rng, self.vocab_size, self.seq_len)
        return _recall_targets(seq, np.ones(n, dtype=np.int64), train and self.train_on == "all")


class NoisyRecall(_RecallTask):
    task: Literal["noisy_recall"] = "noisy_recall"
    vocab_size: int = 32
    noise_vocab_size: int = 16
    frac_noise: float = Field(0.2, ge=0.0, lt=1.0)
    seq_len: int = 128

    def generate(self, n, rng, train):
        seq = in_context_recall(n, rng, self.vocab_size, self.seq_len, self.noise_vocab_size, self.frac_noise)
        return _recall_targets(seq, np.ones(n, dtype=np.int64), train and self.train_on == "all")


class FuzzyRecall(_RecallTask):
    task: Literal["fuzzy_recall"] = "fuzzy_recall"
    vocab_size: int = 16
    seq_len: int = 128
    k_motif_size: int = 3
    v_motif_size: int = 3

    def generate(self, n, rng, train):
        seq, answer_len = fuzzy_recall(n, rng, self.vocab_size, self.seq_len, self.k_motif_size,
                                       self.v_motif_size, train)
        return _recall_targets(seq, answer_len, train and self.train_on == "all")


class SelectiveCopying(_Task):
    task: Literal["selective_copying"] = "selective_copying"
    vocab_size: int = 16
    seq_len: int = 256
    num_tokens_to_copy: int = 16

    def generate(self, n, rng, train):
        return selective_copying(n, rng, self.vocab_size, self.seq_len, self.num_tokens_to_copy)


class Compression(_Task):
    task: Literal["compression"] = "compression"
    vocab_size: int = 16
    seq_len: int = 32

    def generate(self, n, rng, train):
        return compression(n, rng, self.vocab_size, self.seq_len)


class Memorization(_Task):
    task: Literal["memorization"] = "memorization"
    vocab_size: int = 256
    seq_len: int = 32
    n_train: int = 256
    n_test: int = 256
    kv_map_seed: int = 12345

    def generate(self, n, rng, train):
        return memorization(n, rng, self.vocab_size, self.seq_len, self.kv_map_seed)


class Induction(_Task):
    task: Literal["induction"] = "induction"
    vocab_size: int = 64
    seq_len: int = 64

    @model_validator(mode="after")
    def _fits(self):
        if self.vocab_size < self.seq_len // 2:
            raise ValueError(f"induction needs vocab_size ≥ seq_len/2 distinct tokens (got {self.vocab_size})")
        return self

    def generate(self, n, rng, train):
        return induction(n, rng, self.vocab_size, self.seq_len)


def _recall_targets(sequences: np.ndarray, answer_len: np.ndarray, all_tokens: bool):
    """Inputs and targets from next-token sequences whose last answer_len tokens are the answer."""
    inputs, targets = _next_token_targets(sequences)
    if all_tokens:
        return inputs, targets.copy()
    answers = np.full_like(targets, IGNORE)
    width = targets.shape[1]
    mask = np.arange(width)[None, :] >= width - answer_len[:, None]
    answers[mask] = targets[mask]
    return inputs, answers


TASKS = (MQAR, InContextRecall, NoisyRecall, FuzzyRecall, SelectiveCopying, Compression, Memorization, Induction)
TaskConfig = MQAR | InContextRecall | NoisyRecall | FuzzyRecall | SelectiveCopying | Compression | Memorization | Induction
