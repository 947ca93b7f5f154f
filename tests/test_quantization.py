"""Quantization transforms on a briefly trained tiny model."""

from __future__ import annotations

import copy

import pytest
import torch

from models import available, build_model, quantize
from models.quantization import linear_weight_bytes, model_bytes
from tests.conftest import tiny

RUNNABLE = {row.name for row in available("quantization") if row.available}


def batches(n: int, seed: int):
    """A learnable toy language: each token is the previous one plus one, modulo 50, with noise."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 50, (n, 16, 1), generator=g)
    seq = (start + torch.arange(33)) % 50
    noise = torch.rand(seq.shape, generator=g) < 0.1
    seq = torch.where(noise, torch.randint(0, 50, seq.shape, generator=g), seq)
    return seq[..., :-1], seq[..., 1:]


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = build_model(tiny(n_embd=64, block_size=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    xs, ys = batches(150, seed=0)
    for x, y in zip(xs, ys):
        model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@torch.no_grad()
def val_loss(model) -> float:
    xs, ys = batches(8, seed=1)
    return sum(model(x, y)[1].item() for x, y in zip(xs, ys)) / len(xs)


@pytest.mark.skipif("int8_weight_only" not in RUNNABLE, reason="torchao not installed")
def test_int8_weight_only_keeps_the_loss_and_shrinks_linear_weights_4x(trained):
    before = val_loss(trained)
    assert before < 2.0  # it learned something (uniform would be ln 50 = 3.9)
    model = copy.deepcopy(trained)
    float_bytes = linear_weight_bytes(model)
    quantize(model, "int8_weight_only")
    assert abs(val_loss(model) - before) / before < 0.01
    ratio = float_bytes / linear_weight_bytes(model)
    assert 3.5 < ratio <= 4.0  # int8 values plus one fp32 scale per output channel
    assert model_bytes(model) < model_bytes(trained)


@pytest.mark.parametrize("name", ["int8_dynamic", "int4_weight_only"])
def test_other_post_training_transforms_run_and_stay_close(trained, name):
    if name not in RUNNABLE:
        pytest.skip(next(r.reason for r in available("quantization", name)))
    before = val_loss(trained)
    model = copy.deepcopy(trained)
    quantizer = quantize(model, name)
    assert abs(val_loss(model) - before) / before < (0.05 if name == "int8_dynamic" else 0.15)
    assert quantizer.format


@pytest.mark.skipif("fake_quant" not in RUNNABLE, reason="torchao not installed")
def test_fake_quant_trains_with_quantized_weights():
    float_model = build_model(tiny())
    qat = build_model(tiny(quantization={"name": "fake_quant", "bits": 4, "group_size": 16}))
    assert type(qat.blocks[0].attn.c_attn).__name__ == "FakeQuantizedLinear"
    assert type(qat.lm_head).__name__ == "Linear"  # the tied head stays in float
    qat.load_state_dict(float_model.state_dict())
    x, y = batches(1, seed=2)
    assert not torch.allclose(qat(x[0], y[0])[1], float_model(x[0], y[0])[1])  # weights were rounded
    qat(x[0], y[0])[1].backward()
    assert qat.blocks[0].attn.c_attn.weight.grad.abs().sum() > 0  # straight-through gradients


def test_post_training_transforms_are_not_applied_at_build():
    model = build_model(tiny(quantization="int8_dynamic"))
    assert type(model.blocks[0].attn.c_attn.weight).__name__ in ("Parameter", "Tensor")
