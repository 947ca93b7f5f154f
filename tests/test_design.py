"""The study design: worked out once from a validated spec (the default baseline, each reference, the
seeds, the tune grids), and given back equal when the spec is read back from the store."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from bench.metrics import MetricSpec
from bench.spec import Spec, load_spec
from bench.store import Store, load, read_spec
from tests.test_runner import ROOT, SHIPPED, TINY, write_spec

FINDINGS = sorted((ROOT / "ablations" / "findings").glob("*.yaml"))


def test_the_design_is_worked_out_once_from_the_spec_with_its_default_baseline(tmp_path):
    more = "  mqa: {model.attention: mqa}\n  gqa: {model.attention: gqa}\n  window: {model.attention: window}"
    text = TINY.replace("  mqa: {model.attention: mqa}", more).replace("seeds: 2\n", "")
    spec, _ = load_spec(write_spec(tmp_path, text + "compare: {window: gqa}\nseeds: {min: 2, max: 5}\n"))
    design = spec.design
    assert design is spec.design  # built once
    assert spec.baseline == design.baseline == "mha"  # no baseline given: the first variant
    assert design.variants == ("mha", "mqa", "gqa", "window")
    assert dict(design.references) == {"mha": None, "mqa": "mha", "gqa": "mha", "window": "gqa"}
    assert design.pairs == (("mqa", "mha"), ("gqa", "mha"), ("window", "gqa"))
    assert design.seeds == (0, 1) and design.max_seeds == 5 and design.adaptive and not design.tuned
    rule = design.rule(MetricSpec(name="val_loss"))  # the metric's defaults where the spec gives none
    assert (rule.alpha, rule.margin, rule.min_seeds, rule.max_seeds, rule.bound) == (0.05, 0.01, 2, 5, None)
    assert design.rule(MetricSpec(name="val_accuracy")).bound == 0.995


def test_a_tuned_ladder_design_holds_each_steps_reference_and_grid():
    spec = Spec.model_validate({
        "name": "ladder", "base": {"data": {"source": "markov"}},
        "ladder": [{"gpt2": {}}, {"rope": {"model.positional": "rope"}}, {"muon": {"train.optimizer": "muon"}}],
        "tune": {"train.lr": {"gpt2": [1e-3, 2e-3], "rope": [1e-3, 2e-3], "muon": [1e-2, 2e-2]}, "tune_seeds": 2},
        "margin": 0.02})
    design = spec.design
    assert design.baseline == "gpt2" and design.ladder == ("gpt2", "rope", "muon")
    assert design.pairs == (("rope", "gpt2"), ("muon", "rope"))
    assert design.tuned and design.tune_seeds == (1000, 1001) and design.tune_grid("muon") == {"train.lr": [1e-2, 2e-2]}
    assert design.tune_grid("not a variant") == {} and design.rule(MetricSpec(name="val_loss")).margin == 0.02


@pytest.mark.parametrize("path", SHIPPED + FINDINGS, ids=[p.stem for p in SHIPPED + FINDINGS])
def test_a_spec_read_back_from_the_store_gives_an_equal_design(path, tmp_path):
    spec, _ = load_spec(path)
    store = Store(tmp_path)
    store.record_study(spec.name, spec.model_dump(mode="json"), f"python -m bench.run {path.name}")
    store.close()
    stored = load(tmp_path).study_spec()
    assert stored == spec and stored.design == spec.design
    assert stored.model_dump(mode="json") == spec.model_dump(mode="json")  # what a second run would record


def test_a_stored_spec_that_no_longer_validates_is_refused_naming_the_store_and_key(tmp_path):
    spec, _ = load_spec(SHIPPED[0])
    stored = {**spec.model_dump(mode="json"), "paired_test": "bootstrap", "retired_key": 1}
    store = Store(tmp_path)
    store.record_study(spec.name, stored, "python -m bench.run old.yaml")
    store.close()
    with pytest.raises(ValueError) as info:
        read_spec(json.dumps(stored), "old.db")
    assert str(info.value).startswith("old.db: the stored spec does not validate (")
    assert "paired_test: bootstrap is not offered" in str(info.value) and "retired_key: unknown key" in str(info.value)
    result = subprocess.run([sys.executable, "-m", "bench.report", str(tmp_path), "--json"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'results.db'}: study '{spec.name}': the stored spec does not validate" in result.stderr


def test_the_stored_spec_is_the_spec_as_run(tmp_path):
    """The runner records the validated spec (a ladder climbed, defaults filled); the store keeps it as JSON."""
    from bench.run import main

    out = tmp_path / "out"
    assert main([str(write_spec(tmp_path, steps=2)), "--out", str(out), "--seeds", "0"]) == 0
    db = sqlite3.connect(out / "results.db")
    (text,) = db.execute("SELECT spec FROM studies").fetchone()
    db.close()
    spec, _ = load_spec(tmp_path / "spec.yaml")
    assert json.loads(text) == spec.model_dump(mode="json") and read_spec(text, "here").design == spec.design


def test_a_copied_spec_with_changes_has_the_changed_design(tmp_path):
    spec, _ = load_spec(write_spec(tmp_path, TINY), [])
    assert spec.design.alpha == 0.05  # worked out, and kept
    changed = spec.model_copy(update={"alpha": 0.01, "baseline": "mqa"})
    assert (changed.design.alpha, changed.design.baseline) == (0.01, "mqa")
    assert (spec.design.alpha, spec.design.baseline) == (0.05, "mha")  # the original's is its own
