"""The HTML report: written by the runner, self-contained, escaped, merges machines, renders in Chromium."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
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
                    "Kernels", "Scaling laws", "Mixture of experts", "Quantization", "Configuration differences",
                    "Environment and hardware", "Reproduce"):
        assert f"<h2>{heading}" in html
    assert "python -m bench.run " in html and "entropy rate" in html
    assert re.search(r"(is (better|worse) than mha by|is equivalent to mha within|vs mha is inconclusive)", html)
    assert "Noise floor: the baseline" in html and "Holm–Shaffer across comparisons" in html
    assert html.count("data:image/png;base64,") >= 7  # forest, curves, final, cost, attention, decode, MoE, quantization
    assert "<script" not in html.replace("&lt;script&gt;", "")  # no scripts at all
    assert "http://" not in html and "https://" not in html  # nothing to fetch


def test_everything_from_the_spec_is_escaped(study):
    html = (study / "report.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert(1)</script>" not in html
    assert "A study with &lt;b&gt;markup&lt;/b&gt; &amp; ampersands" in html


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
    store.record_study("grid", {"name": "grid", "baseline": "gelu", "variants": {"gelu": {}, "swiglu": {}},
                                "extrapolate_to": 1e24}, "python -m bench.run grid.yaml")
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
    assert len(shown["figures"]) == 1 and shown["figures"][0].startswith("data:image/png;base64,")
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
        sizes = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert [c for c in console if c[0] in ("error", "warning")] == []
    assert [r for r in requests if not r.startswith("data:")] == [report.as_uri()]  # only the file itself
    assert dialogs == []  # the variant named <script>alert(1)</script> stayed text
    assert len(sizes) >= 6 and all(complete and w > 0 and h > 0 for complete, w, h in sizes)
    assert (tmp_path / "report.png").stat().st_size > 10_000
    shutil.copy(tmp_path / "report.png", study / "report.png")  # kept beside the report


# scientific notation as Python prints it: a decimal point or a signed exponent (1.2e-05, 1e+24, 3.0E8);
# a bare "8e1959" is part of a git commit hash, not a number
SCIENTIFIC = r"\b\d+(?:\.\d+[eE][+-]?\d+|[eE][+-]\d+)\b"


def _text(html: str) -> str:
    """The report's text without its inline images, tags, or the spec's JSON (printed as the user wrote it)."""
    html = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)
    html = re.sub(r"<details>.*?</details>|<style>.*?</style>", "", html, flags=re.S)
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
    forest = html.index('alt="paired differences from each reference with 95% CIs"')
    noise, settings = html.index('<p class="noise">'), html.index('<dl class="settings">')
    assert headlines < forest < noise < settings < html.index("<h2>Summary against the baseline")
    lines = re.findall(r"<dt>(\w+)</dt>", html)
    assert lines[:5] == ["model", "data", "budget", "seeds", "tuning"]
    assert "1 layers × 32 wide, 2 heads" in html and "15 steps per run, batch 4" in html
    order = [html.index(f"<h2>{h}") for h in ("Summary against the baseline", "Quality against speed and memory",
                                                "Kernels", "Loss curves", "Scaling laws", "Mixture of experts",
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


def test_no_number_in_the_report_is_in_scientific_notation_or_padded_with_zeros(study):
    text = _text((study / "report.html").read_text())
    assert not re.findall(SCIENTIFIC, text)
    assert not re.findall(r"\.0000\b", text)


def test_text_tables_sort_by_verdict_then_size_of_the_difference():
    from bench.analysis import summarise
    from bench.report import _comparison_rows, _variant_rows
    from tests.test_analysis import runs_frame

    jitter = np.array([0.0, 0.002, -0.001, 0.001])  # paired differences with a spread to test
    base = np.array([2.0, 2.1, 2.2, 2.05])
    runs = runs_frame({"base": base, "tiny": base + 0.001 + jitter, "big": base - 0.5 + jitter,
                       "bad": base + 0.3 + jitter, "small": base - 0.1 + jitter})
    summary = summarise(runs, {"name": "s", "baseline": "base", "variants": dict.fromkeys(["base", "tiny", "big", "bad", "small"], {})})
    assert [(r["variant"], r["verdict"]) for r in _comparison_rows(summary)] == [
        ("big", "better"), ("small", "better"), ("bad", "worse"), ("tiny", "equivalent")]
    _, rows = _variant_rows(summary, "base")
    assert [r["variant"] for r in rows] == ["base", "big", "small", "bad", "tiny"]
    assert rows[1]["metrics"][0] == "1.588 ± 0.085"


ATTENTION_SMALL = ["--set", "budget.steps=20", "--set", "base.data.n_train=512", "--set", "kernels.min_time=0.002",
                   "--set", "kernels.attention.seq_lens=[32,64]", "--set", "kernels.decode.prompt=16",
                   "--set", "kernels.decode.new_tokens=4", "--set", "serving.concurrency=[2]",
                   "--set", "serving.requests=4", "--set", "serving.new_tokens=4", "--seeds", "0", "1",
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
        page.screenshot(path=str(out / "first-screen.png"))
        browser.close()
    assert scroll_width <= 1400  # no horizontal scroll
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
    (machine,) = _kernel_tables(kernels)
    (norm,) = machine["components"]
    assert norm["throughput"] is None and machine["decode"] == [] and machine["not_run"] == []
    assert norm["latency"]["columns"] == ["median"]
    assert [(r["name"], r["direction"], r["cells"]) for r in norm["latency"]["rows"]] == [
        ("layernorm", "forward", ["2.00 ms"]), ("layernorm", "forward+backward", ["2.00 ms"]),
        ("rmsnorm", "forward", ["1.50 ms"]), ("rmsnorm", "forward+backward", ["1.50 ms"])]


def test_a_study_of_one_model_states_its_result_as_the_headline():
    from bench.analysis import summarise
    from bench.report import _headlines
    from tests.test_analysis import runs_frame

    runs = runs_frame({"nanogpt": [1.87, 1.89]}, params=804_100.0, tokens_per_s=9_990.0, machine="m")
    summary = summarise(runs, {"name": "s", "variants": {"nanogpt": {}}}, "m")
    (headline,) = _headlines(summary, runs, pd.DataFrame())
    assert headline["verdict"] == "result"
    assert headline["sentence"].startswith("nanogpt reaches val loss 1.880 (sd 0.014 over 2 seeds; 95% CI 1.753 to 2.007)")
    assert headline["sentence"].endswith("with 804.10k parameters at 9.99k tokens/s on m.")
