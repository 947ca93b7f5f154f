"""Real text, offline first.

- ``stdlib``: the Python standard library's own source files — on every Python install; a fixed
  pseudo-random sample of its files (test folders excluded) up to ``max_bytes``; the hash of the
  text is recorded so runs on different Pythons never mix silently.
- ``file``: any local text file, or a folder of them.
- ``shakespeare``: tiny Shakespeare from its canonical address, checked against a pinned sha256 and
  cached; offline, a copy placed in the cache is used and the error says where to put it.
- ``hf``: a Hugging Face dataset streamed by name (optional: pip install datasets).

A corpus of many documents (files, records) is split into train and validation *by document*: a
seeded hash of each document's name orders them, and the first ones in that order up to the
validation fraction of the characters are held out. Cutting the concatenation at 90% instead would
validate on whatever sorts last (for the stdlib at 4 MB: code-page tables), a distribution of its
own. A single document (tiny Shakespeare) is cut at the fraction of its characters, as nanoGPT does.
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.paths import atomic_write_bytes, cache_path

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SPLIT_VERSION = 2  # 1: the concatenation cut at (1 − val_fraction); 2: documents held out by a seeded hash


class DataUnavailable(RuntimeError):
    """A data source cannot be read here (offline, missing file, missing package); says what to do."""


@dataclass(frozen=True)
class Document:
    name: str  # what the split hashes: a path within the corpus, a record's index
    text: str


@dataclass(frozen=True)
class Split:
    """A corpus divided into training and validation text."""

    train: str
    val: str
    how: str  # "documents" or "characters"
    val_documents: tuple[str, ...]  # the held-out documents' names (none for a character cut)
    sha256: str  # identifies the division: runs on different splits never mix


@dataclass(frozen=True)
class Corpus:
    name: str
    documents: tuple[Document, ...]
    sha256: str = field(default="", compare=False)  # of the UTF-8 text: identifies the data in every result

    def __post_init__(self):
        if not self.sha256:
            object.__setattr__(self, "sha256", hashlib.sha256(self.text.encode("utf-8")).hexdigest())

    @classmethod
    def of(cls, name: str, text: str) -> Corpus:
        """A corpus of one document."""
        return cls(name, (Document(name, text),))

    @functools.cached_property
    def text(self) -> str:
        return "\n".join(d.text for d in self.documents)

    @property
    def n_bytes(self) -> int:
        return len(self.text.encode("utf-8"))

    def split(self, val_fraction: float, seed: int = 0) -> Split:
        """Train and validation text: whole documents held out (several documents), else a cut at
        (1 − val_fraction) of the characters. Documents are held out in the order of a seeded hash of
        their names until they hold val_fraction of the characters (at least one, never all)."""
        if len(self.documents) < 2:
            cut = int(len(self.text) * (1 - val_fraction))  # nanoGPT splits the characters 90/10
            identity = f"{SPLIT_VERSION}|characters|{self.sha256}|{val_fraction}"
            return Split(self.text[:cut], self.text[cut:], "characters", (), hashlib.sha256(identity.encode()).hexdigest())
        order = sorted(self.documents, key=lambda d: _hash(f"split|{seed}|{d.name}"))
        target, held, size = val_fraction * sum(len(d.text) for d in self.documents), set(), 0
        for d in order[:-1]:
            if size >= target:
                break
            held.add(d.name)
            size += len(d.text)
        val = tuple(d for d in self.documents if d.name in held)
        train = tuple(d for d in self.documents if d.name not in held)
        names = tuple(d.name for d in val)
        identity = "|".join([str(SPLIT_VERSION), "documents", self.sha256, str(seed), *names])
        return Split("\n".join(d.text for d in train), "\n".join(d.text for d in val), "documents", names,
                     hashlib.sha256(identity.encode()).hexdigest())


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_test_path(relative: Path) -> bool:
    """Whether a file lies in a test folder (test, tests, test_json, idle_test, testmock, ...)."""
    return any(part.lower().startswith("test") or part.lower().endswith(("_test", "_tests"))
               for part in relative.parts[:-1])


def stdlib_corpus(max_bytes: int | None) -> Corpus:
    """The standard library's .py files (test folders, idlelib and site-packages excluded), one document
    each: all of them, or a fixed pseudo-random sample of whole files (by a hash of their paths) up to
    max_bytes, so a small corpus is a cross-section of the library rather than its alphabetical start."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [p.relative_to(root) for p in root.rglob("*.py")]
    paths = [p for p in paths if p.parts[0] not in ("idlelib", "site-packages") and not is_test_path(p)]
    chosen, size = [], 0
    for relative in sorted(paths, key=lambda p: _hash(f"sample|{p.as_posix()}")):
        if max_bytes is not None and size + (root / relative).stat().st_size + 1 > max_bytes:
            continue  # whole files only: a smaller one may still fit
        text = (root / relative).read_text(encoding="utf-8", errors="replace")
        length = len(text.encode("utf-8")) + 1  # and the newline that joins it to the next
        if max_bytes is not None and size + length > max_bytes:
            continue
        chosen.append(Document(relative.as_posix(), text))
        size += length
    chosen.sort(key=lambda d: d.name)
    return Corpus(f"python{sysconfig.get_python_version()}-stdlib", tuple(chosen))


def file_corpus(path: str | Path, pattern: str = "**/*.txt") -> Corpus:
    """A text file, or every file matching pattern under a folder (sorted)."""
    path = Path(path).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.glob(pattern) if p.is_file())
        if not files:
            raise DataUnavailable(f"no files match '{pattern}' under {path}")
    else:
        raise DataUnavailable(f"text file or folder not found: {path}")
    root = path if path.is_dir() else path.parent
    return Corpus(path.name, tuple(Document(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8", errors="replace"))
                                   for p in files))


def shakespeare_path() -> Path:
    """Where tiny Shakespeare is cached (and where to put a copy offline)."""
    return cache_path("data", "tinyshakespeare", "input.txt")


def shakespeare_corpus(timeout: float = 10.0) -> Corpus:
    """Tiny Shakespeare (1,115,394 bytes), from the cache or downloaded once and checked."""
    target = shakespeare_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        try:
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=timeout) as response:
                data = response.read()
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise DataUnavailable(
                f"could not download tiny Shakespeare from {SHAKESPEARE_URL} ({e}); offline, put a copy "
                f"at {target} (sha256 {SHAKESPEARE_SHA256})"
            ) from None
        if hashlib.sha256(data).hexdigest() != SHAKESPEARE_SHA256:
            raise DataUnavailable(f"download from {SHAKESPEARE_URL} does not match sha256 {SHAKESPEARE_SHA256}")
        atomic_write_bytes(target, data)
    data = target.read_bytes()
    if hashlib.sha256(data).hexdigest() != SHAKESPEARE_SHA256:
        raise DataUnavailable(f"{target} does not match sha256 {SHAKESPEARE_SHA256}; delete it to download again")
    return Corpus.of("tinyshakespeare", data.decode("utf-8"))


def hf_corpus(name: str, config: str | None, split: str, field: str, max_bytes: int) -> Corpus:
    """The first max_bytes of a Hugging Face dataset's text field, streamed; one document per record."""
    try:
        import datasets
    except ImportError:
        raise DataUnavailable("Hugging Face datasets need the 'datasets' package: pip install 'archbench[hf]'") from None
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        parts, size = [], 0
        for record in stream:
            text = record[field]
            parts.append(text)
            size += len(text.encode("utf-8"))
            if size >= max_bytes:
                break
    except Exception as e:  # noqa: BLE001 - network, auth and missing-dataset errors all end here
        raise DataUnavailable(f"could not stream Hugging Face dataset '{name}' ({type(e).__name__}: {e}); "
                              "offline, use a local file or the stdlib corpus") from None
    return Corpus(f"hf:{name}", tuple(Document(str(i), text) for i, text in enumerate(parts)))
