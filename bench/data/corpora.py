"""Real text, offline first.

- ``stdlib``: the Python standard library's own source files — on every Python install, in a fixed
  sorted order; the hash of the text is recorded so runs on different Pythons never mix silently.
- ``file``: any local text file, or a folder of them.
- ``shakespeare``: tiny Shakespeare from its canonical address, checked against a pinned sha256 and
  cached; offline, a copy placed in the cache is used and the error says where to put it.
- ``hf``: a Hugging Face dataset streamed by name (optional: pip install datasets).
"""

from __future__ import annotations

import hashlib
import sysconfig
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.paths import atomic_write_bytes, cache_path

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


class DataUnavailable(RuntimeError):
    """A data source cannot be read here (offline, missing file, missing package); says what to do."""


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str
    sha256: str  # of the UTF-8 text: identifies the data in every result

    @classmethod
    def of(cls, name: str, text: str) -> Corpus:
        return cls(name, text, hashlib.sha256(text.encode("utf-8")).hexdigest())

    @property
    def n_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


def stdlib_corpus(max_bytes: int | None) -> Corpus:
    """The standard library's .py files (tests excluded), sorted by path, up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] in ("test", "idlelib", "site-packages") or "tests" in relative.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text.encode("utf-8"))
        if max_bytes is not None and size >= max_bytes:
            break
    text = "\n".join(parts)
    if max_bytes is not None:
        text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    return Corpus.of(f"python{sysconfig.get_python_version()}-stdlib", text)


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
    return Corpus.of(path.name, "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files))


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
    """The first max_bytes of a Hugging Face dataset's text field, streamed."""
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
    text = "\n".join(parts).encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    return Corpus.of(f"hf:{name}", text)
