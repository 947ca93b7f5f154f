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
