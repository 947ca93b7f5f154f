"""The HTML report: written by the runner, self-contained, escaped, merges machines, renders in Chromium."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.report import build_report, write_report
from bench.run import main as run_main

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

STUDY = """\
name: reported
description: "A study with <b>markup</b> & ampersands"
base:
  model: {n_layer: 1, n_head: 2, n_embd: 32}
  data: {source: markov, vocab_size: 16, n_train_tokens: 20000, n_val_tokens: 4096, doc_len: 256}
  train: {batch_size: 4, seq_len: 32, eval_every: 5, warmup_steps: 2, device: cpu, dtype: float32}
budget: {steps: 15}
variants:
  mha: {}
  "<script>alert(1)</script>": {model.attention: mqa}
  moe: {model.moe: {name: topk, n_experts: 4, top_k: 2}}
  int8: {model.quantization: int8_weight_only}
seeds: 2
kernels:
  attention: {backends: [math, sdpa, flash_attn], seq_lens: [32, 64], batch: 1, n_head: 2, head_dim: 8}
  decode: {prompt: 16, new_tokens: 4, n_layer: 1, n_head: 2, n_embd: 16, n_kv_head: 1, window: 8}
  min_time: 0.01
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    spec = folder / "spec.yaml"
    spec.write_text(STUDY)
    assert run_main([str(spec), "--out", str(folder / "out")]) == 0
    return folder / "out"


def test_the_runner_writes_the_report_with_every_section(study):
    html = (study / "report.html").read_text()
    for heading in ("Summary against the baseline", "Loss curves", "Final metrics", "Quality against speed and memory",
                    "Kernels", "Mixture of experts", "Quantization", "Configuration differences",
                    "Environment and hardware", "Reproduce"):
        assert f"<h2>{heading}" in html
    assert "python -m bench.run " in html and "entropy rate" in html
    assert re.search(r"(is (better|worse) than mha by|is equivalent to mha within|vs mha is inconclusive)", html)
    assert "Noise floor: the baseline" in html and "Holm–Shaffer across comparisons" in html
    # forest, curves, final, cost, attention, decode, MoE, quantization: inline SVG, each one parses
    charts = _svgs(html)
    assert len(charts) >= 8 and html.count('<figure class="chart"') == len(charts) and "data:image" not in html
    assert "<script" not in html.replace("&lt;script&gt;", "")  # no scripts at all
    assert "http://" not in html and "https://" not in html  # nothing to fetch


def test_everything_from_the_spec_is_escaped(study):
    html = (study / "report.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert(1)</script>" not in html
    assert "A study with &lt;b&gt;markup&lt;/b&gt; &amp; ampersands" in html


def test_sections_without_data_are_left_out(study):
    """A study that serves nothing, tunes nothing, fits no scaling law and lost no run has no such
    headings, and no "No X in this study" line in their place."""
    html = (study / "report.html").read_text()
    for heading in ("Scaling laws", "Serving under load", "Tuning", "Recipe ladder", "Failed and diverged runs"):
        assert f"<h2>{heading}" not in html
    for placeholder in ("Scaling fits need", "No scaling law", "Not served under load", "serving results",
                        "No MoE layers", "No post-training quantization", "times no kernels", "No per-step metrics",
                        "<p class=\"note\">None.</p>", "Fewer than two variants"):
        assert placeholder not in html


def test_a_section_the_spec_asked_for_says_why_it_is_empty(tmp_path):
    """A scaling study whose grid is too small to fit, whose serving and kernel timing never stored a row:
    each section is there, saying why it shows nothing; sections it never asked for are not."""
    from bench.store import Store

    store = Store(tmp_path)
    spec = {"name": "small-grid", "base": {"data": {"source": "markov"}}, "baseline": "gelu",
            "variants": {"gelu": {}, "swiglu": {}},
            "sweep": {"model.n_embd": [32, 64], "train.tokens": [1000, 2000]},
            "serving": {"request_rate": [1, 4]}, "kernels": {"mlp": {}, "noisy_threshold": 0.1}}
    store.record_study("small-grid", spec, "python -m bench.run small-grid.yaml")
    for i, (variant, n, d) in enumerate((v, n, d) for v in ("gelu", "swiglu") for n in (1e4, 2e4) for d in (1e3, 2e3)):
        metrics = {"status": "finished", "val_loss": 3 + 1e3 / n + 1e2 / d, "tokens": d,
                   "params": {"total": n, "active": n, "non_embedding": n}}
        store.db.execute("INSERT INTO runs (run_id, study, variant, sweep, seed, kind, config, status, metrics, hardware, libraries) "
                         "VALUES (?, 'small-grid', ?, '{}', 0, 'train', '{}', 'finished', ?, ?, '{}')",
                         (f"r{i}", variant, json.dumps(metrics), json.dumps({"cpu": "test cpu", "torch_threads": 2})))
    store.db.commit()
    store.close()
    html = build_report([tmp_path])
    scaling = html[html.index("<h2>Scaling laws"):]
    assert "No scaling law was fitted: the fits need each variant's finished runs to span at least 3 model sizes" in scaling
    serving = html[html.index("<h2>Serving under load"):]
    assert "this store holds no serving results" in serving and f"python -m bench.serve bench {tmp_path}" in serving
    assert "The spec times kernels, but this store holds no timings" in html[html.index("<h2>Kernels"):]
    for heading in ("Loss curves", "Mixture of experts", "Quantization", "Tuning", "Failed and diverged runs"):
        assert f"<h2>{heading}" not in html


def test_the_report_is_a_pure_function_of_the_store(study, tmp_path):
    first = build_report([study])
    second = build_report([study])
    strip = lambda s: "\n".join(line for line in s.splitlines() if "generated" not in line)  # noqa: E731
    assert strip(first) == strip(second)


def test_python_m_bench_report_writes_a_file_and_reports_bad_folders(study, tmp_path):
    out = tmp_path / "r.html"
    result = subprocess.run([sys.executable, "-m", "bench.report", str(study), "-o", str(out)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0 and out.exists()
    missing = subprocess.run([sys.executable, "-m", "bench.report", str(tmp_path / "nope")], capture_output=True,
                             text=True, cwd=ROOT)
    assert missing.returncode == 2 and "no results store" in missing.stderr and "Traceback" not in missing.stderr


def test_json_summary_carries_every_field_and_nothing_else_on_stdout(study):
    result = subprocess.run([sys.executable, "-m", "bench.report", str(study), "--json"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # the whole of stdout is the one object
    assert summary["study"] == "reported" and summary["metric"] == "val_loss"
    assert set(summary["noise"]) >= {"baseline_sd", "paired_sd"} and summary["noise"]["baseline_sd"] > 0
    fields = {"variant", "reference", "metric", "n", "delta", "ci_low", "ci_high", "p", "p_adjusted", "test",
              "verdict", "margin", "mde"}
    assert len(summary["comparisons"]) == 3  # two variants against mha; int8 against its own float checkpoint
    for c in summary["comparisons"]:
        assert fields <= set(c) and c["reference"] == ("int8 (float)" if c["variant"] == "int8" else "mha")
        assert c["n"] == 2
        assert c["test"] in ("paired t", "paired bootstrap", "welch") and c["test"] == "paired t"
        assert c["verdict"] in ("better", "worse", "equivalent", "inconclusive") and c["margin"] == 0.01
        assert c["ci_low"] <= c["delta"] <= c["ci_high"] and c["p"] <= c["p_adjusted"] <= 1
    # the HTML report and the runner's table are rendered from the same objects
    html = (study / "report.html").read_text()
    from bench.formatting import significant

    for c in summary["comparisons"]:
        assert f'<td class="num">{significant(c["delta"], 3, sign=True)}</td>' in html
    missing = subprocess.run([sys.executable, "-m", "bench.report", str(study.parent / "nope"), "--json"],
                             capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and missing.stdout == "" and "no results store" in missing.stderr


def test_two_machines_merge_side_by_side(study, tmp_path):
    other = tmp_path / "gpu"
    shutil.copytree(study, other)
    db = sqlite3.connect(other / "results.db")
    for run_id, hardware in db.execute("SELECT run_id, hardware FROM runs").fetchall():
        fp = json.loads(hardware)
        fp["gpu"] = {"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 85 * 2**30, "count": 1, "capability": "9.0",
                     "cuda": "12.4", "cudnn": 90100}
        db.execute("UPDATE runs SET hardware=?, machine_id='h100' WHERE run_id=?", (json.dumps(fp), run_id))
    db.commit()
    db.close()
    html = build_report([study, other])
    assert "NVIDIA H100 80GB HBM3" in html and "threads)" in html  # both machines' labels
    # each machine gets its own answer (headlines, forest, noise, settings) and its own verdict tables
    assert "<h2>On NVIDIA H100 80GB HBM3</h2>" in html and html.count('<ul class="headlines">') == 2
    assert html.count("<h3>NVIDIA H100 80GB HBM3</h3>") >= 1 and html.count('<dl class="settings">') == 2
    # both folders hold the same run ids: each step's metrics must join its own machine's run only
    from bench.report import _merge
    from bench.report.figures import with_runs

    results = _merge([study, other])
    joined = with_runs(results.metrics, results.runs, ["machine"])
    assert len(joined) == len(results.metrics)
    assert (joined.groupby("folder")["machine"].nunique() == 1).all() and joined["machine"].nunique() == 2


def test_the_scaling_section_fits_every_variant_with_enough_sizes_and_budgets(tmp_path):
    """A store holding a 3×3 grid per variant (losses drawn from known laws) gets fits and multipliers."""
    from bench.store import Store

    store = Store(tmp_path)
    store.record_study("grid", {"name": "grid", "base": {"data": {"source": "markov"}}, "baseline": "gelu",
                                "variants": {"gelu": {}, "swiglu": {}}, "extrapolate_to": 1e24}, "python -m bench.run grid.yaml")
    truth = {"gelu": (1.69, 406.4, 410.7), "swiglu": (1.69, 406.4 * 1.3**-0.34, 410.7 * 1.1**-0.28)}
    i = 0
    for variant, (e, a, b) in truth.items():
        for n in (1e7, 1e8, 1e9):
            for d in (1e9, 1e10, 1e11):
                loss = e + a / n**0.34 + b / d**0.28
                metrics = {"status": "finished", "val_loss": loss, "tokens": d, "params": {"total": n, "active": n, "non_embedding": n}}
                store.db.execute("INSERT INTO runs (run_id, study, variant, sweep, seed, kind, config, status, metrics, hardware, libraries) "
                                 "VALUES (?, 'grid', ?, '{}', 0, 'train', '{}', 'finished', ?, ?, '{}')",
                                 (f"r{i}", variant, json.dumps(metrics), json.dumps({"cpu": "test cpu", "torch_threads": 2})))
                i += 1
    store.close()
    html = write_report([tmp_path]).read_text()
    assert "Chinchilla Approach 3" in html and "largest trained budget" in html
    assert html.count("<td>1.43</td>") == 2  # m_N·m_D = 1.3 × 1.1, recovered at both scales
    assert "extrapolate_to</td><td>1.00 YFLOP</td>" in html
    # the same grid from a second machine (10% higher losses) is fitted on its own, not pooled
    store = Store(tmp_path)
    for row in store.db.execute("SELECT * FROM runs").fetchall():
        metrics = json.loads(row["metrics"])
        metrics["val_loss"] *= 1.1
        store.db.execute("INSERT INTO runs (run_id, study, variant, sweep, seed, kind, config, status, metrics, hardware, libraries) "
                         "VALUES (?, 'grid', ?, '{}', 0, 'train', '{}', 'finished', ?, ?, '{}')",
                         (row["run_id"] + "b", row["variant"], json.dumps(metrics), json.dumps({"cpu": "other cpu", "torch_threads": 2})))
    store.db.commit()
    store.close()
    html = write_report([tmp_path]).read_text()
    for machine in ("test cpu (2 threads)", "other cpu (2 threads)"):
        assert f"<td>swiglu @ {machine}</td>" in html
    assert html.count("<td>1.43</td>") == 4  # each machine's multipliers, recovered separately


def test_the_report_renders_the_analysis_scaling_summary_as_it_is():
    """The report only formats ``analysis.scaling_per_machine``: every number it shows is the analysis's."""
    from bench.analysis import scaling_per_machine
    from bench.formatting import significant
    from bench.report import _scaling_section
    from tests.test_analysis import isoflop_grid

    parts = scaling_per_machine(isoflop_grid(), "gelu")
    shown = _scaling_section(parts)
    (part,) = parts
    assert len(shown["figures"]) == 1 and shown["figures"][0].startswith("<svg")
    params = ("E", "A", "B", "alpha", "beta")
    for row, fit in zip(shown["fits"], part["fits"], strict=True):
        assert row == {"variant": fit["variant"], **{k: significant(fit[k], 4) for k in params},
                       **{f"{k}_ci": f"{significant(fit[k + '_ci'][0], 4)} – {significant(fit[k + '_ci'][1], 4)}" for k in params},
                       "a": significant(fit["a"], 3), "b": significant(fit["b"], 3), "r2": significant(fit["r2"], 4),
                       "max_residual": significant(fit["max_residual"], 3), "objective": significant(fit["objective"], 4),
                       "warnings": ["compute is 6·N·D for 15 of 15 runs: they recorded no FLOPs per token"]}
    assert shown["fits"][1]["E"] == "1.690" and shown["fits"][1]["A"] == "371.7" and shown["fits"][1]["a"] == "0.452"
    # compute in FLOP units chosen by magnitude, never in scientific notation
    assert shown["multipliers"] == [
        {"variant": "swiglu", "where": "largest trained budget", "compute": "10.0 EFLOP", "loss": "2.986",
         "multiplier": "1.43", "ci": "1.43 – 1.43", "extrapolated": False},
        {"variant": "swiglu", "where": "extrapolated to 100× that", "compute": "1.00 ZFLOP", "loss": "2.329",
         "multiplier": "1.43", "ci": "1.43 – 1.43", "extrapolated": True}]
    assert shown["approach2"][0] == {"variant": "gelu", "a": "0.451", "b": "0.549",
                                     "note": "3 compute budgets, N_opt 29.29M at 100 PFLOP, 83.78M at 1.00 EFLOP, "
                                             "233.68M at 10.0 EFLOP; R² of the N_opt line 1.000, parabolas' R² ≥ 0.9989"}
    for row, law in zip(shown["compute_law"], part["compute_law"], strict=True):
        assert row == {"variant": law["variant"], "E": significant(law["E"], 4), "K": significant(law["K"], 4),
                       "gamma": significant(law["gamma"], 3), "r2": significant(law["r2"], 4), "points": law["points"],
                       "range": "100 PFLOP – 10.0 EFLOP (outside: extrapolation)",
                       "max_residual": significant(law["max_residual"], 3)}
    assert _scaling_section([]) is None


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
def test_the_report_renders_in_headless_chromium_with_no_errors_and_no_requests(study, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    report = study / "report.html"
    console, requests, dialogs = [], [], []
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.on("console", lambda m: console.append((m.type, m.text)))
        page.on("request", lambda r: requests.append(r.url))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        sizes = page.evaluate("Array.from(document.querySelectorAll('figure.chart svg'))"
                              ".map(s => [s.getBoundingClientRect().width, s.getBoundingClientRect().height])")
        overlaps = page.evaluate(TICK_LABEL_OVERLAPS)
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert [c for c in console if c[0] in ("error", "warning")] == []
    assert [r for r in requests if not r.startswith("data:")] == [report.as_uri()]  # only the file itself
    assert dialogs == []  # the variant named <script>alert(1)</script> stayed text
    assert len(sizes) >= 8 and all(100 < w <= 1250 and h > 50 for w, h in sizes)
    assert overlaps == []  # no two tick labels of one axis overlap, as Chromium lays the text out
    assert (tmp_path / "report.png").stat().st_size > 10_000
    shutil.copy(tmp_path / "report.png", study / "report.png")  # kept beside the report


# scientific notation as Python prints it: a decimal point or a signed exponent (1.2e-05, 1e+24, 3.0E8);
# a bare "8e1959" is part of a git commit hash, not a number
SCIENTIFIC = r"\b\d+(?:\.\d+[eE][+-]?\d+|[eE][+-]\d+)\b"


def _text(html: str) -> str:
    """The report's text — the figures' tick labels and legends included — without tags or the spec's
    JSON (printed as the user wrote it)."""
    html = re.sub(r"<details>.*?</details>|<style\b.*?</style>", "", html, flags=re.S)
    return re.sub(r"<[^>]+>", " ", html)


def test_the_first_screen_answers_the_question_and_the_evidence_follows(study):
    html = (study / "report.html").read_text()
    headlines = html.index('<ul class="headlines">')
    assert headlines < html.index("<table") and headlines < html.index("<h2>")
    first = html[headlines:html.index("</ul>", headlines)]
    # every comparison has a headline from the verdict engine, naming its test, with the costs from the store
    assert first.count("<li>") == 3 and first.count("paired t over 2 seeds") == 3
    mqa = next(li for li in first.split("<li>") if "&lt;script&gt;" in li)  # the variant with mqa attention
    assert "cuts the KV cache 2.0×" in mqa and "per 20-token sequence" in mqa
    assert "decodes in " in mqa and "per token (timed one after the other)" in mqa  # decode: measured, not compared
    assert "interleaved rounds of training steps" in mqa and re.search(r"on [^<]+ \(\d+ threads\)\.", mqa)
    int8 = next(li for li in first.split("<li>") if "int8 is" in li or "int8 vs" in li)
    assert "int8 (float)" in int8 and "the model" in int8 and "val batch" in int8
    forest = html.index('aria-label="paired differences from each reference with 95% CIs"')
    noise, settings = html.index('<p class="noise">'), html.index('<dl class="settings">')
    assert headlines < forest < noise < settings < html.index("<h2>Summary against the baseline")
    lines = re.findall(r"<dt>(\w+)</dt>", html)
    assert lines[:5] == ["model", "data", "budget", "seeds", "tuning"]
    assert "1 layers × 32 wide, 2 heads" in html and "15 steps per run, batch 4" in html
    order = [html.index(f"<h2>{h}") for h in ("Summary against the baseline", "Quality against speed and memory",
                                                "Kernels", "Loss curves", "Final metrics", "Mixture of experts",
                                                "Quantization", "Configuration differences", "Environment and hardware",
                                                "Reproduce")]
    assert order == sorted(order)


def test_kernels_read_as_compact_tables_with_units_and_unavailable_backends_once(study):
    html = (study / "report.html").read_text()
    text = _text(html)
    assert text.count("flash-attn not installed") == 1  # once, not per variant and length
    table = html[html.index("attention: latency"):html.index("</table>", html.index("attention: latency"))]
    assert re.search(r'<th class="num">32 tokens</th><th class="num">64 tokens</th></tr>', table)
    rows = re.findall(r"<tr><td>(\w+)</td><td>(\w+)</td><td>([\w+]+)</td>", table)
    assert rows and len(rows) == len(set(rows))  # one row per (variant, backend, direction)
    # the spec's backends that run on a CPU (attentions registered by other tests may add their own kernel)
    assert {"math", "sdpa"} <= {r[1] for r in rows} and "flash_attn" not in {r[1] for r in rows}
    assert {r[2] for r in rows} == {"forward"}
    assert re.search(r'<td class="num">\d[\d.]* (µs|ms|s)( ~)?</td>', table)
    assert re.search(r"\d[\d.]* [kMGT]?FLOP/s · [\d.]+%", html)
    assert re.search(r'<td class="num">[\d.]+ (B|KiB|MiB)</td>', html)  # the KV cache in binary units
    # a noisy cell (~) comes with the command that measures it quietly, and only then
    assert ("~</td>" in html) == ("For a quiet measurement" in html)


def test_no_number_in_the_report_is_in_scientific_notation_or_padded_with_zeros(study):
    text = _text((study / "report.html").read_text())
    assert not re.findall(SCIENTIFIC, text)
    assert not re.findall(r"\.0000\b", text)


def test_text_tables_sort_by_verdict_then_size_of_the_difference():
    from bench.analysis import summarise
    from bench.report import _comparison_rows, _variant_rows
    from tests.test_analysis import design, runs_frame

    jitter = np.array([0.0, 0.002, -0.001, 0.001])  # paired differences with a spread to test
    base = np.array([2.0, 2.1, 2.2, 2.05])
    runs = runs_frame({"base": base, "tiny": base + 0.001 + jitter, "big": base - 0.5 + jitter,
                       "bad": base + 0.3 + jitter, "small": base - 0.1 + jitter})
    summary = summarise(runs, design({"name": "s", "baseline": "base",
                                      "variants": dict.fromkeys(["base", "tiny", "big", "bad", "small"], {})}))
    assert [(r["variant"], r["verdict"]) for r in _comparison_rows(summary)] == [
        ("big", "better"), ("small", "better"), ("bad", "worse"), ("tiny", "equivalent")]
    _, rows = _variant_rows(summary, "base")
    assert [r["variant"] for r in rows] == ["base", "big", "small", "bad", "tiny"]
    assert rows[1]["metrics"][0] == "1.588 ± 0.085"


ATTENTION_SMALL = ["--set", "budget.steps=20", "--set", "base.data.n_train=512", "--set", "kernels.min_time=0.002",
                   "--set", "kernels.attention.seq_lens=[32,64]", "--set", "kernels.decode.prompt=16",
                   "--set", "kernels.decode.new_tokens=4", "--set", "serving.max_concurrency=2",
                   "--set", "serving.request_rate=[inf]", "--set", "serving.num_prompts=4", "--set", "serving.warmup=1",
                   "--set", "serving.new_tokens=4", "--seeds", "0", "1",
                   "--set", "metric=val_loss"]  # 20 steps reach no loss target: every run censored alike


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
def test_the_attention_study_reads_at_1400_px_with_the_answer_first(tmp_path):
    """ablations/attention.yaml (20 steps, two kernel lengths) rendered headless at 1400 px, checked on the DOM."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    out = tmp_path / "attention"
    assert run_main([str(ROOT / "ablations" / "attention.yaml"), "--out", str(out), *ATTENTION_SMALL]) == 0
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto((out / "report.html").as_uri())
        page.wait_for_load_state("load")
        scroll_width = page.evaluate("document.documentElement.scrollWidth")
        headline_first = page.evaluate("""() => {
            const first = document.querySelector('ul.headlines li'), table = document.querySelector('table');
            return !!first && !!table && !!(first.compareDocumentPosition(table) & Node.DOCUMENT_POSITION_FOLLOWING)
                && first.getBoundingClientRect().top < table.getBoundingClientRect().top; }""")
        headlines = page.evaluate("Array.from(document.querySelectorAll('ul.headlines li')).map(li => li.innerText)")
        text = page.evaluate("document.body.innerText")
        overlaps = page.evaluate(TICK_LABEL_OVERLAPS)
        page.screenshot(path=str(out / "first-screen.png"))
        browser.close()
    assert scroll_width <= 1400  # no horizontal scroll
    assert overlaps == []  # serving's log axis and the kernels' FLOP/s axes included
    assert headline_first and len(headlines) == 2  # gqa and mqa, each against mha
    assert all(re.search(r"\b(better|worse|equivalent|inconclusive)\b", h) and "paired t over 2 seeds" in h for h in headlines)
    assert not re.findall(SCIENTIFIC, text) and not re.findall(r"\.0000\b", text)
    for reason in ("flash-attn not installed", "xformers not installed"):
        assert text.count(reason) == 1  # once for this machine, not per shape
    assert (out / "first-screen.png").stat().st_size > 10_000


def test_kernel_tables_of_components_timed_without_flops_or_lengths():
    """A norm study's kernels (one token count, no FLOP/s, no decode) still read as a latency table."""
    from bench.report import _kernel_tables

    kernels = pd.DataFrame([{"machine": "m", "component": "norm", "name": name, "backend": "eager", "direction": d,
                             "status": "ok", "reason": None, "median_s": t, "noisy": False}
                            for name, t in (("layernorm", 2e-3), ("rmsnorm", 1.5e-3)) for d in ("forward", "forward_backward")])
    # training steps timed side by side on another thread count: their own section, no empty heading here
    steps = pd.DataFrame([{"machine": "m (1 thread)", "component": "train_step", "name": "rmsnorm", "status": "ok"}])
    (machine,) = _kernel_tables(pd.concat([kernels, steps], ignore_index=True))
    (norm,) = machine["components"]
    assert norm["throughput"] is None and machine["decode"] == [] and machine["not_run"] == []
    assert norm["latency"]["columns"] == ["median"]
    assert [(r["name"], r["direction"], r["cells"]) for r in norm["latency"]["rows"]] == [
        ("layernorm", "forward", ["2.00 ms"]), ("layernorm", "forward+backward", ["2.00 ms"]),
        ("rmsnorm", "forward", ["1.50 ms"]), ("rmsnorm", "forward+backward", ["1.50 ms"])]


def test_a_study_of_one_model_states_its_result_as_the_headline():
    from bench.analysis import summarise
    from bench.report import _headlines
    from tests.test_analysis import design, runs_frame

    runs = runs_frame({"nanogpt": [1.87, 1.89]}, params=804_100.0, tokens_per_s=9_990.0, machine="m")
    summary = summarise(runs, design({"name": "s", "variants": {"nanogpt": {}}}), "m")
    (headline,) = _headlines(summary, runs, pd.DataFrame())
    assert headline["verdict"] == "result"
    assert headline["sentence"].startswith("nanogpt reaches val loss 1.880 (sd 0.014 over 2 seeds; 95% CI 1.753 to 2.007)")
    assert headline["sentence"].endswith("with 804.10k parameters at 9.99k tokens/s on m.")


# -- figures: one colour per variant, plain tick labels that never overlap ------------------------------

# Run in the page: every pair of tick labels of one axis (matplotlib's SVG groups an axis's ticks, each
# with its <text>) whose boxes, as Chromium lays the text out, overlap by more than half a pixel both ways.
TICK_LABEL_OVERLAPS = """() => {
  const overlaps = [];
  document.querySelectorAll('figure.chart svg').forEach((svg, figure) => {
    svg.querySelectorAll('g[id*="matplotlib.axis_"]').forEach(axis => {
      const labels = Array.from(axis.querySelectorAll(':scope > g[id*="tick_"] text'))
        .map(t => [t.textContent.trim(), t.getBoundingClientRect()]).filter(([text, box]) => text && box.width > 0);
      labels.forEach(([a, p], i) => labels.slice(i + 1).forEach(([b, q]) => {
        const w = Math.min(p.right, q.right) - Math.max(p.left, q.left);
        const h = Math.min(p.bottom, q.bottom) - Math.max(p.top, q.top);
        if (w > 0.5 && h > 0.5) overlaps.push([figure, axis.id.replace(/^f[0-9a-f]+-/, ''), a, b]);
      }));
    });
  });
  return overlaps;
}"""
COLOUR = re.compile(r"(?:fill|stroke): (#[0-9a-f]{6})")


def _svgs(html: str) -> list[ET.Element]:
    """Every inline figure of a report, parsed (each must be well-formed)."""
    return [ET.fromstring(svg) for svg in re.findall(r"<svg\b.*?</svg>", html, flags=re.S)]


def _legend_colours(svg: ET.Element) -> dict[str, str]:
    """Each legend entry's label and the colour its handle is drawn in (matplotlib writes a legend as
    handle, label, handle, label …; a title has no handle of its own)."""
    out = {}
    for legend in svg.iter("g"):
        if "legend_" not in legend.get("id", ""):
            continue
        handle = None
        for child in legend:
            if "text_" in child.get("id", ""):
                if handle:
                    out["".join(child.itertext()).strip()] = handle
                handle = None
            else:
                colours = [c for e in child.iter() for c in COLOUR.findall(e.get("style", "")) if c != "#ffffff"]
                handle = colours[0] if colours else handle
    return out


def _tick_labels(svg: ET.Element) -> list[list[str]]:
    """Each axis's tick labels as drawn, in order."""
    return [["".join(text.itertext()).strip() for tick in axis if "tick_" in tick.get("id", "") for text in tick.iter("text")]
            for axis in svg.iter("g") if "matplotlib.axis_" in axis.get("id", "")]


def test_a_variant_has_one_colour_in_every_figure_of_the_report(study):
    html = (study / "report.html").read_text()
    seen: dict[str, list[str]] = {}
    for svg in _svgs(html):
        for label, colour in _legend_colours(svg).items():
            seen.setdefault(label, []).append(colour)
    variants = ("mha", "<script>alert(1)</script>", "moe", "int8")
    for variant in variants:  # curves, cost, MoE and quantization legends
        assert len(seen[variant]) >= 2 and len(set(seen[variant])) == 1, (variant, seen[variant])
    assert len({seen[v][0] for v in variants}) == len(variants)  # and no two variants share one
    assert seen["mha"][0] == "#1f77b4"  # the baseline takes the palette's first colour


def test_the_same_palette_colours_serving_and_the_loss_curves_alike():
    """The issue's case: serving's data lists gqa first (it was blue there, orange in the loss curves)."""
    from bench.report import figures

    palette = figures.variant_palette(["mha", "gqa", "mqa"])
    runs = pd.DataFrame({"run_id": ["a", "b", "c"], "variant": ["mha", "gqa", "mqa"], "machine": "m",
                         "flops_per_token": 1e5})
    metrics = pd.DataFrame([{"run_id": r, "step": s, "tokens": 1000 * s, "val_loss": 3 - s / 10 - i / 20,
                             "train_loss": 3.1 - s / 10} for i, r in enumerate("abc") for s in range(1, 6)])
    serving = pd.DataFrame([{"variant": v, "request_rate": r, "request_throughput": min(r, 4) + j / 10,
                             "request_goodput": None, "goodput_slos": {}, "median_ttft_ms": 10 * j + min(r, 10),
                             "saturation_rate": 4.0} for j, v in enumerate(["gqa", "mha"]) for r in (1, 2, 4, 8, np.inf)])
    curves = _legend_colours(ET.fromstring(figures.loss_curves(metrics, runs, None, palette)))
    served = _legend_colours(ET.fromstring(figures.serving_figure(serving, palette)))
    assert curves["gqa"] == served["gqa"] == palette["gqa"] == "#ff7f0e"
    assert curves["mha"] == served["mha"] == "#1f77b4" and curves["mqa"] == "#2ca02c"
    # serving's legend lists the baseline first, as the palette does
    assert [k for k in served if k in palette] == ["mha", "gqa"]
    # its log axis of offered rates reads 1, 2, 4, 8 and inf (every request at once) as the last tick: not 10⁰
    # with 2×10⁰, 3×10⁰ … between
    ticks = _tick_labels(ET.fromstring(figures.serving_figure(serving, palette)))
    assert ticks[0] == ticks[2] == ["1", "2", "4", "8", "inf"]


def test_the_serving_section_states_each_variants_saturation_point_and_reads_old_closed_loop_rows(tmp_path):
    """Rows of two sweeps (the report shows the last), a variant that never saturates, and a variant
    benchmarked by the closed-loop generator before open-loop sweeps (its rows read as rate inf, a cap)."""
    from bench.results import load
    from bench.serve.sweep import annotate
    from bench.store import Store

    store = Store(tmp_path)
    store.record_study("served", {"name": "served", "base": {"data": {"source": "markov"}},
                                  "variants": {"mha": {}, "gqa": {}, "old": {}}, "serving": {"request_rate": [1, 2]}},
                       "python -m bench.run served.yaml")
    store.db.execute("INSERT INTO runs (run_id, study, variant, sweep, seed, kind, config, status, metrics, hardware, "
                     "libraries) VALUES ('r0', 'served', 'mha', '{}', 0, 'train', '{}', 'finished', ?, ?, '{}')",
                     (json.dumps({"status": "finished", "val_loss": 2.0}),
                      json.dumps({"cpu": "test cpu", "torch_threads": 2})))

    def sweep(goodputs, sweep_id, slos=None):
        rows = [{"request_rate": r, "request_throughput": g, "request_goodput": g if slos else None,
                 "goodput_slos": slos or {}, "num_prompts": 100, "warmup": 4, "completed": 100, "failed": 0,
                 "rejected": 0, "max_concurrency": None, "burstiness": 1.0, "prompt_len": 32, "new_tokens": 16,
                 "max_batch": 8, "batching": "continuous", "output_throughput": 16 * g, "median_ttft_ms": 5.0,
                 "p99_ttft_ms": 9.0, "median_tpot_ms": 1.0, "p99_tpot_ms": 2.0, "median_itl_ms": 1.0,
                 "p99_itl_ms": 2.0, "kv_cache_bytes_peak": 4096, "max_batched": 4, "sweep_id": sweep_id,
                 "percentile_notes": [], "device": "cpu", "dtype": "float32", "kernel": "sdpa", "quantization": None}
                for r, g in zip((1.0, 2.0, 4.0, float("inf")), goodputs)]
        annotate(rows)
        return rows

    environment = {"machine_id": "m", "hardware": {"cpu": "test cpu", "torch_threads": 2}}
    store.add_serving("served", "r0", "mha", sweep([1, 1, 1, 1], "first"), environment)  # replaced by the next
    store.add_serving("served", "r0", "mha", sweep([1, 2, 3.9, 4.0], "second", {"ttft": 100}), environment)
    store.add_serving("served", "r1", "gqa", sweep([1, 2, 4, 9], "third"), environment)
    old = {"settings_key": "k", "requests": 16, "prompt_len": 32, "new_tokens": 16, "max_batch": 4,
           "batching": "continuous", "seconds": 2.0, "requests_per_s": 8.0, "tokens_per_s": 128.0, "errors": 1,
           "ttft_p50_s": 0.004, "ttft_p90_s": 0.006, "ttft_p99_s": 0.008, "itl_p50_s": 0.001, "itl_p90_s": 0.002,
           "itl_p99_s": 0.003, "kv_cache_bytes_peak": 2048, "max_batched": 2, "error_examples": ["boom"]}
    store.add_serving("served", "r2", "old", [{**old, "concurrency": 1}, {**old, "concurrency": 4}], environment)
    store.close()

    rows = load(tmp_path).serving
    legacy = rows[rows["variant"] == "old"].iloc[0]
    assert (legacy["request_rate"], legacy["max_concurrency"], legacy["request_throughput"]) == (np.inf, 1, 8.0)
    assert (legacy["completed"], legacy["failed"], legacy["errors"]) == (15, 1, 1) and legacy["p99_ttft_ms"] == 8.0
    html = build_report([tmp_path])
    start = html.index("<h2>Serving under load")
    section = html[start:html.index("</table>", start)]
    assert "Saturation point (the lowest offered rate after which goodput rises by less than 5%)" in section
    assert "<strong>mha</strong>: 4 requests/s" in section
    assert "<strong>gqa</strong>: none (saturates above 4 requests/s: goodput still rises by 5% or more" in section
    assert section.count(">4 (saturation)<") == 1  # mha's row at its saturation point
    table = section[section.index("<table>"):]
    assert table.count("<tr><td>mha") == 4 and table.count("<tr><td>gqa") == 4 and table.count("<tr><td>old") == 2
    assert "100 / 0 / 0" in table and "15 / 1 / 0" in table
    assert "TTFT ≤ 100 ms" in section and "served with device cpu; dtype float32; kernel sdpa" in section
    assert "goodput against offered load" in section


def test_log_axes_read_in_plain_numbers():
    """A log axis left to matplotlib's defaults (a short range labels its minor ticks 2×10⁰, 3×10⁰) reads
    2, 5; one over many decades reads 1G, 10G, …; the tuned-lr axis reads decimals."""
    import matplotlib.pyplot as plt

    from bench.report import figures

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([1.5, 8], [1, 2])
    ax.set_xscale("log")
    assert _tick_labels(ET.fromstring(figures.to_svg(fig)))[0] == ["2", "5"]
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([1e9, 3e14], [1, 2])
    ax.set_xscale("log")
    assert _tick_labels(ET.fromstring(figures.to_svg(fig)))[0] == ["1G", "10G", "100G", "1T", "10T", "100T"]
    tuning = pd.DataFrame([{"variant": "mha", "sweep": {"train.lr": lr}, "status": "finished", "val_loss": 3 + lr}
                           for lr in (1e-4, 3e-4, 1e-3, 3e-3)])
    lr_axis = _tick_labels(ET.fromstring(figures.sensitivity_figure(tuning)))[0]
    assert lr_axis == ["0.0001", "0.0002", "0.0005", "0.001", "0.002"]
    assert [figures.short(v) for v in (0, 0.25, 2, 20, 1500, 999_600, 1.5e11)] == ["0", "0.25", "2", "20", "1.5k", "1M", "150G"]


def _crowded_figure():
    """A narrow FLOP axis with twelve long labels ("100 GFLOP200 GFLOP…" as the issue saw them)."""
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1e11, 9e11], [1, 2])
    ax.xaxis.set_major_locator(ticker.MaxNLocator(12))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v / 1e9:.0f} GFLOP"))
    return fig


def test_crowded_tick_labels_are_thinned_and_crowded_names_turned():
    import matplotlib.pyplot as plt

    from bench.report import figures

    fig = _crowded_figure()
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    before = [t.label1.get_text() for t in figures._drawn_ticks(fig.axes[0].xaxis)]
    assert figures._crowded([t.label1 for t in figures._drawn_ticks(fig.axes[0].xaxis)], renderer)
    figures._declutter(fig)
    after = figures._drawn_ticks(fig.axes[0].xaxis)
    assert not figures._crowded([t.label1 for t in after], renderer)
    kept = [t.label1.get_text() for t in after]
    assert 2 <= len(kept) < len(before) and set(kept) <= set(before)
    plt.close(fig)
    names = [f"variant-{i}" for i in range(8)]  # names cannot be thinned: they turn, every one kept
    fig, ax = plt.subplots(figsize=(2.5, 2))
    ax.bar(names, range(8))
    figures._declutter(fig)
    drawn = figures._drawn_ticks(ax.xaxis)
    assert [t.label1.get_text() for t in drawn] == names and {t.label1.get_rotation() for t in drawn} == {90}
    assert not figures._crowded([t.label1 for t in drawn], fig.canvas.get_renderer())
    plt.close(fig)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
def test_chromium_finds_overlapping_tick_labels_and_to_svg_leaves_none(monkeypatch):
    """The overlap check in the report's Chromium tests can fail: the crowded axis as matplotlib laid it
    out overlaps in Chromium; the same figure through ``to_svg`` does not."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from bench.report import figures

    tidy = figures.to_svg(_crowded_figure())
    monkeypatch.setattr(figures, "_declutter", lambda fig: None)
    raw = figures.to_svg(_crowded_figure())
    found = {}
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        for name, svg in (("raw", raw), ("tidy", tidy)):
            page.set_content(f'<!doctype html><html><body><figure class="chart">{svg}</figure></body></html>')
            found[name] = page.evaluate(TICK_LABEL_OVERLAPS)
        browser.close()
    assert len(found["raw"]) >= 5 and all(axis.endswith("matplotlib.axis_1") for _, axis, _, _ in found["raw"])
    assert ["0", "matplotlib.axis_1", "80 GFLOP", "160 GFLOP"] in [[str(f), *rest] for f, *rest in found["raw"]]
    assert found["tidy"] == []


def test_noisy_latencies_come_with_a_command_that_measures_them_quietly(tmp_path):
    """The footnote's command is the study's own with more samples and pinned threads: one the runner
    takes, whose kernels: section then differs (so it is timed again)."""
    import yaml

    from bench.report import _kernel_tables
    from bench.run import parse_args
    from bench.spec import load_spec

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(STUDY)
    command = f"python -m bench.run {spec_file} --out {tmp_path / 'out'}"
    rows = [{"machine": "m", "folder": "f", "component": "attention", "name": "mha", "backend": "math",
             "direction": "forward", "seq_len": n, "status": "ok", "reason": None, "median_s": 1e-4,
             "noisy": noisy, "device": "cpu", "threads": 2} for n, noisy in ((32, False), (64, True))]
    (machine,) = _kernel_tables(pd.DataFrame(rows), yaml.safe_load(STUDY), {"f": command})
    assert machine["noisy"] and machine["rerun"] == command + " --set kernels.min_time=1 --set kernels.threads=2"
    assert machine["components"][0]["latency"]["rows"][0]["cells"] == ["100 µs", "100 µs ~"]
    args = parse_args(shlex.split(machine["rerun"])[3:])
    spec, _ = load_spec(args.spec, args.set)
    assert spec.kernels.min_time == 1 and spec.kernels.threads == 2 and args.out == str(tmp_path / "out")
    quiet = [{**r, "noisy": False} for r in rows]
    (machine,) = _kernel_tables(pd.DataFrame(quiet), yaml.safe_load(STUDY), {"f": command})
    assert not machine["noisy"] and machine["rerun"] is None


def test_the_tuning_setting_lists_each_variants_own_grid():
    from bench.report import _grid

    assert _grid("train.lr", [0.003, 0.006]) == "train.lr in {0.003, 0.006}"
    assert (_grid("train.lr", {"adamw": [0.003, 0.006], "muon": [0.012, 0.024]})
            == "train.lr in {0.003, 0.006} for adamw, {0.012, 0.024} for muon")  # the values, not the variants' names
