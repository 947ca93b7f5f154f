"""The plugin traps a dry run or the registry catches: FLOPs the accounting misses, a fused projection
with no init blocks, and a `backend` option that is not declared a backend reference."""

from __future__ import annotations

import textwrap

import pydantic
import pytest
import torch
from torch import nn

from bench.run import main
from models import ComponentError, build_model, register
from models.attention import Attention
from models.plugin_checks import is_plugin, plugin_warnings
from models.registry import get
from tests.conftest import registered, tiny
from tests.test_contract import LinearAttention


def declared(cls: type) -> type:
    """LinearAttention with its FLOPs and its fused projection's blocks declared, as docs/plugins.md's."""

    class Declared(cls):
        def extra_flops_per_token(self, seq_len, causal):  # q·(Σ k vᵀ) and q·Σk per head: no nn.Linear
            head_dim = self.c_proj.in_features // self.n_head
            return 2 * self.n_head * head_dim * (head_dim + 1)

        def init_blocks(self):
            C = self.c_proj.in_features
            return {"c_attn.weight": [("q", C), ("k", C), ("v", C)]}

    return Declared


def test_a_plugin_that_undercounts_its_flops_or_draws_a_fused_projection_whole_is_warned_about():
    with registered("attention", "toy_linear", LinearAttention):
        warnings = plugin_warnings(tiny(attention="toy_linear"))
        assert len(warnings) == 2
        flops, fused = warnings
        assert flops.startswith("attention 'toy_linear': the accounting says") and "declare extra_flops_per_token" in flops
        assert "its projection 'c_attn' (32 → 96 rows) fuses blocks but the module declares no init_blocks()" in fused
    with registered("attention", "toy_linear", declared(LinearAttention)):
        assert plugin_warnings(tiny(attention="toy_linear")) == []


def test_a_plugin_that_cannot_be_built_small_is_a_warning_not_a_crash():
    class NeedsLongBlocks(declared(LinearAttention)):
        def __init__(self, config):
            if config.block_size < 64:
                raise ValueError("block_size must be at least 64\nsecond line")
            super().__init__(config)

    with registered("attention", "toy_linear", NeedsLongBlocks):
        assert plugin_warnings(tiny(attention="toy_linear", block_size=64)) == [
            "attention 'toy_linear': could not be checked at a small size (ValueError: block_size must be at least 64)"]


def test_a_plugins_options_are_checked_at_the_models_own_heads():
    class Grouped(declared(LinearAttention)):
        def __init__(self, config, *, groups: int = 1):
            if config.n_head % groups:
                raise ValueError(f"groups={groups} must divide n_head={config.n_head}")
            super().__init__(config)

    with registered("attention", "toy_linear", Grouped):
        assert plugin_warnings(tiny(n_head=6, n_embd=48, attention={"name": "toy_linear", "groups": 3})) == []


def test_flops_within_two_percent_pass_and_built_ins_are_not_checked():
    class SlightlyOff(declared(LinearAttention)):
        def extra_flops_per_token(self, seq_len, causal):
            return super().extra_flops_per_token(seq_len, causal) * 1.01  # 1% of attention's, less of the total

    with registered("attention", "toy_linear", SlightlyOff):
        assert plugin_warnings(tiny(attention="toy_linear")) == []
    assert not is_plugin(get("attention", "mha")) and plugin_warnings(tiny(attention={"name": "gqa", "n_kv_head": 2})) == []


def test_the_dry_run_prints_the_plugins_warnings(tmp_path, monkeypatch, capsys):
    from models.registry import _REGISTRY

    monkeypatch.setitem(_REGISTRY, "attention", dict(_REGISTRY["attention"]))  # the family as it was, after the test
    (tmp_path / "undeclared_attention.py").write_text(  # linear attention declaring neither FLOPs nor blocks
        "from models import register\nfrom tests.test_contract import LinearAttention\n\n"
        "register('attention', 'undeclared')(LinearAttention)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent("""
        name: plugged
        plugins: [undeclared_attention]
        base:
          model: {n_layer: 1, n_head: 2, n_embd: 16}
          data: {source: task, task: induction, vocab_size: 16, seq_len: 16, n_train: 64}
          train: {batch_size: 4}
        budget: {steps: 2}
        variants:
          mha: {}
          undeclared: {model.attention: undeclared}
        seeds: 1
    """))
    assert main([str(spec), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.count("warning: attention 'undeclared'") == 2  # once per distinct model, not per run
    assert "declare extra_flops_per_token" in out and "declares no init_blocks()" in out


class StringBackend(Attention):
    """A subclass that re-declares `backend` as a plain string."""

    def __init__(self, config, *, backend: str = "auto", gate: bool = True):
        super().__init__(config, backend=backend)
        self.gate = nn.Linear(config.n_embd, config.n_embd) if gate else None


def test_an_option_named_backend_is_always_a_backend_reference(tmp_path, capsys):
    with registered("attention", "stringy", StringBackend):
        assert get("attention", "stringy").options["backend"].family == "attention_backend"
        assert tiny(attention={"name": "stringy", "backend": "math"}).attention["backend"] == {"name": "math"}
        with pytest.raises((pydantic.ValidationError, ComponentError), match="unknown attention_backend 'nope'"):
            tiny(attention={"name": "stringy", "backend": "nope"})
        if get("attention_backend", "xformers").unavailable_reason() is None:
            return  # xformers runs here: nothing to refuse
        refusals = []
        for attention in ("{name: gqa, n_kv_head: 2, backend: xformers}", "{name: stringy, backend: xformers}"):
            spec = tmp_path / "spec.yaml"
            spec.write_text(textwrap.dedent(f"""
                name: kernels
                base:
                  model: {{n_layer: 1, n_head: 2, n_embd: 16}}
                  data: {{source: task, task: induction, vocab_size: 16, seq_len: 16, n_train: 64}}
                budget: {{steps: 2}}
                variants:
                  mha: {{}}
                  other: {{model.attention: {attention}}}
            """))
            assert main([str(spec), "--dry-run", "--out", str(tmp_path / "out")]) == 2
            refusals.append(capsys.readouterr().err)
        builtin, plugin = refusals  # the plugin is refused before anything trains, as the built-in gqa is
        assert "variant 'other': attention_backend 'xformers' cannot train here" in builtin
        assert builtin == plugin


def test_a_subclass_taking_options_keeps_its_parents_options():
    @register("attention", "test_gated")
    class Gated(Attention):
        """MHA with a sigmoid output gate."""

        def __init__(self, config, **options):
            super().__init__(config, **options)
            self.gate = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

        def output(self, y, x):
            return super().output(y * torch.sigmoid(self.gate(x)), x)

    from models.registry import _REGISTRY

    try:
        assert list(get("attention", "test_gated").options) == list(get("attention", "gqa").options)
        model = build_model(tiny(attention={"name": "test_gated", "n_kv_head": 2, "backend": "math"}), seed=0)
        assert model.blocks[0].attn.n_kv_head == 2
        with torch.no_grad():
            for block in model.blocks:
                block.attn.gate.weight.zero_(), block.attn.gate.bias.fill_(30.0)  # sigmoid ≈ 1: plain gqa
        gqa = build_model(tiny(attention={"name": "gqa", "n_kv_head": 2, "backend": "math"}), seed=0)
        idx = torch.randint(0, 50, (2, 12))
        assert torch.allclose(model(idx).logits, gqa(idx).logits, atol=1e-5)  # same seed: gqa's weights
    finally:
        _REGISTRY["attention"].pop("test_gated", None)
