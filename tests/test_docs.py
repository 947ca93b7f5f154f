"""The documentation cannot drift: the spec reference is what the generator writes now, every spec key
the README and docs/ name exists in the schema, every YAML example validates, every relative link
resolves, the README stays a map (≤ 150 lines), and the plugin examples register, train and account
for their FLOPs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from bench.findings import markdown
from bench.spec import SpecError, load_spec
from bench.spec_reference import OUTPUT, SPEC, UnknownKey, lookup, render, yaml_key_problems
from models import build_model, check_flops, load_plugins
from models.attention import Attention
from models.registry import _REGISTRY, get
from tests.conftest import tiny

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

# a backticked dotted key (`budget.steps`, `base.train.lr`), optionally as `key: value`
BACKTICKED_KEY = re.compile(r"`([A-Za-z_][\w@]*(?:\.[\w@]+)+)(?::[^`]*)?`")
SET_KEY = re.compile(r"--set '?([A-Za-z_][\w.@]*)=")
FILE_SUFFIXES = (".py", ".yaml", ".yml", ".md", ".bin", ".db", ".json", ".jsonl", ".html", ".txt", ".pt", ".npy",
                 ".toml")
SPEC_ROOTS = ("model", "data", "train")  # keys of base, as a variant's overrides write them


def prose(text: str) -> str:
    """The text without its fenced code blocks."""
    return FENCE.sub("", text)


def code_blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def named_keys(text: str) -> list[str]:
    """The spec keys a page names: backticked dotted keys whose first part is a spec's or base's key
    (module paths like `bench.metrics` and file names like `train.bin` are not keys), and --set's keys."""
    roots = {*SPEC.keys(), *SPEC_ROOTS}
    keys = [k for k in BACKTICKED_KEY.findall(prose(text))
            if k.split(".")[0] in roots and not k.endswith(FILE_SUFFIXES)]
    return keys + SET_KEY.findall(text)


def unknown_keys(pages: list[Path]) -> list[str]:
    problems = []
    for page in pages:
        for key in named_keys(page.read_text()):
            try:
                lookup(key)
            except UnknownKey as e:
                problems.append(f"{page.name}: `{key}`: {e}")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page.read_text()), re.M):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


def broken_links(page: Path) -> list[str]:
    """Each relative link of a Markdown page whose file, or #anchor in it, does not exist."""
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{page.name}: {target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{page.name}: {target}: no heading with that anchor in {file.name}")
    return problems


# -- the generated reference ----------------------------------------------------------------------------


def test_the_spec_reference_is_what_the_generator_writes():
    assert OUTPUT == ROOT / "docs" / "specs.md"
    assert OUTPUT.read_text() == render(), "docs/specs.md is stale: python -m bench.spec_reference --write"


def test_the_reference_lists_every_field_of_the_models_a_spec_is_validated_with():
    from bench.config import TrainConfig
    from bench.spec import Spec
    from models.config import ModelConfig

    text = OUTPUT.read_text()
    for prefix, model in (("", Spec), ("base.model.", ModelConfig), ("base.train.", TrainConfig)):
        for name in model.model_fields:
            assert f"| `{prefix}{name}` |" in text
    assert "| `base.train.lr` | float (> 0) | `0.001` | peak learning rate, reached after warmup |" in text
    assert "| `gqa` |" in text and "`n_kv_head`: int \\| null (required)" in text  # a component's options


# -- keys -----------------------------------------------------------------------------------------------


def test_the_key_resolver_knows_spec_keys_and_rejects_made_up_ones():
    for key in ("budget.steps", "base.train.lr", "train.lr", "tune.tune_seeds", "tune.train.lr", "seeds.max",
                "variants.gqa.model.attention.n_kv_head", "model.attention.backend.kernel", "base.data.task",
                "train.optimizer.adamw_lr", "base.train.distributed.nproc", "kernels.attention.seq_lens"):
        lookup(key)
    with pytest.raises(UnknownKey, match="'seeds' is not a key under tune \\(did you mean 'tune_seeds'\\?\\)"):
        lookup("tune.seeds")
    with pytest.raises(UnknownKey, match="'lrr' is not a key under base.train \\(did you mean 'lr'\\?\\)"):
        lookup("base.train.lrr")
    with pytest.raises(UnknownKey, match="'n_kv_heads' is not a key under model.attention"):
        lookup("model.attention.n_kv_heads")
    with pytest.raises(UnknownKey, match="takes a value, not keys"):
        lookup("budget.steps.max")


def test_the_key_extraction_finds_what_a_page_names_and_flags_a_made_up_key(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Set `base.train.lr` and `budget.stepz`; `bench.metrics` and `train.bin` are no keys.\n\n"
                    "```bash\npython -m bench.run x.yaml --set base.modle.n_layer=2\n```\n")
    assert named_keys(page.read_text()) == ["base.train.lr", "budget.stepz", "base.modle.n_layer"]
    problems = unknown_keys([page])
    assert len(problems) == 2 and "`budget.stepz`" in problems[0] and "`base.modle.n_layer`" in problems[1]


def test_every_spec_key_the_readme_and_docs_name_exists():
    assert unknown_keys(PAGES) == []
    written = [k for page in PAGES if page != OUTPUT for k in named_keys(page.read_text())]
    assert len(written) >= 20  # the check sees the keys of the hand-written pages, not only the reference's


def test_every_yaml_example_names_only_keys_a_spec_can_hold():
    blocks = [(page, block) for page in PAGES for block in code_blocks(page.read_text(), "yaml")]
    assert len(blocks) >= 8
    assert [f"{page.name}: {p}" for page, block in blocks for p in yaml_key_problems(block)] == []
    assert yaml_key_problems("base:\n  train: {lr: 1.0e-3, lrr: 2}\n") == [
        "line 2: 'lrr' is not a key under base.train (did you mean 'lr'?); keys there: " + ", ".join(
            lookup("base.train").keys())]
    assert yaml_key_problems("ladder:\n  - gpt2: {}\n  - rope: {model.positionl: rope}\n")[0].startswith(
        "line 3: 'positionl' is not a key under ladder.rope.model (did you mean 'positional'?)")


def test_every_whole_spec_in_the_docs_validates(tmp_path):
    specs = [block for page in PAGES for block in code_blocks(page.read_text(), "yaml")
             if re.search(r"^name:", block, re.M) and re.search(r"^base:", block, re.M)]
    assert specs
    for i, block in enumerate(specs):
        path = tmp_path / f"spec{i}.yaml"
        path.write_text(block)
        load_spec(path)
    path.write_text(specs[0].replace("seeds:", "seedz:"))
    with pytest.raises(SpecError, match="seedz: unknown key"):
        load_spec(path)


# -- links and size -------------------------------------------------------------------------------------


def test_every_relative_link_resolves_to_a_file_and_heading():
    assert [p for page in PAGES for p in broken_links(page)] == []


def test_the_link_check_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# The `base.train` keys\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#the-basetrain-keys) [no](missing.md) [anchor](other.md#nope) "
                    "[web](https://example.com)\n```\n[in code](nowhere.md)\n```\n")
    assert broken_links(page) == ["page.md: missing.md: no such file",
                                  "page.md: other.md#nope: no heading with that anchor in other.md"]


def test_the_readme_is_a_map():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    for page in DOCS:  # every page is reachable from the README
        assert f"](docs/{page.name})" in text, page.name
    # .ci/run runs the first line that installs the test extras; the quickstart keeps both commands verbatim
    assert re.search(r"^pip install .*pytest.*$", text, re.M).group(0) == "pip install -e '.[test]' && python -m pytest"
    assert "\npip install -e . && python -m bench.run ablations/attention.yaml --workers auto\n" in text


def test_the_readmes_findings_table_has_the_columns_bench_findings_writes():
    header = markdown([]).splitlines()[:2]
    lines = README.read_text().splitlines()
    start = lines.index(header[0])
    assert lines[start + 1] == header[1]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append(line)
    assert rows and all(line.count(" | ") == header[0].count(" | ") for line in rows)
    summary = lines[start + 2 + len(rows) + 1]
    assert re.fullmatch(r"\d+ of \d+ published directions decisive and agreeing; \d+ of \d+ sanity checks pass; "
                        r"\d+ minutes of training and timing in all\.", summary)


# -- the plugin examples --------------------------------------------------------------------------------


PLUGINS = ROOT / "docs" / "plugins.md"


def plugin_example(name: str) -> str:
    """The code block of the README or docs/plugins.md that starts with `# <name>.py`."""
    text = README.read_text() + PLUGINS.read_text()
    return re.search(rf"```python\n(# {name}\.py\n.*?)```", text, re.S).group(1)


def load_example(name: str, tmp_path: Path, monkeypatch) -> None:
    """Write the example where a spec's `plugins:` would find it and import it, the attention family
    restored after the test."""
    (tmp_path / f"{name}.py").write_text(plugin_example(name))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, name, None)  # imported afresh here, and as before after the test,
    monkeypatch.delitem(sys.modules, name)  # so a later test's import of its own copy registers again
    monkeypatch.setitem(_REGISTRY, "attention", dict(_REGISTRY["attention"]))
    load_plugins([name])


def test_the_gated_attention_example_is_one_short_file_that_trains(tmp_path, monkeypatch):
    code = plugin_example("my_gated_attention")
    lines = [line for line in code.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(lines) <= 14
    load_example("my_gated_attention", tmp_path, monkeypatch)
    gated, gqa = get("attention", "gated"), get("attention", "gqa")
    assert set(gated.options) == set(gqa.options) == {"n_kv_head", "window", "backend", "qk_norm"}
    assert gated.options["backend"].family == "attention_backend" and gated.options["n_kv_head"].default is None

    model = build_model(tiny(attention="gated"), seed=0)
    idx = torch.randint(0, 50, (2, 16))
    _, loss, _ = model(idx, idx)
    loss.backward()
    gate = model.blocks[0].attn.gate
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0

    # output(y, x) gates y by sigmoid(W_g·x) before Attention's output projection: with W_g = 0, b_g = 0
    # the gate is 0.5 everywhere
    attn = model.blocks[0].attn
    y, x = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    with torch.no_grad():
        assert not torch.allclose(attn.output(y, x), Attention.output(attn, 0.5 * y, x))
        gate.weight.zero_()
        gate.bias.zero_()
        assert torch.allclose(attn.output(y, x), Attention.output(attn, 0.5 * y, x))

    # with the same seed the variant starts from MHA's weights: with the gate at 0.5 it is MHA with c_proj's
    # weight halved
    mha = build_model(tiny(attention="mha"), seed=0)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.gate.weight.zero_()
            block.attn.gate.bias.zero_()
        for block in mha.blocks:
            block.attn.c_proj.weight.mul_(0.5)
    model.eval()
    mha.eval()
    assert torch.allclose(model(idx)[0], mha(idx)[0], atol=1e-5)
    assert check_flops("attention", "gated") is None


def test_the_from_scratch_example_declares_its_flops_and_init_blocks(tmp_path, monkeypatch):
    load_example("my_attention", tmp_path, monkeypatch)
    assert check_flops("attention", "my_linear") is None  # its einsums declared in extra_flops_per_token
    linear = build_model(tiny(attention="my_linear"), seed=0)
    mha = build_model(tiny(attention="mha"), seed=0)
    # init_blocks draws c_attn as MHA does: the same initial q, k and v weights with the same seed
    assert torch.equal(linear.blocks[0].attn.c_attn.weight, mha.blocks[0].attn.c_attn.weight)


def test_the_dry_run_has_no_warning_about_either_example(tmp_path, monkeypatch):
    from models.plugin_checks import plugin_warnings

    load_example("my_attention", tmp_path, monkeypatch)
    load_example("my_gated_attention", tmp_path, monkeypatch)
    assert plugin_warnings(tiny(attention="my_linear")) == []
    assert plugin_warnings(tiny(attention="gated")) == []
