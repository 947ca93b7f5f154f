"""The component contract: register checks a component against its family's protocol, configs are
refused when their attention does not handle what they need, and FLOP accounting matches torch's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import ComponentError, build, build_model, check_flops, contract, list_components
from models.accounting import counted_flops, matmul_flops_per_token
from models.registry import get
from tests.conftest import registered, tiny

ROOT = Path(__file__).resolve().parents[1]


class LinearAttention(nn.Module):
    """docs/plugins.md's plugin, before it declares its FLOPs and init blocks: causal linear attention,
    which uses no positions, dropout or cache."""

    handles = staticmethod(lambda config, options: frozenset())

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, positional, pos, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).unbind(2)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        kv = torch.einsum("bthd,bthe->bthde", k, v).cumsum(1)
        num = torch.einsum("bthd,bthde->bthe", q, kv)
        den = torch.einsum("bthd,bthd->bth", q, k.cumsum(1)).unsqueeze(-1) + 1e-6
        return self.c_proj((num / den).reshape(B, T, C))


def refusal(**fields) -> str:
    with pytest.raises(pydantic.ValidationError) as info:
        tiny(**fields)
    return str(info.value)


def test_an_attention_that_does_not_rotate_is_refused_rope_and_alibi_and_dropout():
    with registered("attention", "toy_linear", LinearAttention):
        assert tiny(attention="toy_linear", positional="learned")  # positions added to the embeddings: fine
        assert ("attention 'toy_linear' does not rotate q and k by the positional encoding (rotate), needed by "
                "positional 'rope'") in refusal(attention="toy_linear", positional="rope")
        assert "(bias), needed by positional 'alibi'" in refusal(attention="toy_linear", positional="alibi")
        message = refusal(attention="toy_linear", positional="learned", dropout=0.1)
        assert "does not apply attention dropout (dropout), needed by dropout=0.1" in message
        assert build_model(tiny(attention="toy_linear")).new_cache() is None  # handles no 'cache'


def test_built_in_attentions_declare_what_their_kernel_can_do():
    from models.config import attention_features

    assert attention_features(tiny()) == {"rotate", "bias", "dropout", "window", "cache", "ragged", "value_residual"}
    flash = tiny(attention={"name": "mha", "backend": {"name": "sdpa", "kernel": "flash"}})
    assert attention_features(flash) == {"rotate", "dropout", "value_residual"}  # no masks: neither bias, window nor decode
    flex = attention_features(tiny(attention={"name": "mha", "backend": "flex"}))
    assert "dropout" not in flex and "ragged" not in flex and "cache" in flex  # decodes, rows at one position


def test_register_names_what_a_component_lacks():
    class NoHandles(nn.Module):
        def forward(self, x, positional, pos, cache=None):
            return x

    with pytest.raises(ComponentError) as info:
        with registered("attention", "nohandles", NoHandles):
            pass
    message = str(info.value)
    assert message.startswith("attention 'nohandles' (test_register_names_what_a_component_lacks.<locals>.NoHandles) "
                              "does not follow the attention contract: it lacks handles(config: Any, options: dict)")
    assert "python -m models attention" in message
    assert "nohandles" not in list_components("attention")

    class NoForward:
        pass

    with pytest.raises(ComponentError, match="lacks forward"):
        with registered("norm", "noforward", NoForward):
            pass


def test_requires_has_one_shape_across_families():
    class OldStyle(nn.Module):
        @staticmethod
        def requires(options):  # the pre-contract attention form: options only
            return set()

        def forward(self, x):
            return x

    with pytest.raises(ComponentError, match=r"requires takes 1 argument\(s\) but the contract calls requires\(config"):
        with registered("mlp", "oldstyle", OldStyle):
            pass
    for family in ("attention", "positional", "mlp", "moe", "norm"):  # every built-in follows it
        for name in list_components(family):
            assert contract.violations(family, get(family, name).factory) == []


def test_a_function_factory_is_checked_when_it_builds():
    def make(dim, config=None):
        return object()  # no forward

    with registered("norm", "broken", make):
        with pytest.raises(ComponentError, match="norm 'broken' built an object that lacks forward"):
            build("norm", "broken", 8, tiny())


MODULE_FAMILIES = ("attention", "positional", "norm", "mlp", "moe")
OPTIONS = {("attention", "gqa"): {"n_kv_head": 2}, ("attention", "window"): {"window": 4}, ("attention", "mla"): {"kv_rank": 16}}


@pytest.mark.parametrize("family,name", [(f, n) for f in MODULE_FAMILIES for n in list_components(f)])
def test_flop_accounting_of_every_registered_component_matches_torchs_counter(family, name):
    assert check_flops(family, name, OPTIONS.get((family, name))) is None


def test_a_component_that_hides_matmuls_from_the_accounting_is_caught():
    with registered("attention", "toy_linear", LinearAttention):
        message = check_flops("attention", "toy_linear")
        assert message and "declare extra_flops_per_token" in message  # its einsums are not nn.Linear

        def extra(self, seq_len, causal):  # q·(Σ k vᵀ): H·D·D multiply-adds; q·Σk: H·D (k vᵀ is no matmul)
            head_dim = self.c_proj.in_features // self.n_head
            return 2 * self.n_head * head_dim * (head_dim + 1)

        LinearAttention.extra_flops_per_token = extra
        try:
            assert check_flops("attention", "toy_linear") is None
        finally:
            del LinearAttention.extra_flops_per_token


def test_counted_flops_sees_what_a_module_runs():
    linear = nn.Linear(8, 4, bias=False)
    assert counted_flops(linear, torch.randn(3, 8)) == 2 * 3 * 8 * 4 == matmul_flops_per_token(linear, 1, False) * 3


def test_python_m_models_family_prints_its_contract():
    result = subprocess.run([sys.executable, "-m", "models", "attention"], capture_output=True, text=True,
                            env={"COLUMNS": "200", "PATH": ""}, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for text in ("Attention features:", "rotate", "handles(config: Any, options: dict) -> frozenset[str]  [required",
                 "new_cache() -> Any  [optional]", "extra_flops_per_token"):
        assert text in result.stdout
