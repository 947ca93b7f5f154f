"""The findings suite: each study's direction checked against its verdicts, the table in Markdown,
JSON and HTML, and the shipped finding specs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.analysis import summarise
from bench.findings import finding_row, markdown, study_minutes
from bench.spec import Spec, load_spec
from tests.test_analysis import design, runs_frame

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = sorted((ROOT / "ablations" / "findings").glob("*.yaml"))
JITTER = np.array([0.0, 0.004, -0.003, 0.002])


def row(values: dict[str, np.ndarray], finding: dict, **spec) -> dict:
    runs = runs_frame(values).assign(started_at=0.0, finished_at=60.0)
    study = design({"name": "f", "variants": dict.fromkeys(values, {}), "finding": finding, **spec})
    return finding_row(summarise(runs, study), study, runs, pd.DataFrame())


def test_a_direction_agrees_disagrees_or_is_undecided_by_its_verdicts():
    base = np.array([3.0, 3.1, 3.05, 2.95])
    expect = {"direction": "RoPE beats learned", "source": "Su et al. 2021", "expect": {"rope": "better"}}
    agrees = row({"learned": base, "rope": base - 0.25 + JITTER}, expect)
    assert (agrees["status"], agrees["agrees"], agrees["seeds"]) == ("agrees", "yes", 4)
    assert agrees["comparisons"][0]["verdict"] == "better" and agrees["comparisons"][0]["delta"] == pytest.approx(-0.25 + JITTER.mean())
    disagrees = row({"learned": base, "rope": base + 0.25 + JITTER}, expect)
    assert disagrees["agrees"] == "no"  # decided, the other way: reported as measured
    undecided = row({"learned": base, "rope": base - 0.01 + 10 * JITTER}, expect)
    assert undecided["agrees"] == "undecided" and undecided["comparisons"][0]["verdict"] == "inconclusive"
    equivalent = row({"layernorm": base, "rmsnorm": base + 0.001 + JITTER / 4},
                     {**expect, "expect": {"rmsnorm": "equivalent"}}, margin=0.02)
    assert equivalent["agrees"] == "yes"
    assert agrees["minutes"] == pytest.approx(1.0)  # eight runs, all in the same minute


def test_an_expected_order_is_checked_on_the_means():
    base = np.array([3.0, 3.1, 3.05, 2.95])
    finding = {"direction": "MQA worse than MHA, GQA in between", "source": "Ainslie et al. 2023",
               "expect": {"mqa": "worse"}, "order": ["mha", "gqa", "mqa"]}
    between = row({"mha": base, "gqa": base + 0.01 + JITTER, "mqa": base + 0.05 + JITTER}, finding)
    assert between["agrees"] == "yes" and between["order"].endswith("holds")
    outside = row({"mha": base, "gqa": base + 0.08 + JITTER, "mqa": base + 0.05 + JITTER}, finding)
    assert outside["agrees"] == "no" and "not observed (mha > mqa > gqa)" in outside["order"]
    table = markdown([between, {**outside, "sanity": True}])
    assert ("| MQA worse than MHA, GQA in between | Ainslie et al. 2023 | mqa vs mha: +0.0507 nats (+0.0460 to +0.0555) "
            "(val loss); expected order (best first, on the means) mha > gqa > mqa: holds |") in table
    assert "*(sanity check)*" in table and "1 of 1 published directions decisive and agreeing; 0 of 1 sanity checks pass" in table


def test_minutes_count_the_union_of_the_runs_intervals_and_the_speed_timing():
    runs = pd.DataFrame({"started_at": [0.0, 30.0, 200.0], "finished_at": [60.0, 90.0, 260.0]})
    kernels = pd.DataFrame({"component": ["train_step", "attention"], "seconds": [30.0, 99.0]})
    assert study_minutes(runs, kernels) == pytest.approx((90 + 60 + 30) / 60)  # two workers overlap; a gap is not work


def test_a_finding_names_compared_variants_and_verdicts():
    base = {"name": "s", "base": {"data": {"source": "markov"}}, "variants": {"a": {}, "b": {}}}
    good = {"direction": "b beats a", "source": "x", "expect": {"b": "better"}}
    assert Spec.model_validate({**base, "finding": good}).finding.expect == {"b": "better"}
    for bad, message in (({**good, "expect": {"c": "better"}}, "'c' is not a variant"),
                         ({**good, "expect": {"b": "faster"}}, "'faster' is not a verdict"),
                         ({**good, "expect": {"a": "better"}}, "'a' is compared with nothing")):
        with pytest.raises(ValueError, match=message):
            Spec.model_validate({**base, "finding": bad})


TINY_FINDING = """\
name: NAME
base:
  model: {n_layer: 1, n_head: 2, n_embd: 32}
  data: {source: markov, vocab_size: 16, n_train_tokens: 20000, n_val_tokens: 4096, doc_len: 256}
  train: {batch_size: 4, seq_len: 32, eval_every: 10, warmup_steps: 2, device: cpu, dtype: float32, checkpoint_every: null}
budget: {steps: 10}
variants:
  mha: {}
  wide: {model.n_embd: 64}
seeds: 2
speed: {rounds: 3, warmup: 1}
finding: {direction: "DIRECTION", source: "a test", expect: {wide: [better, worse, equivalent]}}
"""


def test_the_suite_runs_its_specs_and_writes_the_table_everywhere(tmp_path):
    specs = tmp_path / "specs"
    specs.mkdir()
    for name, direction in (("first", "a <b>wider</b> model differs"), ("second", "so does this")):
        (specs / f"{name}.yaml").write_text(TINY_FINDING.replace("NAME", name).replace("DIRECTION", direction))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "bench.findings", "--specs", str(specs), "--out", str(out),
                             "--workers", "1"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((out / "findings.json").read_text())
    assert [r["study"] for r in rows] == ["first", "second"] and all(r["seeds"] == 2 for r in rows)
    assert all(r["minutes"] > 0 for r in rows)
    assert "| a <b>wider</b> model differs | a test |" in (out / "findings.md").read_text()
    page = (out / "findings.html").read_text()
    assert "a &lt;b&gt;wider&lt;/b&gt; model differs" in page and 'href="first/report.html"' in page
    assert "Published direction:" in (out / "first" / "report.html").read_text()
    as_json = subprocess.run([sys.executable, "-m", "bench.report", str(out), "--json"], capture_output=True, text=True,
                             cwd=ROOT, timeout=300)
    assert [r["direction"] for r in json.loads(as_json.stdout)["findings"]] == ["a <b>wider</b> model differs", "so does this"]
    single = subprocess.run([sys.executable, "-m", "bench.report", str(out / "second"), "--json"], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)
    assert json.loads(single.stdout)["findings"][0]["direction"] == "so does this"
    bad = subprocess.run([sys.executable, "-m", "bench.findings", "--specs", str(specs), "--only", "third"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "--only third: no such spec" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("path", FINDINGS, ids=[p.stem for p in FINDINGS])
def test_every_shipped_finding_names_its_source_and_what_agrees(path):
    spec, _ = load_spec(path)
    assert spec.finding is not None and spec.finding.source and spec.finding.expect
    header = textwrap.dedent(path.read_text().split("\nname:")[0])
    assert "Measured" in header  # each spec's header states its measured time and verdicts


def test_a_post_training_finding_is_judged_against_the_method_the_spec_names():
    float_runs = runs_frame({"float": [3.27, 3.29, 3.23, 3.26]}, kind="train")
    rtn = runs_frame({"rtn": [3.2744, 3.2942, 3.2355, 3.2707]}, kind="quantize")
    gptq = runs_frame({"gptq": [3.2716, 3.2941, 3.2304, 3.2685]}, kind="quantize")
    for frame in (rtn, gptq):
        frame["val_loss_float"] = [3.27, 3.29, 3.23, 3.26]
    runs = pd.concat([float_runs, rtn, gptq], ignore_index=True).assign(started_at=0.0, finished_at=60.0)
    spec = {"name": "q", "baseline": "float", "variants": {"float": {}, "rtn": {}, "gptq": {}}, "compare": {"gptq": "rtn"},
            "finding": {"direction": "GPTQ loses less", "source": "Frantar et al. 2023", "expect": {"gptq": "better"}}}
    study = design(spec)
    (comparison,) = finding_row(summarise(runs, study), study, runs, pd.DataFrame())["comparisons"]
    assert (comparison["variant"], comparison["reference"]) == ("gptq", "rtn")  # not gptq against its own float
