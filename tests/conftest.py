"""Shared test helpers: tiny configs that build in milliseconds."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from models import ModelConfig


def tiny(**overrides) -> ModelConfig:
    """A 2-layer, 4-head, 32-wide model over a 50-token vocabulary."""
    base = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=50)
    return ModelConfig(**{**base, **overrides})


@contextlib.contextmanager
def registered(family: str, name: str, factory, **kwargs):
    """Register a component for one test, then remove it so other tests see only the built-ins."""
    from models.registry import _REGISTRY, register

    register(family, name, **kwargs)(factory)
    try:
        yield factory
    finally:
        _REGISTRY[family].pop(name, None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ../shared/data beside the checkout; CI, which tests a clone elsewhere, points at it with ARCHBENCH_SHARED_DATA
SHARED_DATA = Path(os.environ.get("ARCHBENCH_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
SHARED_SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests use their own cache, seeded with tiny Shakespeare from ../shared: never the network."""
    root = tmp_path_factory.mktemp("archbench-cache")
    os.environ["ARCHBENCH_CACHE"] = str(root)
    if SHARED_SHAKESPEARE.exists():
        target = root / "data" / "tinyshakespeare"
        target.mkdir(parents=True)
        shutil.copy(SHARED_SHAKESPEARE, target / "input.txt")
    yield root


def needs_shakespeare():
    return pytest.mark.skipif(not SHARED_SHAKESPEARE.exists(), reason=f"{SHARED_SHAKESPEARE} is absent (../shared)")
