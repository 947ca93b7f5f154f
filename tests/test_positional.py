"""Positional encodings: RoPE's relative property, ALiBi's slopes, sinusoidal values."""

from __future__ import annotations

import math

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from models.positional import RotaryPositional, SinusoidalPositional, alibi_slopes
from tests.conftest import tiny


@settings(max_examples=40, deadline=None)
@given(m=st.integers(0, 3000), n=st.integers(0, 3000), shift=st.integers(-500, 5000))
@example(m=0, n=1196, shift=4076)  # float32 angles missed this by 1.2e-4 (found by hypothesis in CI)
def test_rotated_dot_product_depends_only_on_the_offset(m, n, shift):
    rope = RotaryPositional(tiny(n_embd=64, n_head=2))  # head dim 32
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 1, 1, 1, 32, generator=g, dtype=torch.float64).unbind(0)
    shift = max(shift, -min(m, n))  # positions stay non-negative

    def score(i: int, j: int) -> float:
        qi = rope.at(torch.tensor([i])).rotate(q)
        kj = rope.at(torch.tensor([j])).rotate(k)
        return float((qi * kj).sum())

    assert math.isclose(score(m, n), score(m + shift, n + shift), rel_tol=1e-5, abs_tol=1e-5)


def test_rope_rotation_preserves_norm_and_is_identity_at_zero():
    rope = RotaryPositional(tiny())
    x = torch.randn(2, 4, 10, 8)
    pos = torch.arange(10)
    assert torch.allclose(rope.at(pos).rotate(x).norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.allclose(rope.at(pos[:1]).rotate(x[:, :, :1]), x[:, :, :1])


def test_alibi_slopes_are_the_papers_geometric_sequence():
    # 8 heads: 1/2, 1/4, ..., 1/256 (Press et al. 2022, section 3)
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))
    # 12 heads: the 8-head slopes, then every other slope of the 16-head sequence
    expected = [2.0**-i for i in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    assert torch.allclose(alibi_slopes(12), torch.tensor(expected))
    # 6 heads: the 4-head slopes 2^-2, 2^-4, 2^-6, 2^-8 then 2^-1, 2^-3 from the 8-head sequence
    assert torch.allclose(alibi_slopes(6), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]))


def test_sinusoidal_matches_the_transformer_formula():
    pe = SinusoidalPositional(tiny(n_embd=16), scale=1.0).embed(torch.arange(50))
    pos, i = 37, 3
    angle = pos / 10000 ** (2 * i / 16)
    assert math.isclose(pe[pos, 2 * i], math.sin(angle), abs_tol=1e-5)
    assert math.isclose(pe[pos, 2 * i + 1], math.cos(angle), abs_tol=1e-5)
    scaled = SinusoidalPositional(tiny(n_embd=16)).embed(torch.arange(50))  # default: the token embeddings' 0.02
    assert torch.allclose(scaled, 0.02 * pe)


def test_rope_computes_its_rotation_once_per_forward_pass(monkeypatch):
    from models import build_model

    model = build_model(tiny(positional="rope", n_layer=3)).eval()
    calls = []
    original = RotaryPositional.rotation
    monkeypatch.setattr(RotaryPositional, "rotation", lambda self, pos: calls.append(pos) or original(self, pos))
    model(torch.randint(0, 50, (1, 8)))
    assert len(calls) == 1  # not once per layer, and nothing is kept on the module for the next pass
    assert not any(isinstance(v, torch.Tensor) for v in vars(model.positional).values())
