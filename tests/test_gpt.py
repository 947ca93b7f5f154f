"""The assembled GPT: it computes what nanoGPT computes, initialises like nanoGPT, generates."""

from __future__ import annotations

import math

import torch

from bench.overhead import NanoGPT, copy_weights
from models import build_model
from tests.conftest import tiny


def test_default_config_computes_what_a_hand_written_nanogpt_computes():
    config = tiny()
    model = build_model(config)
    hand = NanoGPT(**config.to_dict())
    copy_weights(model, hand)
    idx = torch.randint(0, 50, (3, 32))
    targets = torch.randint(0, 50, (3, 32))
    assert torch.allclose(model(idx, targets)[1], hand(idx, targets), atol=1e-6)


def test_nanogpt_initialisation():
    torch.manual_seed(0)
    config = tiny(n_layer=8, n_embd=256, n_head=4, vocab_size=2000)
    model = build_model(config)
    assert model.wte.weight is model.lm_head.weight
    assert abs(model.wte.weight.std().item() - 0.02) < 1e-3
    assert abs(model.blocks[0].attn.c_attn.weight.std().item() - 0.02) < 1e-3
    residual = 0.02 / math.sqrt(2 * 8)
    assert abs(model.blocks[0].attn.c_proj.weight.std().item() - residual) < 5e-4
    assert abs(model.blocks[3].mlp.c_proj.weight.std().item() - residual) < 5e-4
    assert model.blocks[0].attn.c_attn.bias.abs().max() == 0


def test_two_configs_differing_in_one_module_share_every_other_parameter():
    mha = build_model(tiny(positional="rope"), seed=3).state_dict()
    for other, differs in ((dict(attention={"name": "gqa", "n_kv_head": 2}), ("attn.c_attn",)),
                           (dict(attention={"name": "mha", "qk_norm": True}), ("attn.q_norm", "attn.k_norm")),
                           (dict(mlp="swiglu"), ("mlp.c_fc", "mlp.c_proj")),  # its hidden width differs
                           (dict(attention={"name": "window", "window": 8}), ())):
        state = build_model(tiny(positional="rope", **other), seed=3).state_dict()
        rest = [k for k in state if not any(d in k for d in differs)]
        assert len(rest) >= 20 and all(k in mha and torch.equal(mha[k], state[k]) for k in rest), other
    # the fused q/k/v projection is drawn in blocks: GQA and MQA share MHA's queries and common k/v heads
    gqa = build_model(tiny(positional="rope", attention={"name": "gqa", "n_kv_head": 2}), seed=3).state_dict()
    mha_qkv, gqa_qkv = mha["blocks.0.attn.c_attn.weight"], gqa["blocks.0.attn.c_attn.weight"]  # D = 8
    assert torch.equal(mha_qkv[:32], gqa_qkv[:32])  # q
    assert torch.equal(mha_qkv[32:48], gqa_qkv[32:48]) and torch.equal(mha_qkv[64:80], gqa_qkv[48:64])  # k0 k1, v0 v1
    another = build_model(tiny(positional="rope"), seed=4).state_dict()
    assert not torch.equal(mha["blocks.1.mlp.c_fc.weight"], another["blocks.1.mlp.c_fc.weight"])
    # the seed decides, not the global generator, and building leaves the caller's stream (dropout) where it was
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert torch.equal(build_model(tiny(positional="rope"), seed=3).state_dict()["wte.weight"], mha["wte.weight"])
    assert torch.equal(torch.get_rng_state(), before)


def test_untied_head_and_no_bias():
    model = build_model(tiny(tie_embeddings=False, bias=False))
    assert model.wte.weight is not model.lm_head.weight
    assert model.blocks[0].attn.c_attn.bias is None and model.blocks[0].norm_1.bias is None


def test_targets_of_minus_one_are_ignored():
    model = build_model(tiny())
    idx = torch.randint(0, 50, (2, 10))
    targets = torch.full((2, 10), -1)
    targets[:, 4] = idx[:, 5]
    logits, loss, _ = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 4], idx[:, 5])
    assert torch.allclose(loss, expected)


def test_sampling_respects_top_k_and_is_seeded():
    model = build_model(tiny()).eval()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    torch.manual_seed(5)
    a = model.generate(prompt, 8, temperature=1.0, top_k=1)
    greedy = model.generate(prompt, 8, temperature=0)
    assert torch.equal(a, greedy)  # top-1 sampling is greedy
    torch.manual_seed(5)
    b = model.generate(prompt, 8, temperature=1.5, top_k=10)
    torch.manual_seed(5)
    assert torch.equal(b, model.generate(prompt, 8, temperature=1.5, top_k=10))


# -- modern-recipe options: value residual and logit soft-capping ------------------------------------


def test_value_residual_and_softcap_are_exact_no_ops_when_off():
    off = tiny()
    explicit = tiny(value_residual=False, logit_softcap=None)
    assert explicit.to_dict() == off.to_dict() and "value_residual" not in off.to_dict()  # run ids as before
    # no new parameter; the outputs are nanoGPT's (test_default_config_computes_what_a_hand_written_nanogpt_computes)
    model = build_model(off, seed=3)
    assert model.value_mix is None and "value_mix" not in model.state_dict()


def test_logit_softcap_is_cap_times_tanh_of_the_uncapped_logits():
    capped = build_model(tiny(logit_softcap=2.0), seed=0)
    plain = build_model(tiny(), seed=0)
    assert capped.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(capped.state_dict())
    with torch.no_grad():  # large logits, so that the cap bites
        plain.lm_head.weight.mul_(50)
        capped.lm_head.weight.mul_(50)
    idx = torch.randint(0, 50, (2, 16))
    raw, logits = plain(idx).logits, capped(idx).logits
    assert raw.abs().max() > 4.0 and logits.abs().max() <= 2.0
    assert torch.allclose(logits, 2.0 * torch.tanh(raw / 2.0), atol=1e-6)
    targets = torch.randint(0, 50, (2, 16))
    assert torch.allclose(capped(idx, targets).loss, torch.nn.functional.cross_entropy(logits.view(-1, 50), targets.view(-1)))


def test_value_residual_mixes_the_first_layers_values_and_learns_the_mix():
    config = tiny(n_layer=3, value_residual=True)
    mixed = build_model(config, seed=0)
    plain = build_model(tiny(n_layer=3), seed=0)
    assert mixed.value_mix.shape == (4,) and torch.equal(mixed.value_mix, torch.full((4,), 0.5))
    weights = {k: v for k, v in mixed.state_dict().items() if k != "value_mix"}
    assert weights.keys() == plain.state_dict().keys()
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        mixed.value_mix.copy_(torch.tensor([1.0, 0.0, 1.0, 0.0]))  # a = 1, b = 0: each layer's own values
        assert torch.equal(mixed(idx).logits, plain(idx).logits)
        mixed.value_mix.copy_(torch.tensor([0.0, 1.0, 0.0, 1.0]))  # every layer attends to layer 0's values
        seen = []
        for block in mixed.blocks:  # the values each layer attends to, recorded at its kernel
            kernel = block.attn.attend.kernel
            block.attn.attend.kernel = lambda q, k, v, mask, p, kernel=kernel: seen.append(v) or kernel(q, k, v, mask, p)
        mixed(idx)
        assert torch.equal(seen[1], seen[0]) and torch.equal(seen[2], seen[0])
    mixed.value_mix.data.fill_(0.5)
    mixed(idx, torch.randint(0, 50, (2, 16))).loss.backward()
    assert mixed.value_mix.grad is not None and mixed.value_mix.grad.abs().sum() > 0


@torch.no_grad()
def test_value_residual_decodes_with_the_kv_cache_as_the_full_forward():
    model = build_model(tiny(attention={"name": "gqa", "n_kv_head": 2}, positional="rope", value_residual=True,
                             logit_softcap=15.0), seed=1).eval()
    model.value_mix.copy_(torch.tensor([0.3, 0.9]))
    idx = torch.randint(0, 50, (2, 20))
    full = model(idx).logits
    cache = model.new_cache()
    steps = [model(idx[:, :9], cache=cache).logits] + [model(idx[:, t: t + 1], cache=cache).logits for t in range(9, 20)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_value_residual_needs_an_attention_that_handles_it():
    import pytest

    from tests.conftest import registered

    class OwnValues(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.c_proj = torch.nn.Linear(config.n_embd, config.n_embd)

        @staticmethod
        def handles(config, options):
            return frozenset({"rotate"})

        def forward(self, x, positional, pos, cache=None):
            return self.c_proj(x)

    with registered("attention", "own_values", OwnValues):
        build_model(tiny(attention="own_values"))  # fine without value residual
        with pytest.raises(ValueError, match=r"attention 'own_values' does not mix the first layer's values into "
                                             r"its own \(model.value_residual\) \(value_residual\), needed by value_residual: true"):
            tiny(attention="own_values", value_residual=True)
