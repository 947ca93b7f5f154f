"""Gated DeltaNet (models.mixer_delta): the chunked form against the token-by-token one and a naive
reference, the FLOP accounting, decoding against the full forward pass, and what the delta rule
does that linear attention does not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models.mixer_delta  # noqa: F401  (registers deltanet)
from models import ModelConfig, build_model, check_flops
from models.mixer_delta import GatedDeltaNet, delta_chunked, delta_recurrent
from models.positional import Positions
from models.recurrent import StateCache
from models.registry import build_spec


def naive(q, k, v, beta, log_decay, state):
    """S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ, o_t = S_tᵀ q_t, the (Dk, Dk) transition formed."""
    B, H, T, Dk = k.shape
    S = state.clone()
    eye = torch.eye(Dk, dtype=S.dtype)
    out = torch.empty(B, H, T, v.shape[-1], dtype=S.dtype)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                kt, vt, bt = k[b, h, t], v[b, h, t], beta[b, h, t]
                S[b, h] = log_decay[b, h, t].exp() * (eye - bt * torch.outer(kt, kt)) @ S[b, h] + bt * torch.outer(kt, vt)
                out[b, h, t] = S[b, h].T @ q[b, h, t]
    return out, S


def inputs(T: int = 37, B: int = 2, H: int = 3, Dk: int = 8, Dv: int = 6, strong: bool = False):
    """float64 inputs: unit keys, β in (0, 1), log decays ≤ 0 (strong: some of −40, e^−40 ≈ 4e-18)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, T, Dk, generator=g, dtype=torch.float64)
    k = F.normalize(torch.randn(B, H, T, Dk, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    beta = torch.rand(B, H, T, generator=g, dtype=torch.float64)
    log_decay = -torch.rand(B, H, T, generator=g, dtype=torch.float64)
    if strong:
        log_decay = torch.where(torch.rand(B, H, T, generator=g, dtype=torch.float64) < 0.3, -40.0, log_decay)
    state = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64)
    return q, k, v, beta, log_decay, state


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("strong", [False, True])
def test_chunked_equals_recurrent_and_naive(dtype, tol, strong):
    args64 = inputs(strong=strong)
    o_ref, S_ref = naive(*args64)
    args = [t.to(dtype) for t in args64]
    for state in (args[-1], None):
        o_rec, S_rec = delta_recurrent(*args[:-1], state=state)
        ref = (o_ref, S_ref) if state is not None else naive(*args64[:-1], torch.zeros_like(args64[-1]))
        assert torch.isfinite(o_rec).all()
        assert (o_rec.double() - ref[0]).abs().max() <= tol and (S_rec.double() - ref[1]).abs().max() <= tol
        for chunk in (1, 5, 16, 64):  # 37 tokens: a partial last chunk, or one padded chunk
            o, S = delta_chunked(*args[:-1], state=state, chunk=chunk)
            assert o.dtype == dtype and o.shape == o_rec.shape and S.shape == S_rec.shape
            assert (o.double() - ref[0]).abs().max() <= tol, chunk
            assert (S.double() - ref[1]).abs().max() <= tol, chunk
            assert (o - o_rec).abs().max() <= tol and (S - S_rec).abs().max() <= tol


@pytest.mark.parametrize("options", [{}, {"conv": 0}])
def test_flops_accounted(options):
    assert check_flops("attention", "deltanet", options) is None
    assert check_flops("attention", "deltanet", options, seq_len=70) is None  # two chunks, the second padded


def model(positional: str, **options):
    config = ModelConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=50, block_size=40,
                         attention={"name": "deltanet", **options}, positional=positional)
    return build_model(config, seed=0).eval()


@pytest.mark.parametrize("positional,options", [("rope", {}), ("none", {}), ("rope", {"conv": 0})])
def test_decoding_equals_forward(positional, options):
    m = model(positional, **options)
    idx = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m(idx).logits
        cache = m.new_cache()
        steps = [m(idx[:, :23], cache=cache).logits] + [m(idx[:, t:t + 1], cache=cache).logits for t in range(23, 40)]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5
    layer = cache.layers[0]
    assert isinstance(layer, StateCache)
    attn = m.blocks[0].attn
    assert layer.nbytes() == 2 * attn.state_bytes(bytes_per_element=4)  # two rows, fp32
    assert set(layer.tensors) == ({"S", "conv"} if attn.conv is not None else {"S"})


def test_rows_positions():
    """Positions (B, T) give what the shared (T,) positions give when the rows agree."""
    config = ModelConfig(n_layer=1, n_head=4, n_embd=32, vocab_size=50, block_size=16,
                         attention="deltanet", positional="rope")
    mixer = build_spec("attention", config.attention, config)
    assert isinstance(mixer, GatedDeltaNet) and isinstance(mixer.new_cache(), StateCache)
    rope = build_spec("positional", config.positional, config)
    x, pos = torch.randn(2, 16, 32), torch.arange(16)
    shared = mixer(x, Positions(pos, rope, rope.rotation(pos)), pos)
    rows = pos.expand(2, -1)
    assert torch.allclose(mixer(x, Positions(rows, rope, rope.rotation(rows)), rows), shared, atol=1e-6)


@pytest.mark.parametrize("form", [delta_recurrent, delta_chunked])
def test_delta_rule_overwrites(form):
    """One key written twice: the delta rule keeps the second value (β = 1) or a β-weighted mix of
    the two (β = ½: ¼v₁ + ½v₂), where linear attention (the sum v₁ + v₂) and a rule without β would not."""
    k = F.normalize(torch.randn(4), dim=0)
    v1, v2 = torch.randn(3), torch.randn(3)
    keys = torch.stack([k, k])[None, None]  # (1, 1, 2, 4)
    values = torch.stack([v1, v2])[None, None]  # (1, 1, 2, 3)
    for step, expected in ((1.0, v2), (0.5, 0.25 * v1 + 0.5 * v2), (0.0, torch.zeros(3))):
        beta = torch.full((1, 1, 2), step)
        o, S = form(keys, keys, values, beta, torch.zeros(1, 1, 2))  # q = k, α = 1
        assert torch.allclose(o[0, 0, 1], expected, atol=1e-6)  # the query reads the state after both writes
        assert torch.allclose(S[0, 0].T @ k, expected, atol=1e-6)
    assert not torch.allclose(v2, v1 + v2, atol=1e-3)


def test_starts_from_softmax_attentions_qkv():
    """With the same seed, deltanet's q, k and v weights are mha's (init_blocks): paired runs differ by the mixer."""
    base = {"n_layer": 2, "n_head": 4, "n_embd": 32, "vocab_size": 50, "block_size": 40}
    delta = build_model(ModelConfig(**base, attention="deltanet"), seed=3)
    mha = build_model(ModelConfig(**base, attention="mha"), seed=3)
    assert torch.equal(delta.blocks[1].attn.c_attn.weight, mha.blocks[1].attn.c_attn.weight)
