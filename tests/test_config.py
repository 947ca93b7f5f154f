"""ModelConfig validation and serialisation; parameter and FLOP accounting."""

from __future__ import annotations

import pydantic
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import ModelConfig, build_model, flops_per_token, param_counts
from models.accounting import count_params, palm_flops_per_token
from tests.conftest import tiny

GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)


def error_of(**fields) -> str:
    with pytest.raises(pydantic.ValidationError) as info:
        tiny(**fields)
    return str(info.value)


def test_gpt2_small_has_nanogpts_parameter_count():
    assert param_counts(ModelConfig(**GPT2_SMALL))["total"] == 124_439_808


def test_round_trips_through_dict_and_yaml():
    config = tiny(attention={"name": "gqa", "n_kv_head": 2, "backend": {"name": "sdpa", "kernel": "math"}},
                  positional={"name": "rope", "base": 500.0}, mlp="swiglu", moe={"name": "switch", "n_experts": 4})
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_yaml(config.to_yaml()) == config
    # a name and the mapping with its defaults mean the same model
    assert tiny(mlp="gelu") == tiny(mlp={"name": "gelu", "hidden": None})


def test_unknown_names_list_the_valid_ones_and_the_closest():
    message = error_of(attention="gqq")
    assert "unknown attention 'gqq'" in message and "did you mean 'gqa'" in message
    assert "valid: based, deltanet, diff, gla, gqa, h3, linear, mamba2, mha, mla, mqa, retnet, window" in message
    assert "did you mean 'rope'" in error_of(positional="rop")
    assert "did you mean 'flash_attn'" in error_of(attention={"name": "mha", "backend": "flash_atn"})


def test_options_are_checked_by_name_and_type():
    assert "has no option 'n_kv_heads'" in error_of(attention={"name": "gqa", "n_kv_heads": 2})
    assert "needs option 'n_kv_head'" in error_of(attention="gqa")
    assert "option 'window' expects" in error_of(attention={"name": "window", "window": "8"})
    assert "option 'kernel' expects" in error_of(attention={"name": "mha", "backend": {"name": "sdpa", "kernel": "fast"}})


@pytest.mark.parametrize(
    "fields,expected",
    [
        (dict(attention={"name": "gqa", "n_kv_head": 3}), "n_kv_head=3 must divide n_head=4"),
        (dict(n_embd=30), "n_embd=30 must be divisible by n_head=4"),
        (dict(quantization={"name": "int4_weight_only", "group_size": 64}),
         "group_size=64 must divide every quantized layer's input width; 32 (blocks.0.attn.c_attn) is not a multiple"),
        (dict(mlp={"name": "gelu", "hidden": 100}, quantization={"name": "fake_quant", "group_size": 32}),
         "100 (blocks.0.mlp.c_proj) is not a multiple"),  # the MLP's hidden width, not only n_embd
        (dict(moe={"name": "topk", "n_experts": 2, "top_k": 3}), "top_k=3 must be between 1 and n_experts=2"),
    ],
)
def test_impossible_values_are_rejected_at_build(fields, expected):
    assert expected in error_of(**fields)


def test_incompatible_pairs_name_both_sides_and_what_would_work():
    message = error_of(positional="alibi", attention={"name": "mha", "backend": {"name": "sdpa", "kernel": "flash"}})
    assert ("attention 'mha' with backend 'sdpa kernel=flash' cannot add the positional encoding's score bias "
            "(bias), needed by positional 'alibi'") in message
    assert "auto, baddbmm, flash_attn, flex, math, sdpa, xformers" in message
    message = error_of(attention={"name": "window", "window": 8, "backend": {"name": "sdpa", "kernel": "flash"}})
    assert "cannot restrict queries to a sliding window (window), needed by attention 'window' (its own options)" in message
    message = error_of(dropout=0.1, attention={"name": "mha", "backend": "flex"})
    assert "with backend 'flex compile=True' cannot apply attention dropout (dropout), needed by dropout=0.1" in message
    assert "backends that can do everything this config needs: auto, baddbmm, flash_attn, math, sdpa, xformers" in message


@pytest.mark.parametrize(
    "fields",
    [
        {},
        dict(attention={"name": "gqa", "n_kv_head": 2}, positional="rope", norm="rmsnorm", mlp="swiglu"),
        dict(attention={"name": "mqa", "qk_norm": True}, tie_embeddings=False, bias=False),
        dict(moe={"name": "topk", "n_experts": 4, "top_k": 2, "shared_expert": True}),
        dict(moe={"name": "switch", "n_experts": 3, "expert": "geglu"}),
    ],
)
def test_param_counts_equal_a_direct_count_of_the_built_model(fields):
    config = tiny(**fields)
    model = build_model(config)
    counts = param_counts(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    tables = model.wte.weight.numel() + sum(p.numel() for p in model.positional.parameters())
    assert counts["non_embedding"] == counts["total"] - tables
    if config.moe:
        moe = model.blocks[0].mlp
        unused = (moe.n_experts - moe.top_k) * count_params(moe.experts[0]) * config.n_layer
        assert counts["active"] == counts["total"] - unused
    else:
        assert counts["active"] == counts["total"]


def measured_training_flops(config: ModelConfig, batch: int = 2) -> float:
    model = build_model(config)
    idx = torch.randint(0, config.vocab_size, (batch, config.block_size))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx)[1].backward()
    return counter.get_total_flops() / (batch * config.block_size)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        dict(mlp="swiglu", positional="rope", norm="rmsnorm"),
        dict(mlp="relu2", attention={"name": "gqa", "n_kv_head": 2}),
        dict(mlp="geglu", tie_embeddings=False),
        dict(moe={"name": "topk", "n_experts": 4, "top_k": 2, "capacity_factor": None}),
        dict(moe={"name": "switch", "n_experts": 4, "capacity_factor": None, "shared_expert": True}),
    ],
)
def test_flops_per_token_matches_torchs_flop_counter(fields):
    # the math backend runs the attention matmuls as matmuls the counter sees (full score matrix)
    config = tiny(attention={**tiny(**fields).attention, "backend": "math"},
                  **{k: v for k, v in fields.items() if k != "attention"})
    predicted = flops_per_token(config, causal=False)
    assert predicted == pytest.approx(measured_training_flops(config), rel=0.02)


def test_exact_count_agrees_with_the_palm_formula_for_gpt2_small():
    config = ModelConfig(**GPT2_SMALL)
    n = param_counts(config)["total"] - config.block_size * config.n_embd  # without position embeddings
    palm = palm_flops_per_token(n, 12, 12, 64, 1024)
    exact = flops_per_token(config, causal=False)
    # the formula's 6·N also counts biases and norm gains, which are not matmuls: 0.085% here
    assert exact == pytest.approx(palm, rel=1e-3)
    assert exact == 3 * (12 * (2 * 768 * (3 * 768 + 768 + 2 * 3072) + 4 * 768 * 1024) + 2 * 768 * 50257)


def test_causal_counts_only_visible_keys():
    config = tiny(block_size=64)
    attention_full = flops_per_token(config, causal=False) - flops_per_token(config, causal=True)
    per_layer_full = 3 * 4 * 32 * 64  # 3 × (2 matmuls × 2 FLOPs) × n_embd × keys
    assert attention_full == pytest.approx(2 * per_layer_full * (1 - 65 / 128))  # mean visible keys (T+1)/2
    windowed = tiny(block_size=64, attention={"name": "window", "window": 8})
    assert flops_per_token(windowed, causal=True) < flops_per_token(config, causal=True)
