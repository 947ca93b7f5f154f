"""Tokenizers: char-level, byte-level, BPE trained with rustbpe and served by tiktoken (as nanochat
does), and tiktoken's named encodings when their files are present.

Every tokenizer knows how many UTF-8 bytes each token stands for, so loss converts to bits per byte
and runs with different tokenizers compare.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
from dataclasses import dataclass

import numpy as np

from bench.data.corpora import Corpus, DataUnavailable
from bench.paths import atomic_write_bytes, cache_dir

DOWNLOAD_TIMEOUT = 15.0  # seconds without an answer before a download counts as offline


class Tokenizer:
    name: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) UTF-8 bytes per token."""
        raise NotImplementedError


@dataclass
class CharTokenizer(Tokenizer):
    """One token per character of the corpus's alphabet (nanoGPT's shakespeare_char)."""

    chars: list[str]
    name: str = "char"

    @classmethod
    def fit(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.chars)}
        try:
            return np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this char tokenizer's alphabet") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def token_bytes(self) -> np.ndarray:
        return np.array([len(c.encode("utf-8")) for c in self.chars], dtype=np.int64)


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte: 256 tokens, any text."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)


class TiktokenTokenizer(Tokenizer):
    """A tiktoken Encoding: a named one (gpt2, cl100k_base, ...) or a BPE trained here."""

    def __init__(self, encoding, name: str):
        self.encoding, self.name = encoding, name
        self.vocab_size = encoding.n_vocab

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.encoding.encode_ordinary(text), dtype=np.int64)

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            try:
                lengths[i] = len(self.encoding.decode_single_token_bytes(i))
            except KeyError:  # ids with no token (gaps before special tokens): never produced
                pass
        return lengths


def train_bpe(corpus: Corpus, vocab_size: int) -> TiktokenTokenizer:
    """BPE trained on the corpus with rustbpe, cached by corpus hash and vocabulary size."""
    import tiktoken

    path = cache_dir("tokenizers") / f"bpe-{corpus.sha256[:16]}-{vocab_size}.json"
    if path.exists():
        saved = json.loads(path.read_text())
    else:
        import rustbpe

        if vocab_size < 256:
            raise ValueError(f"a byte-level BPE needs vocab_size ≥ 256, got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        lines = corpus.text.splitlines(keepends=True)
        chunks = ("".join(lines[i : i + 1000]) for i in range(0, len(lines), 1000))  # whole lines
        trainer.train_from_iterator(chunks, vocab_size)
        saved = {
            "pattern": trainer.get_pattern(),
            "ranks": [[base64.b64encode(bytes(token)).decode(), rank] for token, rank in trainer.get_mergeable_ranks()],
        }
        atomic_write_bytes(path, json.dumps(saved).encode())
    ranks = {base64.b64decode(token): rank for token, rank in saved["ranks"]}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    encoding = tiktoken.Encoding(name=f"bpe{vocab_size}-{digest}", pat_str=saved["pattern"],
                                 mergeable_ranks=ranks, special_tokens={})
    return TiktokenTokenizer(encoding, f"bpe{vocab_size}")


def named_encoding(name: str) -> TiktokenTokenizer:
    """tiktoken's encoding by name, if its files are cached or downloadable; a clear error offline."""
    import tiktoken

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)  # tiktoken downloads without a timeout: a dead network would hang
    try:
        encoding = tiktoken.get_encoding(name)
    except ValueError as e:  # an unknown name
        raise ValueError(f"unknown tokenizer '{name}': use char, byte, bpe or one of "
                         f"{', '.join(tiktoken.list_encoding_names())}") from e
    except Exception as e:  # noqa: BLE001 - requests' connection errors and friends
        where = os.environ.get("TIKTOKEN_CACHE_DIR", "$TIKTOKEN_CACHE_DIR")
        raise DataUnavailable(
            f"tiktoken encoding '{name}' needs its vocabulary files, which could not be downloaded "
            f"({type(e).__name__}); offline, copy tiktoken's cache files into {where}, or use "
            "tokenizer: bpe (trained here) / char / byte"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return TiktokenTokenizer(encoding, name)


def make_tokenizer(kind: str, corpus: Corpus | None, vocab_size: int | None) -> Tokenizer:
    """char / byte / bpe (trained on corpus) / a tiktoken encoding name."""
    if kind == "char":
        return CharTokenizer.fit(corpus.text)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return train_bpe(corpus, vocab_size or 1024)
    return named_encoding(kind)
