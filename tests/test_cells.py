"""cells: every variant trained in every cell of a grid and compared with its reference in the same cell;
the report's Zoology-style figure (accuracy against width, a panel per sequence length) and statement."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from bench.report.recall import reach_statement
from bench.run import main as run_main
from bench.spec import STORED, Spec, SpecError, cell_grid, load_spec
from bench.store import Store, load
from tests.test_runner import write_spec

BASE = {"data": {"source": "task", "task": "mqar", "vocab_size": 64, "seq_len": 16, "num_kv_pairs": 2},
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 16}}
CELLS = {"model.n_embd": [16, 32], "data.seq_len": [16, 32]}
LABELS = ["n_embd=16,seq_len=16", "n_embd=16,seq_len=32", "n_embd=32,seq_len=16", "n_embd=32,seq_len=32"]


def spec(**fields) -> Spec:
    return Spec.model_validate({"name": "cells", "base": BASE, "cells": CELLS,
                                "variants": {"mha": {}, "window": {"model.attention": {"name": "window", "window": 4}}},
                                **fields})


def test_every_variant_is_trained_in_every_cell_with_the_cells_values_last():
    s = spec(variants={"mha": {}, "wide": {"model.n_embd": 64, "model.attention": {"name": "window", "window": 4}}})
    assert list(s.variants) == [f"{v}@{label}" for v in ("mha", "wide") for label in LABELS]
    assert s.variants["mha@n_embd=32,seq_len=16"] == {"model": {"n_embd": 32}, "data": {"seq_len": 16}}
    # the cell's width wins over the variant's own; the variant's other overrides stay
    assert s.variants["wide@n_embd=16,seq_len=32"] == {
        "model": {"n_embd": 16, "attention": {"name": "window", "window": 4}}, "data": {"seq_len": 32}}
    config = s.variant_base("wide@n_embd=32,seq_len=32")
    assert config["model"]["n_embd"] == 32 and config["data"] == {**BASE["data"], "seq_len": 32}


def test_each_variant_is_compared_with_its_reference_in_the_same_cell():
    s = spec(variants={"mha": {}, "gqa": {"model.attention": "gqa"}, "window": {"model.attention": "window"},
                       "other": {"data.task": "in_context_recall"}},
             compare={"window": "gqa", "other": None})
    design = s.design
    assert s.baseline == design.baseline == "mha@n_embd=16,seq_len=16"  # the baseline's first cell
    for label in LABELS:
        assert design.reference_of(f"gqa@{label}") == f"mha@{label}"  # the default reference, per cell
        assert design.reference_of(f"window@{label}") == f"gqa@{label}"  # compare's mapping, per cell
        assert design.reference_of(f"other@{label}") is None  # null stays null
        assert design.reference_of(f"mha@{label}") is None  # the baseline's other cells are references only
    assert len(design.pairs) == 2 * len(LABELS) and all(v.split("@")[1] == r.split("@")[1] for v, r in design.pairs)
    named = spec(baseline="window")
    assert named.baseline == "window@n_embd=16,seq_len=16"
    assert named.design.reference_of("mha@n_embd=32,seq_len=32") == "window@n_embd=32,seq_len=32"


def test_a_whole_section_as_a_cell_key_moves_its_keys_together():
    s = spec(cells={"model.n_embd": [16], "data": [{"seq_len": 16, "num_kv_pairs": 2}, {"seq_len": 32, "num_kv_pairs": 4}]})
    assert list(s.variants)[:2] == ["mha@n_embd=16,data=seq_len16-num_kv_pairs2", "mha@n_embd=16,data=seq_len32-num_kv_pairs4"]
    config = s.variant_base("window@n_embd=16,data=seq_len32-num_kv_pairs4")
    assert config["data"] == {**BASE["data"], "seq_len": 32, "num_kv_pairs": 4}
    assert s.design.cell_of("window@n_embd=16,data=seq_len32-num_kv_pairs4") == (
        "window", {"model.n_embd": 16, "data": {"seq_len": 32, "num_kv_pairs": 4}})


def test_the_design_maps_an_expanded_variant_back_to_its_variant_and_cell():
    design = spec().design
    assert design.cells == CELLS and design.cell_names == ("mha", "window")
    assert design.cell_of("window@n_embd=32,seq_len=16") == ("window", {"model.n_embd": 32, "data.seq_len": 16})
    assert design.cell_of("window") is None and design.cell_of("window@n_embd=64,seq_len=16") is None
    assert [label for label, _ in design.cell_grid] == LABELS
    assert design.in_cell("mha", LABELS[3]) == "mha@n_embd=32,seq_len=32"
    plain = Spec.model_validate({"name": "p", "base": BASE, "variants": {"a": {}, "b": {}}}).design
    assert plain.cells == {} and plain.cell_of("a") is None and plain.cell_names == ("a", "b")


def test_labels_stay_short_and_safe_for_any_value():
    grid = cell_grid({"model.attention": [{"name": "window", "window": 4}, "mha"], "train.lr": [1e-3, 3e-5],
                      "data.task": ["a b", "c"]})
    labels = [label for label, _ in grid]
    assert labels[0] == "attention=window-window4,lr=0.001,task=v1"  # "a b" is no safe label: by position
    assert all(re.fullmatch(r"[A-Za-z0-9_.+=,-]+", label) for label in labels) and len(set(labels)) == len(labels)
    assert cell_grid({"model.n_embd": [8], "data.n_embd": [4]})[0][0] == "model.n_embd=8,data.n_embd=4"  # alike ends


def test_a_per_variant_tune_grid_follows_each_variant_into_its_cells():
    s = spec(tune={"train.lr": {"mha": [1e-3, 2e-3], "window": [3e-3, 6e-3]}, "tune_seeds": 1})
    assert s.tune_grid("window@n_embd=32,seq_len=32") == {"train.lr": [3e-3, 6e-3]}


@pytest.mark.parametrize("addition,expected", [
    ("cells: {model.n_embd: [16, 32]}\nladder: [{a: {}}, {b: {}}]\n", "cells: give cells: or ladder:, not both"),
    ("cells: {model.n_embd: [16, 32]}\nsweep: {train.lr: [1.0e-3, 2.0e-3]}\n", "cells: give cells: or sweep:, not both"),
    ("cells: {model.n_embd: [], data.seq_len: [16]}\n", "cells: 'model.n_embd' has no values"),
    ("cells: {n_embd: [16, 32]}\n", "cells: 'n_embd' is not a key of base"),
    ("cells: {optimizer.lr: [1.0e-3]}\n", "cells: 'optimizer.lr' is not a key of base"),
    ("cells: {data: [16, 32]}\n", "cells: 'data': a whole section's values are mappings of its keys"),
    ("cells: {model.n_embd: [16, 16]}\n", "cells: 'model.n_embd' repeats a value"),
    ("cells: {model.n_embd: 16}\n", "cells.model.n_embd: Input should be a valid list"),
])
def test_a_malformed_cells_key_is_refused_naming_the_key_and_its_line(tmp_path, addition, expected):
    text = ("name: c\nbase:\n  data: {source: task, task: mqar, vocab_size: 64, seq_len: 16, num_kv_pairs: 2}\n"
            "variants:\n  mha: {}\n  win: {model.attention: window}\n")
    if "ladder" in addition:
        text = text.replace("variants:\n  mha: {}\n  win: {model.attention: window}\n", "")
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path, text + addition))
    message = str(info.value)
    where = re.search(r"spec\.yaml:(\d+): ", message)
    assert expected in message and where, message
    assert int(where.group(1)) == text.count("\n") + 1  # the cells: line, not the top of the file


def test_a_variant_name_holding_the_separator_is_refused(tmp_path):
    text = ("name: c\nbase:\n  data: {source: task, task: mqar, vocab_size: 64, seq_len: 16, num_kv_pairs: 2}\n"
            "variants:\n  mha: {}\n  win@4: {model.attention: window}\ncells: {model.n_embd: [16, 32]}\n")
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path, text))
    assert "variants.win@4: a variant's name cannot hold '@'" in str(info.value)
    assert "(mha@n_embd=16)" in str(info.value)  # what the separator names instead


def test_compare_and_baseline_name_the_variants_as_written():
    with pytest.raises(ValueError, match="'gla' is not a variant; variants: mha, window"):
        spec(compare={"window": "gla"})
    with pytest.raises(ValueError, match="'gla' is not a variant"):
        spec(baseline="gla")


def test_a_spec_read_back_from_the_store_is_the_same_spec_and_design(tmp_path):
    s = spec(compare={"window": "mha"})
    store = Store(tmp_path)
    store.record_study(s.name, s.model_dump(mode="json"), "python -m bench.run cells.yaml")
    store.close()
    stored = load(tmp_path).study_spec()
    assert stored == s and stored.design == s.design
    assert stored.model_dump(mode="json") == s.model_dump(mode="json")
    assert stored.design.cell_of("window@n_embd=16,seq_len=32") == ("window", {"model.n_embd": 16, "data.seq_len": 32})
    # the expanded form validates as it is, written out or stored; expanding it again would name "mha@…@…"
    again = Spec.model_validate(json.loads(s.model_dump_json()))
    assert list(again.variants) == list(s.variants) and again.design == s.design
    broken = {**s.model_dump(mode="json"), "variants": {"mha@x": {}, **s.model_dump(mode="json")["variants"]}}
    with pytest.raises(ValueError, match="cannot hold '@'"):
        Spec.model_validate(broken, context={STORED: True})


def frame(means: dict[str, dict[str, list[float]]], widths=(32, 64, 128, 256)) -> pd.DataFrame:
    return pd.DataFrame([{"variant": v, "panel": panel, "x": w, "mean": m} for v, panels in means.items()
                         for panel, values in panels.items() for w, m in zip(widths, values)])


def test_the_statement_gives_the_smallest_width_each_variant_reaches_the_threshold_at():
    means = frame({"attention": {"seq_len=64": [0.6, 0.95, 1.0, 1.0], "seq_len=256": [0.2, 0.7, 0.95, 1.0]},
                   "gla": {"seq_len=64": [0.2, 0.5, 0.92, 0.99], "seq_len=256": [0.05, 0.1, 0.3, 0.6]},
                   "wide": {"seq_len=64": [0.91, 0.5, 0.99, 1.0], "seq_len=256": [0.1, 0.2, 0.95, 1.0]}})
    assert reach_statement(means, "attention", 0.9, "n_embd", "accuracy") == [
        "At seq_len=64: attention reaches accuracy ≥ 0.9 at n_embd=64; gla needs n_embd=128 (2× attention's); "
        "wide already at n_embd=32 (0.5× attention's).",
        "At seq_len=256: attention reaches accuracy ≥ 0.9 at n_embd=128; gla does not reach it within the n_embd "
        "values tried (32 to 256; best 0.600 at n_embd=256); wide also at n_embd=128."]
    # a baseline that never reaches it: the others are stated on their own; a lower threshold moves every width
    assert reach_statement(means, "gla", 0.9, "n_embd", "accuracy")[1] == (
        "At seq_len=256: gla does not reach accuracy ≥ 0.9 within the n_embd values tried (32 to 256; best 0.600 at "
        "n_embd=256); attention reaches it at n_embd=128; wide reaches it at n_embd=128.")
    assert reach_statement(means, "attention", 0.5, "n_embd", "accuracy")[1].startswith(
        "At seq_len=256: attention reaches accuracy ≥ 0.5 at n_embd=64; gla needs n_embd=256 (4× attention's)")
    # unordered widths are read in numeric order; a loss reaches its level from above; one panel has no prefix
    loss = frame({"a": {"": [2.0, 1.0, 0.5]}, "b": {"": [2.0, 2.0, 0.9]}}, widths=(128, 32, 64))
    assert reach_statement(loss, "a", 1.0, "n_embd", "val loss", higher_is_better=False) == [
        "a reaches val loss ≤ 1 at n_embd=32; b needs n_embd=64 (2× a's)."]


STUDY = """\
name: cells
description: mqar with full attention and a 4-token window, per width and sequence length
base:
  model: {n_layer: 1, n_head: 2, n_embd: 16, attention: {name: mha, backend: math}}
  data: {source: task, task: mqar, vocab_size: 64, seq_len: 16, num_kv_pairs: 2, n_train: 256, n_test: 32}
  train: {batch_size: 8, lr: 3.0e-3, warmup_steps: 1, eval_every: 100, device: cpu, dtype: float32, threads: 1}
budget: {steps: 3}
variants:
  mha: {}
  window: {model.attention: {name: window, window: 4, backend: math}}
cells: {model.n_embd: [16, 32], data.seq_len: [16, 32]}
seeds: 2
speed: null
"""


def test_a_study_with_cells_reports_the_figure_and_a_verdict_per_cell(tmp_path):
    out = tmp_path / "out"
    assert run_main([str(write_spec(tmp_path, STUDY)), "--out", str(out)]) == 0
    results = load(out)
    assert sorted(results.runs["variant"].unique()) == sorted(f"{v}@{label}" for v in ("mha", "window") for label in LABELS)
    assert results.study_spec().design.cell_of("window@n_embd=32,seq_len=32")[0] == "window"
    html = (out / "report.html").read_text()
    section = html[html.index("<h2>Cells: val accuracy against n_embd, one panel per seq_len"):
                   html.index("<h2>Summary against the baseline")]
    assert section.count("<svg") == 1 and "seq_len=32" in section  # the figure, a panel per sequence length
    for label in LABELS:  # each cell's comparison with its verdict
        row = re.search(rf"<tr><td>window</td><td>{label}</td>.*?</tr>", section)
        assert row and re.search(r'<td class="(better|worse|equivalent|inconclusive|saturated)">', row.group(0))
    assert section.count("<li>At seq_len=") == 2  # the statement, one sentence per panel
    assert "<td>window@n_embd=32,seq_len=32</td><td>mha@n_embd=32,seq_len=32</td>" in html  # the summary's pairs


def test_a_study_without_cells_has_no_cells_section(tmp_path):
    from bench.report import build_report

    spec_ = Spec.model_validate({"name": "plain", "base": BASE, "variants": {"a": {}, "b": {}}})
    store = Store(tmp_path)
    store.record_study("plain", spec_.model_dump(mode="json"), "python -m bench.run plain.yaml")
    store.db.execute("INSERT INTO runs (run_id, study, variant, sweep, seed, kind, config, status, metrics, hardware, "
                     "libraries) VALUES ('r0', 'plain', 'a', '{}', 0, 'train', '{}', 'finished', ?, ?, '{}')",
                     (json.dumps({"status": "finished", "val_loss": 1.0, "val_accuracy": 0.5}),
                      json.dumps({"cpu": "test cpu", "torch_threads": 2})))
    store.db.commit()
    store.close()
    assert "<h2>Cells" not in build_report([tmp_path])
