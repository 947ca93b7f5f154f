"""Data for training and evaluation: one validated ``DataConfig`` per source, ``.load()`` → Dataset.

    source: task        synthetic tasks (MQAR, MAD's six, induction)   → accuracy on answers
    source: markov      a Markov language with a known entropy rate    → loss above the floor
    source: stdlib      the Python standard library's source (offline) → bits per byte
    source: file        a local text file or folder
    source: shakespeare tiny Shakespeare (downloaded once, sha256-pinned)
    source: hf          a Hugging Face dataset, streamed
    source: bin         pre-tokenized uint16/uint32 train.bin/val.bin (nanoGPT's format)

Text corpora of many documents are split into train and validation by document (``Corpus.split``);
the BPE learns its merges from the training documents only. Tokenized text is cached on disk (memmap)
keyed by the split's hash, tokenizer and vocabulary size.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from bench.data import corpora
from bench.data.corpora import Corpus, DataUnavailable, Split
from bench.data.datasets import Dataset, StreamDataset
from bench.data.images import ImagesConfig
from bench.data.markov import MarkovChain
from bench.data.source import Source
from bench.data.tasks import TaskConfig
from bench.data.tokenizers import Tokenizer, make_tokenizer
from bench.paths import cache_dir


class MarkovConfig(Source):
    source: Literal["markov"] = "markov"
    vocab_size: int = Field(64, ge=2)
    concentration: float = Field(0.1, gt=0, description="Dirichlet α of each transition row")
    n_train_tokens: int = Field(1_000_000, ge=1)
    n_val_tokens: int = Field(100_000, ge=1)
    doc_len: int = Field(1024, ge=2, description="each chain's length; windows stay inside one chain")
    seed: int = 1234

    def load(self) -> StreamDataset:
        return _markov(self)


@functools.lru_cache(maxsize=4)
def _markov(config: MarkovConfig) -> StreamDataset:
    chain = MarkovChain.random(config.vocab_size, config.concentration, config.seed)
    rng = np.random.default_rng([config.seed, 1])
    docs = lambda n: chain.sample(max(1, -(-n // config.doc_len)), config.doc_len, rng).reshape(-1)  # noqa: E731
    return StreamDataset(
        vocab_size=config.vocab_size, kind="markov", seq_len=None,
        fingerprint={"source": "markov", "entropy_rate": chain.entropy_rate()},
        loss_floor=chain.entropy_rate(), train_tokens=docs(config.n_train_tokens),
        val_tokens=docs(config.n_val_tokens), doc_len=config.doc_len,
    )


class _Text(Source):
    tokenizer: str = Field("char", description="char | byte | bpe | a tiktoken encoding (gpt2, cl100k_base)")
    vocab_size: int | None = Field(None, description="BPE vocabulary size (default 1024)")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    split_seed: int = Field(0, description="which documents are held out for validation (a seeded hash of "
                            "their names); a corpus of one document is cut at its last val_fraction")

    def corpus(self) -> Corpus:
        raise NotImplementedError

    def train_val_split(self) -> Split:
        return _split(self.corpus(), self.val_fraction, self.split_seed)

    def fitted_tokenizer(self) -> Tokenizer:
        """The tokenizer this data is encoded with (``fit_tokenizer``)."""
        return fit_tokenizer(self.tokenizer, self.corpus(), self.train_val_split(), self.vocab_size)

    def known_vocab_size(self) -> int | None:
        if self.tokenizer == "byte":
            return 256
        if self.tokenizer == "bpe" and self.vocab_size:
            return self.vocab_size
        return None  # char: the corpus's characters; a named encoding: its files; the default BPE

    def preparation(self) -> list[str]:
        steps = self.corpus_preparation()
        size = "" if self.known_vocab_size() else ": the vocabulary size is determined then"
        if self.tokenizer == "bpe":
            steps.append(f"train a {self.vocab_size or 1024}-token BPE on the training documents with rustbpe (cached)")
        elif self.tokenizer not in ("char", "byte"):
            steps.append(f"load tiktoken's '{self.tokenizer}' vocabulary files (downloaded unless in tiktoken's cache)")
        return [*steps, f"tokenize the corpus with '{self.tokenizer}' (cached after the first time){size}"]

    def corpus_preparation(self) -> list[str]:
        """Downloads the corpus needs, in words (none for local corpora)."""
        return []

    def identity(self) -> dict[str, Any]:
        corpus = self.corpus()
        return {**super().identity(), "corpus_sha256": corpus.sha256, "corpus_bytes": corpus.n_bytes,
                "split_sha256": self.train_val_split().sha256}

    def load(self) -> StreamDataset:
        return tokenized(self.corpus(), self.tokenizer, self.vocab_size, self.val_fraction, self.split_seed)


class StdlibConfig(_Text):
    source: Literal["stdlib"] = "stdlib"
    max_bytes: int | None = Field(2_000_000, description="read the sorted files up to this many bytes")

    def corpus(self) -> Corpus:
        return _stdlib(self.max_bytes)


@functools.lru_cache(maxsize=4)
def _stdlib(max_bytes: int | None) -> Corpus:
    return corpora.stdlib_corpus(max_bytes)


@functools.lru_cache(maxsize=8)
def _split(corpus: Corpus, val_fraction: float, seed: int) -> Split:
    return corpus.split(val_fraction, seed)


class FileConfig(_Text):
    source: Literal["file"] = "file"
    path: str
    pattern: str = "**/*.txt"

    def corpus(self) -> Corpus:
        return corpora.file_corpus(self.path, self.pattern)


class ShakespeareConfig(_Text):
    source: Literal["shakespeare"] = "shakespeare"

    def corpus(self) -> Corpus:
        return corpora.shakespeare_corpus()

    def corpus_preparation(self) -> list[str]:
        target = corpora.shakespeare_path()
        return [] if target.exists() else [f"download tiny Shakespeare (1.1 MB) from {corpora.SHAKESPEARE_URL} "
                                           f"into {target}"]


class HFConfig(_Text):
    source: Literal["hf"] = "hf"
    name: str
    config: str | None = None
    split: str = "train"
    field: str = "text"
    max_bytes: int = 10_000_000

    def corpus(self) -> Corpus:
        return corpora.hf_corpus(self.name, self.config, self.split, self.field, self.max_bytes)

    def corpus_preparation(self) -> list[str]:
        return [f"stream up to {self.max_bytes:,} bytes of Hugging Face dataset '{self.name}'"]


class BinConfig(Source):
    source: Literal["bin"] = "bin"
    path: str = Field(description="folder holding train.bin and val.bin")
    vocab_size: int
    dtype: Literal["uint16", "uint32"] = "uint16"
    tokenizer: str | None = Field(None, description="the tokenizer that made the files, for bits per byte")

    @field_validator("tokenizer")
    @classmethod
    def _self_contained(cls, value: str | None) -> str | None:
        if value in ("char", "bpe"):  # their vocabularies come from a corpus, which .bin files do not carry
            raise ValueError(f"tokenizer '{value}' is trained on a text corpus that .bin files do not carry: "
                             "give 'byte' or a named tiktoken encoding (gpt2, cl100k_base), or leave it out")
        return value

    def identity(self) -> dict[str, Any]:
        folder = Path(self.path).expanduser()
        digest = hashlib.sha256()
        for name in ("train.bin", "val.bin"):  # size + head + tail: cheap and changes with the content
            with open(folder / name, "rb") as f:
                digest.update(str(os.fstat(f.fileno()).st_size).encode() + f.read(1 << 20))
        return {**super().identity(), "content": digest.hexdigest()}

    def load(self) -> StreamDataset:
        folder = Path(self.path).expanduser()
        for name in ("train.bin", "val.bin"):
            if not (folder / name).exists():
                raise DataUnavailable(f"{folder / name} not found (nanoGPT's format: train.bin and val.bin)")
        train, val = (np.memmap(folder / n, dtype=self.dtype, mode="r") for n in ("train.bin", "val.bin"))
        token_bytes = make_tokenizer(self.tokenizer, None, None).token_bytes() if self.tokenizer else None
        return StreamDataset(vocab_size=self.vocab_size, kind="tokens", seq_len=None,
                             fingerprint={"source": "bin", "path": str(folder)}, token_bytes=token_bytes,
                             train_tokens=train, val_tokens=val)


Task = Annotated[TaskConfig, Field(discriminator="task")]
DataConfig = Annotated[
    Task | MarkovConfig | StdlibConfig | FileConfig | ShakespeareConfig | HFConfig | BinConfig | ImagesConfig,
    Field(discriminator="source"),
]


@functools.lru_cache(maxsize=8)
def load_dataset(config: Source) -> Dataset:
    """The dataset a config describes (cached per process: variants of a study share it)."""
    return config.load()


def fit_tokenizer(tokenizer: str, corpus: Corpus, split: Split, vocab_size: int | None) -> Tokenizer:
    """char fitted to the whole corpus's alphabet (an unseen character has no id); BPE trained on the
    training documents only (cached), so no merge is learnt from validation text; byte and named
    encodings as they are."""
    fitted = {"char": corpus, "bpe": Corpus.of(f"{corpus.name}:train", split.train)}.get(tokenizer)
    return make_tokenizer(tokenizer, fitted, vocab_size)


def tokenized(corpus: Corpus, tokenizer: str, vocab_size: int | None, val_fraction: float,
              split_seed: int = 0) -> StreamDataset:
    """Split a corpus (``Corpus.split``), tokenize both parts once (``fit_tokenizer``) and cache them as
    memmaps."""
    split = _split(corpus, val_fraction, split_seed)
    key = hashlib.sha256(f"{split.sha256}|{tokenizer}|{vocab_size}".encode()).hexdigest()[:24]
    folder = cache_dir("tokens") / key
    if not (folder / "meta.json").exists():
        tok = fit_tokenizer(tokenizer, corpus, split, vocab_size)
        ids = [tok.encode(split.train), tok.encode(split.val)]
        dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
        staging = folder.with_name(f".{key}.{os.getpid()}")
        staging.mkdir(parents=True, exist_ok=True)
        for name, part in zip(("train.bin", "val.bin"), ids):
            part.astype(dtype).tofile(staging / name)
        np.save(staging / "token_bytes.npy", tok.token_bytes())
        meta = {"vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name, "tokenizer": tok.name,
                "corpus": corpus.name, "corpus_sha256": corpus.sha256, "corpus_bytes": corpus.n_bytes,
                "split": split.how, "split_sha256": split.sha256, "val_documents": list(split.val_documents)}
        (staging / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(staging, folder)
        except OSError:  # another process finished first: use theirs
            shutil.rmtree(staging, ignore_errors=True)
    meta = json.loads((folder / "meta.json").read_text())
    train, val = (np.memmap(folder / n, dtype=meta["dtype"], mode="r") for n in ("train.bin", "val.bin"))
    return StreamDataset(vocab_size=meta["vocab_size"], kind="text", seq_len=None,
                         fingerprint={"source": meta["corpus"], "corpus_sha256": meta["corpus_sha256"],
                                      "tokenizer": meta["tokenizer"], "vocab_size": meta["vocab_size"],
                                      "split": meta["split"], "split_sha256": meta["split_sha256"],
                                      "val_documents": len(meta["val_documents"])},
                         token_bytes=np.load(folder / "token_bytes.npy"), train_tokens=train, val_tokens=val)


__all__ = ["DataConfig", "DataUnavailable", "Dataset", "Source", "load_dataset", "tokenized"]
