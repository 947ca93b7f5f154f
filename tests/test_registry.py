"""The registry: register, build by name, list with wildcards, report availability, load plugins."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models import FAMILIES, ComponentError, available, build, build_model, list_components, load_plugins, register
from tests.conftest import registered, tiny

README = Path(__file__).resolve().parents[1] / "README.md"
PLUGINS = README.parent / "docs" / "plugins.md"  # the README's page on writing a component


def test_every_family_has_its_built_in_members():
    assert list_components("attention") == ["based", "deltanet", "diff", "gla", "gqa", "h3", "linear", "mamba2", "mha", "mla",
                                           "mqa", "retnet", "window"]
    assert list_components("attention_backend") == ["auto", "baddbmm", "flash_attn", "flex", "math", "sdpa", "xformers"]
    assert list_components("positional") == ["alibi", "learned", "none", "rope", "sinusoidal"]
    assert list_components("norm") == ["layernorm", "rmsnorm"]
    assert list_components("mlp") == ["geglu", "gelu", "relu2", "swiglu"]
    assert list_components("moe") == ["switch", "topk"]
    assert list_components("quantization") == ["awq", "fake_quant", "gptq", "int4_weight_only", "int8_dynamic", "int8_weight_only"]


def test_wildcards_and_unknown_family():
    assert list_components("attention", "m*") == ["mamba2", "mha", "mla", "mqa"]
    assert list_components("quantization", "int8_*") == ["int8_dynamic", "int8_weight_only"]
    with pytest.raises(ComponentError, match="unknown family 'mpl' \\(did you mean 'mlp'\\?\\)"):
        list_components("mpl")


def test_unknown_name_lists_valid_names_and_closest_match():
    with pytest.raises(ComponentError) as info:
        build("mlp", "swiglo", tiny())
    assert str(info.value) == "unknown mlp 'swiglo' (did you mean 'swiglu'?); valid: geglu, gelu, relu2, swiglu"


def test_build_checks_options():
    with pytest.raises(ComponentError, match="norm 'rmsnorm' has no option 'bias'; its options: eps"):
        build("norm", "rmsnorm", 8, tiny(), bias=False)
    norm = build("norm", "layernorm", 8, tiny(), bias=False)
    assert norm.bias is None and norm.weight.shape == (8,)


def test_available_reports_description_options_and_availability():
    rows = {(r.family, r.name): r for r in available()}
    assert set(f for f, _ in rows) == set(FAMILIES)
    gqa = rows[("attention", "gqa")]
    assert gqa.description.startswith("grouped-query attention")
    assert gqa.options["backend"] == "auto" and gqa.options["window"] is None
    assert "n_kv_head" in gqa.options and gqa.available and gqa.reason is None
    assert rows[("positional", "rope")].options == {"base": 10000.0}
    for row in rows.values():
        assert row.available == (row.reason is None)


class Identity(nn.Module):
    """Does nothing."""

    def __init__(self, dim, config=None):
        super().__init__()


def test_registering_twice_under_one_name_is_an_error():
    with registered("norm", "test_identity", Identity):
        with pytest.raises(ComponentError, match="already registered"):
            register("norm", "test_identity")(nn.Identity)
    assert "test_identity" not in list_components("norm")


def needs_tpu(config):
    """An MLP that cannot run anywhere here."""


def test_a_probe_reason_reaches_available():
    with registered("mlp", "test_needs_tpu", needs_tpu, probe=lambda: "needs a TPU"):
        row = available("mlp", "test_needs_tpu")[0]
    assert (row.available, row.reason, row.description) == (False, "needs a TPU", "An MLP that cannot run anywhere here")


def test_plugins_that_cannot_be_imported_say_so():
    with pytest.raises(ComponentError, match="plugin 'no_such_module_xyz' could not be imported"):
        load_plugins(["no_such_module_xyz"])


def test_the_readme_plugin_example_registers_and_trains(tmp_path, monkeypatch):
    """docs/plugins.md's from-scratch attention plugin (linked from the README), imported as a spec's
    `plugins:` would import it."""
    code = re.search(r"```python\n(# my_attention\.py.*?)```", PLUGINS.read_text(), re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 32  # one short file
    (tmp_path / "my_attention.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    from models.registry import _REGISTRY

    monkeypatch.setitem(_REGISTRY, "attention", dict(_REGISTRY["attention"]))  # the family as it was, after the test
    load_plugins(["my_attention"])
    model = build_model(tiny(attention="my_linear"))
    idx = torch.randint(0, 50, (2, 16))
    logits, loss, _ = model(idx, idx)
    loss.backward()
    assert model.blocks[0].attn.c_attn.weight.grad is not None
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 50
    assert torch.equal(model(changed)[0][:, :9], logits[:, :9])  # still causal


def test_python_m_models_prints_every_family():
    result = subprocess.run([sys.executable, "-m", "models"], capture_output=True, text=True,
                            env={"COLUMNS": "200", "PATH": ""}, cwd=README.parent)
    assert result.returncode == 0, result.stderr
    for family in FAMILIES:
        assert f"{family} —" in result.stdout
    assert "flash-attn not installed" in result.stdout or "needs CUDA" in result.stdout or torch.cuda.is_available()
    bad = subprocess.run([sys.executable, "-m", "models", "nope"], capture_output=True, text=True, cwd=README.parent)
    assert bad.returncode == 2 and "unknown family 'nope'" in bad.stdout and "Traceback" not in bad.stderr
