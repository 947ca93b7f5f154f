"""MLA's absorbed decode (DeepSeek-V2's inference form): a decode step attends over the cached latents with
W_UK folded into the queries and W_UV into the output, and must give exactly what the expanded path (the
full forward) gives — under every positional encoding MLA takes, with a window, with kv_up's biases, for
rows at different positions (a merged cache), under autocast — without ever up-projecting the cache."""

from __future__ import annotations

import pytest
import torch

from models import available, build_model
from models.attention_modern import MultiHeadLatentAttention
from models.gpt import Cache
from models.registry import build_spec
from tests.conftest import tiny

VARIANTS = {
    "mla": {"name": "mla", "kv_rank": 16},  # head_dim 8, rope_dim 4: the latent wider than a head
    "mla+q_rank": {"name": "mla", "kv_rank": 6, "q_rank": 16, "rope_dim": 2},  # the latent narrower than a head
    "mla+window": {"name": "mla", "kv_rank": 16, "window": 5},  # the rolling cache rolls within the prompt
}
POSITIONALS = ["rope", "alibi", "learned", "sinusoidal", "none"]


def model_for(variant: str, positional: str, backend: str = "math"):
    """A tiny MLA model with bias everywhere, every bias drawn: kv_up's b_UK and b_UV fold into the
    absorbed path differently (the softmax drops the first, the second is added once)."""
    config = tiny(attention={**VARIANTS[variant], "backend": backend}, positional=positional, bias=True)
    model = build_model(config, seed=0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture
def expansions(monkeypatch):
    """Counts calls of MLA's expand (the whole cache up-projected into each head's keys and values)."""
    calls = []
    expand = MultiHeadLatentAttention.expand
    monkeypatch.setattr(MultiHeadLatentAttention, "expand",
                        lambda self, *a: calls.append(a[0].shape) or expand(self, *a))
    return calls


@pytest.mark.parametrize("positional", POSITIONALS)
@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_absorbed_decode_gives_the_full_forwards_logits(variant, positional, expansions):
    model = model_for(variant, positional)
    idx = torch.randint(0, 50, (2, 20))
    full = model(idx).logits  # causal: position t's logits are those of a full forward of idx[:, :t + 1]
    cache = model.new_cache()
    assert torch.allclose(model(idx[:, :9], cache=cache).logits, full[:, :9], atol=1e-5, rtol=0)  # prefill
    expansions.clear()
    chunk = model(idx[:, 9:12], cache=cache).logits  # 3 tokens after cached ones: causal among them
    assert torch.allclose(chunk, full[:, 9:12], atol=1e-5, rtol=0)
    for t in range(12, 20):  # one token at a time
        got = model(idx[:, t : t + 1], cache=cache).logits[:, -1]
        assert torch.allclose(got, full[:, t], atol=1e-5, rtol=0), t
    assert not expansions, "decode steps must attend over the latents, never expand the cache"


def decode_alone(model, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """One sequence prefilled and fed `tokens` one at a time with its own cache -> the logits (n, vocab)
    after its prompt and after each token but the last."""
    cache = model.new_cache()
    seen = [model(prompt[None], cache=cache).logits[0, -1]]
    seen += [model(token.view(1, 1), cache=cache).logits[0, -1] for token in tokens[:-1]]
    return torch.stack(seen)


@pytest.mark.parametrize("variant,positional", [("mla", "rope"), ("mla", "alibi"), ("mla+window", "rope"),
                                                ("mla+q_rank", "learned")])
@torch.no_grad()
def test_a_merged_cache_decodes_each_row_as_alone(variant, positional, expansions):
    """Two requests of different lengths (5 and 11 tokens) prefilled alone, merged into one cache (right-
    aligned, the shorter one left-padded) and decoded together: each row gets what decoding it alone gets."""
    model = model_for(variant, positional)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50, (n,), generator=gen) for n in (5, 11)]
    tokens = torch.randint(0, 50, (2, 6), generator=gen)  # the tokens each row is fed
    alone = [decode_alone(model, prompt, row) for prompt, row in zip(prompts, tokens)]

    caches, seen = [], []
    for prompt in prompts:
        caches.append(model.new_cache())
        seen.append(model(prompt[None], cache=caches[-1]).logits[0, -1])
    merged = Cache.merge(caches)
    steps = [torch.stack(seen)]  # (2, vocab) per step
    expansions.clear()
    for t in range(tokens.shape[1] - 1):
        steps.append(model(tokens[:, t : t + 1], cache=merged).logits[:, -1])
    assert not expansions
    together = torch.stack(steps, 1)  # (2, steps, vocab)
    for row in range(2):
        assert torch.allclose(together[row], alone[row], atol=1e-5, rtol=0), row


@torch.no_grad()
def test_decoding_takes_the_absorbed_path_and_only_decoding(expansions):
    """expand (the old decode: the whole latent cache up-projected at every step) runs for a prefill,
    training, the full forward and a long chunk; never for a step of one token over a cache."""
    model = model_for("mla", "rope")  # kv_rank 16, head_dim 8: absorbing is cheaper for T < 8·16/(16 − 8) = 16
    attn = model.blocks[0].attn
    assert attn.absorbs(1, model.new_cache().layers[0]) is False  # an empty cache: that step is a prefill
    idx = torch.randint(0, 50, (1, 32))
    cache = model.new_cache()
    model(idx[:, :8], cache=cache)
    assert len(expansions) == 2  # the prefill expands, once per layer
    layer = cache.layers[0]
    assert attn.absorbs(1, layer) and attn.absorbs(15, layer) and not attn.absorbs(16, layer)

    expansions.clear()
    model(idx[:, 8:9], cache=cache)
    assert expansions == []
    model(idx[:, 9:25], cache=cache)  # 16 tokens at once: expanding is cheaper, and runs
    assert [shape[1] for shape in expansions] == [25, 25]
    model(idx)
    assert len(expansions) == 4  # no cache: the expanded path

    expansions.clear()
    model.train()  # training keeps the expanded path, cache or not
    model(idx[:, 25:26], cache=cache)
    assert len(expansions) == 2


@pytest.mark.parametrize("positional", ["rope", "alibi"])
@torch.no_grad()
def test_absorbed_decode_under_autocast_matches_the_expanded_path(positional, monkeypatch):
    """bf16 autocast: the absorbed step gives the expanded step's logits in the expanded step's dtype,
    within bf16's precision, and its cache keeps the projection's dtype."""
    model = model_for("mla+window", positional)
    idx = torch.randint(0, 50, (2, 12))
    outputs = {}
    for path in ("absorbed", "expanded"):
        if path == "expanded":
            monkeypatch.setattr(MultiHeadLatentAttention, "absorbs", lambda self, T, cache: False)
        cache = model.new_cache()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(idx[:, :8], cache=cache)
            outputs[path] = torch.cat([model(idx[:, t : t + 1], cache=cache).logits for t in range(8, 12)], 1)
        assert cache.layers[0].c_kv.dtype == torch.bfloat16
    assert outputs["absorbed"].dtype == outputs["expanded"].dtype
    assert torch.allclose(outputs["absorbed"].float(), outputs["expanded"].float(), atol=0.05, rtol=0.02)


@torch.no_grad()
def test_a_bf16_model_decodes_in_bf16_close_to_fp32():
    model = model_for("mla", "rope")
    idx = torch.randint(0, 50, (2, 12))
    full = model(idx).logits[:, 8:]
    model = model.to(torch.bfloat16)
    cache = model.new_cache()
    model(idx[:, :8], cache=cache)
    steps = torch.cat([model(idx[:, t : t + 1], cache=cache).logits for t in range(8, 12)], 1)
    assert steps.dtype == torch.bfloat16
    assert torch.allclose(steps.float(), full, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("quantization", [{"name": "int8_weight_only"}, {"name": "fake_quant", "group_size": 16}],
                         ids=["int8_weight_only", "fake_quant"])
@torch.no_grad()
def test_a_quantized_up_projection_decodes_as_its_forward_defines_it(quantization, expansions):
    """Absorbing reads kv_up's weight; a quantized kv_up (a tensor subclass) or a fake-quantized one (a Linear
    subclass) computes with another, so its decode steps expand, and still give the full forward's logits."""
    row = available("quantization", quantization["name"])[0]
    if not row.available:
        pytest.skip(row.reason)
    model = build_spec("quantization", quantization).apply(model_for("mla", "rope")).eval()
    idx = torch.randint(0, 50, (2, 12))
    full = model(idx).logits
    cache = model.new_cache()
    model(idx[:, :8], cache=cache)
    expansions.clear()
    steps = torch.cat([model(idx[:, t : t + 1], cache=cache).logits for t in range(8, 12)], 1)
    assert len(expansions) == 4 * 2  # every step, every layer
    assert torch.allclose(steps, full[:, 8:], atol=1e-5, rtol=0)
