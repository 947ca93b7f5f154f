"""Based: the Taylor feature map, the layer against a naive quadratic reference, its FLOP accounting,
decoding with its constant-size cache (prefill + steps = full forward; copies; merged rows)."""

from __future__ import annotations

import math

import pytest
import torch

import models.mixer_based  # noqa: F401  (registers "based")
from models import build_model, check_flops
from models.config import ModelConfig
from models.gpt import Cache
from models.mixer_based import taylor_features
from models.registry import build, build_spec

from bench.kernels.cases import _copy_cache


def based_model(positional: str = "rope", **options) -> torch.nn.Module:
    spec = {"name": "based", "window": 8, **options}
    config = ModelConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=50, block_size=40, attention=spec, positional=positional)
    return build_model(config, seed=0).eval()


def test_feature_map_is_exp_to_second_order():
    torch.manual_seed(0)
    d = 16
    q, k = torch.randn(5, d, dtype=torch.float64), torch.randn(5, d, dtype=torch.float64)
    s = (q * k).sum(-1)
    expected = 1 + s / math.sqrt(d) + s**2 / (2 * d)
    got = (taylor_features(q) * taylor_features(k)).sum(-1)
    assert taylor_features(q).shape[-1] == 1 + d + d * d
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def naive_based(layer, x: torch.Tensor, positional) -> torch.Tensor:
    """Based by its definition, O(T²), in float64: the normalised Taylor attention matrix plus softmax
    over each query's last `window` keys, summed, then the output projection."""
    layer = layer.double()
    x = x.double()
    B, T, C = x.shape
    H, D, d = layer.n_head, layer.head_dim, layer.feature_dim
    heads = lambda t: t.view(B, T, H, -1).transpose(1, 2)  # noqa: E731
    q, k, v = layer.c_taylor(x).split([H * d, H * d, C], -1)
    q, k, v = heads(q), heads(k), heads(v)
    s = q @ k.transpose(-1, -2)  # (B, H, T, T)
    a = (1 + s / math.sqrt(d) + s**2 / (2 * d)).tril()
    linear = (a @ v) / (a.sum(-1, keepdim=True) + layer.eps)
    q, k, v = (heads(t) for t in layer.c_window(x).chunk(3, -1))
    q, k = positional.rotate(q), positional.rotate(k)
    i = torch.arange(T)
    seen = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < layer.window)  # (T, T)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~seen, -math.inf)
    window = scores.softmax(-1) @ v
    y = (linear + window).transpose(1, 2).reshape(B, T, C)
    return layer.c_proj(y)


@pytest.mark.parametrize("positional", ["rope", "none"])
def test_layer_equals_naive_reference(positional):
    from models.positional import Positions

    config = ModelConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=50, block_size=20, positional=positional)
    torch.manual_seed(0)
    layer = build("attention", "based", config, feature_dim=4, window=5, backend="math").eval()
    layer.chunk = 8  # 20 tokens: three chunks, the last padded
    encoding = build_spec("positional", config.positional, config)
    pos = torch.arange(20)
    x = torch.randn(2, 20, 16)
    with torch.no_grad():
        got = layer(x, Positions(pos, encoding, encoding.rotation(pos)), pos)
        expected = naive_based(layer, x, Positions(pos, encoding, encoding.rotation(pos)))
    assert (got.double() - expected).abs().max() <= 1e-5


def test_flop_accounting_matches_the_counter():
    assert check_flops("attention", "based") is None
    # exactly: at 2 % the window's q·kᵀ and probs·v would hide behind the (1 + d + d²)-wide recurrence
    assert check_flops("attention", "based", rel_tol=0) is None
    assert check_flops("attention", "based", {"window": 4, "feature_dim": 2, "conv": 3}, seq_len=40, rel_tol=0) is None


@pytest.mark.parametrize("positional", ["rope", "none"])
@torch.no_grad()
def test_decoding_equals_full_forward(positional):
    m = based_model(positional)
    idx = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))
    cache = m.new_cache()
    steps = [m(idx[:, :23], cache=cache).logits] + [m(idx[:, t : t + 1], cache=cache).logits for t in range(23, 40)]
    assert (torch.cat(steps, 1) - m(idx).logits).abs().max() <= 1e-5


@torch.no_grad()
def test_state_is_constant_in_the_context():
    m = based_model()
    idx = torch.randint(0, 50, (3, 39), generator=torch.Generator().manual_seed(1))
    held = []
    for n in (20, 39):
        cache = m.new_cache()
        m(idx[:, :n], cache=cache)
        held.append(cache.nbytes())
    layer = m.blocks[0].attn
    assert held[0] == held[1] == 3 * 2 * layer.state_bytes(4)
    assert layer.state_bytes(2) * 2 == layer.state_bytes(4)


@torch.no_grad()
def test_copied_and_merged_caches_decode_as_alone():
    """A shallow copy decodes without touching its original; rows at different positions (merged
    caches, one row leaving) decode what each decodes alone. conv=3: the conv state travels too."""
    m = based_model("rope", conv=3)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 50, (1, n), generator=gen) for n in (3, 11, 6)]
    steps = torch.randint(0, 50, (3, 4), generator=gen)

    alone = []
    for p, s in zip(prompts, steps):
        cache = m.new_cache()
        m(p, cache=cache)
        copied = _copy_cache(cache)
        m(s[None, :1], cache=copied)  # into the copy: the original must not move
        alone.append(torch.cat([m(s[None, t : t + 1], cache=cache).logits for t in range(4)], 1))

    caches = []
    for p in prompts:
        caches.append(m.new_cache())
        m(p, cache=caches[-1])
    merged = Cache.merge(caches)
    together = [m(steps[:, :1], cache=merged).logits]
    merged.select(torch.tensor([0, 2]))  # the 11-token row leaves
    together += [m(steps[[0, 2], t : t + 1], cache=merged).logits for t in range(1, 4)]
    assert (together[0][1] - alone[1][:, :1]).abs().max() <= 1e-5
    for row, mine in ((0, 0), (1, 2)):
        got = torch.cat([together[0][mine : mine + 1]] + [t[row : row + 1] for t in together[1:]], 1)
        assert (got - alone[mine]).abs().max() <= 1e-5
