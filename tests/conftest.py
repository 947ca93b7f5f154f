"""Shared test helpers: tiny configs that build in milliseconds."""

from __future__ import annotations

import pytest
import torch

from models import ModelConfig


def tiny(**overrides) -> ModelConfig:
    """A 2-layer, 4-head, 32-wide model over a 50-token vocabulary."""
    base = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=50)
    return ModelConfig(**{**base, **overrides})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
