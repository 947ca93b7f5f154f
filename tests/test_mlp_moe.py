"""MLPs at matched parameters, and the MoE layer's routing, capacity and losses."""

from __future__ import annotations

import pytest
import torch

from models import build, build_model
from models.accounting import count_params
from models.mlp import gated_hidden
from tests.conftest import tiny


@pytest.mark.parametrize("width", [96, 192, 384, 768, 1024])
@pytest.mark.parametrize("name", ["swiglu", "geglu"])
def test_gated_mlp_defaults_match_the_gelu_mlps_parameters(name, width):
    config = tiny(n_embd=width, n_head=4)
    gelu = count_params(build("mlp", "gelu", config))
    gated = count_params(build("mlp", name, config))
    assert abs(gated - gelu) / gelu < 0.02


def test_gated_hidden_rounds_two_thirds_of_four_d_up_to_64():
    assert gated_hidden(768) == 2048
    assert gated_hidden(100) == 320  # 266.7 → 320
    assert count_params(build("mlp", "swiglu", tiny(), hidden=40)) == 32 * 80 + 80 + 40 * 32 + 32


def test_relu_squared_is_relu_then_square():
    mlp = build("mlp", "relu2", tiny())
    x = torch.randn(3, 32)
    expected = mlp.c_proj(torch.relu(mlp.c_fc(x)) ** 2)
    assert torch.allclose(mlp(x), expected)


def test_moe_with_one_expert_and_no_capacity_limit_equals_the_dense_mlp():
    config = tiny()
    dense = build("mlp", "gelu", config)
    moe = build("moe", "topk", config, n_experts=1, top_k=1, capacity_factor=None)
    moe.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(2, 7, 32)
    assert torch.equal(moe(x)[0], dense(x))


def test_balancing_loss_is_minimal_at_uniform_routing():
    moe = build("moe", "topk", tiny(), n_experts=4, top_k=1, capacity_factor=None)
    x = torch.randn(1, 64, 32)
    with torch.no_grad():
        moe.router.weight.zero_()  # every expert equally likely
    uniform = moe(x)[1].stats["balance_loss"].item()
    assert uniform == pytest.approx(1.0)
    for seed in range(5):  # any other router is no better
        torch.manual_seed(seed)
        with torch.no_grad():
            moe.router.weight.normal_(0, 1)
        assert moe(x)[1].stats["balance_loss"].item() >= uniform - 1e-6
    with torch.no_grad():  # everything to expert 0: the maximum, E
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0
    assert moe(x.abs())[1].stats["balance_loss"].item() > 3.0


def test_tokens_over_capacity_are_dropped_and_counted():
    moe = build("moe", "switch", tiny(), n_experts=4, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 1.0  # every token prefers expert 2
    x = torch.randn(1, 16, 32).abs()
    out, aux = moe(x)
    capacity = 4  # ⌈1.0 · 1 · 16 / 4⌉
    assert aux.stats["tokens_per_expert"].tolist() == [0, 0, 16, 0]
    assert aux.stats["dropped"].item() == 16 - capacity
    # the first `capacity` tokens were processed; the dropped ones output zero (residual passes them)
    assert (out[0, capacity:] == 0).all() and (out[0, :capacity] != 0).any()
    moe.eval()  # evaluation is dropless: every token reaches its expert
    out, aux = moe(x)
    assert (out[0] != 0).any(-1).all() and aux.stats["dropped"].item() == 0


def test_topk_gates_are_renormalised_over_the_chosen_experts():
    moe = build("moe", "topk", tiny(), n_experts=2, top_k=2, capacity_factor=None)
    x = torch.randn(1, 5, 32)
    expected = sum(
        torch.softmax(moe.router(x), -1)[..., e : e + 1] * moe.experts[e](x) for e in range(2)
    )  # with k = E every expert sees every token, gates sum to 1
    assert torch.allclose(moe(x)[0], expected, atol=1e-6)


def test_first_choices_take_capacity_before_second_choices():
    moe = build("moe", "topk", tiny(), n_experts=2, top_k=2, capacity_factor=0.5)  # capacity 4 of 8
    x = torch.randn(1, 8, 32)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0], moe.router.weight[1, 0] = 1.0, -1.0
        x[0, :4, 0], x[0, 4:, 0] = 3.0, -3.0  # tokens 0-3 prefer expert 0, tokens 4-7 expert 1
    out, aux = moe(x)
    probs = torch.softmax(moe.router(x), -1)
    first = torch.cat([moe.experts[0](x[:, :4]) * probs[:, :4, :1], moe.experts[1](x[:, 4:]) * probs[:, 4:, 1:]], 1)
    assert aux.stats["dropped"].item() == 8  # every second choice
    assert torch.allclose(out, first, atol=1e-6)


def test_gpt_with_moe_adds_aux_losses_and_reports_them():
    model = build_model(tiny(moe={"name": "topk", "n_experts": 4, "top_k": 2}))
    idx = torch.randint(0, 50, (2, 16))
    logits, loss, aux = model(idx, idx)
    lm = torch.nn.functional.cross_entropy(logits.view(-1, 50), idx.view(-1))
    assert torch.allclose(loss.detach(), lm + sum(a.loss for a in aux))
    assert len(aux) == 2 and aux[0].stats["tokens_per_expert"].sum().item() == 2 * 16 * 2
    loss.backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0  # the router learns


def test_moe_shared_expert_and_any_registered_mlp_as_expert():
    moe = build("moe", "topk", tiny(), n_experts=3, expert={"name": "swiglu", "hidden": 48}, shared_expert=True)
    assert count_params(moe.experts[0]) == 32 * 96 + 96 + 48 * 32 + 32
    assert moe.shared is not None and moe(torch.randn(1, 4, 32))[0].shape == (1, 4, 32)
