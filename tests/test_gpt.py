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


def test_untied_head_and_no_bias():
    model = build_model(tiny(tie_embeddings=False, bias=False))
    assert model.wte.weight is not model.lm_head.weight
    assert model.blocks[0].attn.c_attn.bias is None and model.blocks[0].norm_1.bias is None


def test_targets_of_minus_one_are_ignored():
    model = build_model(tiny())
    idx = torch.randint(0, 50, (2, 10))
    targets = torch.full((2, 10), -1)
    targets[:, 4] = idx[:, 5]
    logits, loss = model(idx, targets)
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
