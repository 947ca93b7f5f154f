"""Where archbench keeps what it downloads, trains or measures once per machine."""

from __future__ import annotations

import os
from pathlib import Path


def cache_path(*parts: str) -> Path:
    """$ARCHBENCH_CACHE (default ~/.cache/archbench), joined with parts; nothing is created."""
    return Path(os.environ.get("ARCHBENCH_CACHE") or Path.home() / ".cache" / "archbench").joinpath(*parts)


def cache_dir(*parts: str) -> Path:
    """cache_path(*parts), created."""
    path = cache_path(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
