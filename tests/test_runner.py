"""The ablation runner: spec errors, expansion, the store, resuming, concurrency, shipped specs."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import bench.run
from bench.plan import expand
from bench.results import load
from bench.run import main
from bench.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "ablations").glob("*.yaml"))

TINY = """\
name: tiny
description: a tiny study for tests
base:
  model: {n_layer: 1, n_head: 2, n_embd: 32}
  data: {source: markov, vocab_size: 16, n_train_tokens: 20000, n_val_tokens: 4096, doc_len: 256}
  train: {batch_size: 4, seq_len: 32, eval_every: 5, checkpoint_every: 5, warmup_steps: 2, device: cpu, dtype: float32}
budget: {steps: STEPS}
variants:
  mha: {}
  mqa: {model.attention: mqa}
seeds: 2
"""


def write_spec(folder: Path, text: str = TINY, steps: int = 10, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).replace("STEPS", str(steps)))
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.run", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env={**os.environ, **(env or {})}, timeout=600)


def spec_error(tmp_path: Path, text: str, *sets: str) -> str:
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as info:
        spec, sources = load_spec(path, list(sets))
        expand(spec, sources)
    return str(info.value)


# -- bad specs --------------------------------------------------------------------------------------


def test_malformed_yaml_names_the_line_and_exits_2_without_traceback(tmp_path):
    path = write_spec(tmp_path, TINY.replace("variants:", "variants: [oops"))
    result = run_cli(str(path), "--dry-run")
    assert result.returncode == 2
    assert f"{path}:" in result.stderr and "malformed YAML" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "change,expected",
    [
        (("n_layer: 1", "n_layer: one"), "spec.yaml:4: variant 'mha': model.n_layer: Input should be a valid integer"),
        (("description: a tiny", "descripton: a tiny"), "spec.yaml:2: descripton: unknown key"),
        (("mqa: {model.attention: mqa}", "mqa: {model.attention: mqq}"),
         "spec.yaml:10: variant 'mqa': model.attention: unknown attention 'mqq' (did you mean 'mqa'?)"),
        (("mqa: {model.attention: mqa}", "mqa: {model.positional: alibi, model.attention: {name: mha, backend: {name: sdpa, kernel: flash}}}"),
         "variant 'mqa': model: attention 'mha' with backend 'sdpa kernel=flash' cannot add the positional "
         "encoding's score bias (bias), needed by positional 'alibi'"),
        (("seeds: 2", "seeds: two"), "spec.yaml:11: seeds: expected a count (2), a list of seeds ([0, 1, 5]) or {min: 2, max: 8}, got 'two'"),
        (("batch_size: 4", "batch_sise: 4"), "spec.yaml:6: variant 'mha': train.batch_sise: unknown key"),
        (("source: markov", "source: markow"), "spec.yaml:5: variant 'mha': data: Input tag 'markow' found"),
        (("seeds: 2", "seeds: 2\nbaseline: gqa"), "spec.yaml:12: baseline: 'gqa' is not a variant; variants: mha, mqa"),
        (("seeds: 2", "seeds: 2\ncompare: {mqa: gqa}"), "spec.yaml:12: compare: 'gqa' is not a variant; variants: mha, mqa"),
        (("mqa: {model.attention: mqa}", "mqa: {model.attention: {name: mqa, backend: {name: sdpa, kernel: efficient}}}"),
         "variant 'mqa': attention_backend 'sdpa' cannot train here: sdpa kernel 'efficient' needs CUDA (on cpu: auto, flash or math)"),
        (("seeds: 2", "seeds: 2\nsweep: {train.batch_size: [4, 8]}"),
         "spec.yaml:6: train.eval_sequences: variant 'mha' at {'train.batch_size': 4} is evaluated on 80 val sequences and "
         "variant 'mha' at {'train.batch_size': 8} on 160 (eval_batches × batch_size)"),
        (("n_embd: 32}", "n_embd: 32, block_size: 16}"),
         "spec.yaml:6: variant 'mha': train.seq_len: train.seq_len=32 is longer than the 16 positions 'learned' can embed"),
        (("source: markov, vocab_size: 16, n_train_tokens: 20000, n_val_tokens: 4096, doc_len: 256",
          "source: task, task: induction, seq_len: 64"),
         "spec.yaml:6: variant 'mha': train.seq_len: train.seq_len=32 differs from the task's seq_len=64"),
        (("seeds: 2", "seeds: 2\nkernels:\n  mlp: {names: [gelu, gelo]}"),
         "spec.yaml:13: kernels.mlp.names: unknown mlp 'gelo' (did you mean 'gelu'?)"),
        (("seeds: 2", "seeds: 2\nkernels:\n  attention: {variants: [mha, alibi]}"),
         "spec.yaml:13: kernels.attention.variants: unknown attention 'alibi'"),
        (("seeds: 2", "seeds: 2\nmetric: val_loss@64_beyond"),
         "spec.yaml:12: metric: val_loss@64_beyond needs train.eval_lengths to include 64 (variant 'mha' evaluates no "
         "extra lengths)"),
        (("seeds: 2", "seeds: 2\npaired_test: bootstrap"),
         "spec.yaml:12: paired_test: bootstrap is not offered: at 2 to 40 seeds a paired bootstrap's false better/worse "
         "rate measured 7-12% at α = 5%; use permutation"),
        (("seeds: 2", "seeds: 2\nmetric: {name: tokens_to_target}"),
         "spec.yaml:12: metric: tokens_to_target needs target"),
    ],
)
def test_each_bad_spec_names_file_line_and_key(tmp_path, change, expected):
    message = spec_error(tmp_path, TINY.replace(*change))
    assert expected in message, message


@pytest.mark.parametrize("change", [("n_layer: 1", "n_layer: one"), ("mqa: {model.attention: mqa}", "mqa: {model.attention: mqq}"),
                                    ("seeds: 2", "seeds: 2\nkernels:\n  mlp: {names: [gelo]}")],
                         ids=["type", "unknown-component", "kernel-name"])
def test_the_cli_exits_2_on_a_bad_spec_without_a_traceback(tmp_path, change):
    result = run_cli(str(write_spec(tmp_path, TINY.replace(*change))), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and f"{tmp_path}" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout and not (tmp_path / "out").exists()  # nothing trained


def test_an_online_loss_study_must_see_every_batch_once(tmp_path):
    path = write_spec(tmp_path, TINY.replace("seeds: 2", "seeds: 2\nmetric: online_loss"), steps=500)
    with pytest.raises(SpecError, match=r"spec.yaml:12: metric: online_loss needs every training batch unseen, but "
                                        r"variant 'mha' trains 500 steps and its data holds 138 steps of unseen batches"):
        expand(*load_spec(path))
    expand(*load_spec(write_spec(tmp_path, TINY.replace("seeds: 2", "seeds: 2\nmetric: online_loss"), steps=138)))


def test_a_variant_on_other_data_needs_a_reference_of_its_own(tmp_path):
    other = TINY.replace("  mqa: {model.attention: mqa}", "  other: {data.vocab_size: 24}")
    message = spec_error(tmp_path, other)
    assert ("compare: variant 'other' and its reference 'mha' train on different data (vocab_size 24 vs 16)"
            in message) and "null to make it a reference of its own" in message
    plan = expand(*load_spec(write_spec(tmp_path, other + "compare: {other: null}\n"), []))
    assert {r.variant for r in plan.runs} == {"mha", "other"}
    longer = TINY.replace("  mqa: {model.attention: mqa}", "  mqa: {model.attention: mqa, train.seq_len: 16}")
    assert "train on different sequence length (seq_len 16 vs 32)" in spec_error(tmp_path, longer)


def test_the_shipped_synthetic_study_compares_each_window_with_its_own_task():
    spec, sources = load_spec(ROOT / "ablations" / "synthetic.yaml", [])
    pairs = {v: spec.reference_of(v) for v in spec.variants}
    assert pairs == {"mqar": None, "mqar_window": "mqar", "recall": None, "recall_window": "recall", "copying": None,
                     "copying_window": "copying", "induction": None, "induction_window": "induction"}


def test_a_batch_size_sweep_with_a_fixed_val_set_is_planned(tmp_path):
    text = TINY.replace("seeds: 2", "seeds: 2\nsweep: {train.batch_size: [4, 8]}").replace("eval_every: 5", "eval_every: 5, eval_sequences: 40")
    plan = expand(*load_spec(write_spec(tmp_path, text), []))
    assert len(plan.runs) == 8 and {r.config.train.val_sequences for r in plan.runs} == {40}


def test_bad_set_and_unknown_variant(tmp_path):
    assert "--set base.train.steps: expected KEY=VALUE" in spec_error(tmp_path, TINY, "base.train.steps")
    message = spec_error(tmp_path, TINY, "base.model.n_head=three")
    assert "--set base.model.n_head=three: variant 'mha': model.n_head: Input should be a valid integer" in message
    assert spec_error(tmp_path, TINY, "budget.steps=abc").startswith("--set budget.steps=abc: variant 'mha': budget.steps:")
    assert spec_error(tmp_path, TINY, "base.modle.n_layer=2") == "--set base.modle.n_layer=2: base.modle: unknown key"
    assert spec_error(tmp_path, TINY.replace("budget: {steps: STEPS}", "budget: {step: 3}")).endswith(
        "spec.yaml:7: variant 'mha': budget.step: unknown key")
    path = write_spec(tmp_path)
    result = run_cli(str(path), "--only", "gqa", "--dry-run")
    assert result.returncode == 2 and "--only gqa: no such variant; variants: mha, mqa" in result.stderr
    result = run_cli(str(path), "--set", "budget.steps=[", "--dry-run")
    assert result.returncode == 2 and "value is not valid YAML" in result.stderr and "Traceback" not in result.stderr


def test_missing_spec_file_and_yaml_is_read_safely(tmp_path):
    result = run_cli(str(tmp_path / "nope.yaml"), "--dry-run")
    assert result.returncode == 2 and "cannot read spec" in result.stderr
    unsafe = write_spec(tmp_path, TINY.replace("description: a tiny study for tests", "description: !!python/object/apply:os.system [echo hi]"))
    result = run_cli(str(unsafe), "--dry-run")
    assert result.returncode == 2 and "malformed YAML" in result.stderr


# -- expansion -------------------------------------------------------------------------------------


def test_expansion_counts_variants_times_sweep_times_seeds(tmp_path):
    path = write_spec(tmp_path, TINY + "sweep: {train.lr: [0.001, 0.003, 0.01]}\n")
    spec, sources = load_spec(path)
    plan = expand(spec, sources)
    assert len(plan.runs) == 2 * 3 * 2
    assert {r.sweep["train.lr"] for r in plan.runs} == {0.001, 0.003, 0.01}
    assert {r.config.train.lr for r in plan.runs} == {0.001, 0.003, 0.01}
    assert len({r.run_id for r in plan.runs}) == 12
    only = expand(spec, sources, only=["mqa"], seeds=[5])
    assert [(r.variant, r.seed) for r in only.runs] == [("mqa", 5)] * 3


def test_extends_merges_and_a_new_component_name_replaces_options(tmp_path):
    write_spec(tmp_path, TINY.replace("mha: {}", "mha: {model.attention: {name: window, window: 8}}"), name="parent.yaml")
    child = write_spec(tmp_path, """\
        extends: parent.yaml
        name: child
        base:
          train: {batch_size: 8}
        variants:
          mha: {}
          gqa: {model.attention: {name: gqa, n_kv_head: 1}}
        seeds: [3]
        """)
    spec, sources = load_spec(child)
    plan = expand(spec, sources)
    assert spec.name == "child" and list(spec.variants) == ["mha", "gqa"] and spec.baseline == "mha"
    assert all(r.config.train.batch_size == 8 and r.config.train.seq_len == 32 for r in plan.runs)
    mha, gqa = plan.runs
    assert mha.config.model.attention["name"] == "window" and mha.config.model.attention["window"] == 8
    assert gqa.config.model.attention["window"] is None  # gqa replaced window: its options did not carry over


def test_a_value_change_makes_a_new_run(tmp_path):
    spec, sources = load_spec(write_spec(tmp_path))
    same = {r.run_id for r in expand(spec, sources).runs}
    assert same == {r.run_id for r in expand(*load_spec(write_spec(tmp_path))).runs}
    other = {r.run_id for r in expand(*load_spec(write_spec(tmp_path), ["base.train.lr=0.002"])).runs}
    assert same.isdisjoint(other)


# -- running ---------------------------------------------------------------------------------------


def test_dry_run_trains_nothing(tmp_path):
    result = run_cli(str(write_spec(tmp_path)), "--dry-run", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "tiny: 4 runs" in result.stdout and "nothing was trained" in result.stdout
    assert not (tmp_path / "out").exists()
    adaptive = run_cli(str(write_spec(tmp_path, TINY.replace("seeds: 2", "seeds: {min: 2, max: 5}"))), "--dry-run")
    assert "tiny: 4 runs" in adaptive.stdout  # the first two seeds of each variant
    assert "up to 5: at most 6 more runs" in adaptive.stdout


def test_a_failing_report_keeps_the_runs_and_says_how_to_retry(tmp_path, monkeypatch, capsys):
    def broken(folders):
        raise OSError("disk full")

    monkeypatch.setattr(bench.run, "write_report", broken)
    out = tmp_path / "out"
    assert main([str(write_spec(tmp_path, steps=2)), "--out", str(out), "--only", "mha", "--seeds", "0"]) == 1
    err = capsys.readouterr().err
    assert "the report could not be written (OSError: disk full)" in err
    assert f"python -m bench.report {out}" in err and "Traceback" not in err
    assert list(load(out).runs["status"]) == ["finished"]  # the trained run is kept: rerunning skips it


def test_end_to_end_tiny_study_writes_the_store_and_prints_the_summary(tmp_path, capsys):
    spec = write_spec(tmp_path, TINY.replace("  mqa: {model.attention: mqa}\n",
                                             "  mqa: {model.attention: mqa}\n  int8: {model.quantization: int8_weight_only}\n"))
    assert main([str(spec), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "Noise floor: the baseline's val loss varies across seeds" in out and "(baseline)" in out
    assert re.search(r"- (mqa is (better|worse) than mha|mqa is equivalent to mha|mqa vs mha is inconclusive)", out)
    # a quantized variant is tested against its own float checkpoint, evaluated the same way
    assert re.search(r"int8 (is|vs) .*int8 \(float\)", out) and "paired t over 2 seeds" in out
    results = load(tmp_path / "out")
    runs = results.runs
    assert len(runs) == 6 and set(runs["status"]) == {"finished"}
    for column in ("run_id", "variant", "seed", "status", "val_loss", "params", "flops_per_token", "tokens_per_s"):
        assert runs[column].notna().all() or column == "tokens_per_s"
    trained = runs[runs["kind"] == "train"]
    assert trained["tokens_per_s"].notna().all() and len(trained) == 4  # int8 reused mha's trained runs
    quantized = runs[runs["kind"] == "quantize"]
    assert (quantized["model_bytes"] < quantized["model_bytes_float"]).all()
    assert set(quantized["parent_id"]) == set(trained[trained["variant"] == "mha"]["run_id"])
    assert len(results.metrics[results.metrics["run_id"] == trained["run_id"].iloc[0]]) == 10
    assert trained["git_commit"].notna().all() and trained["machine_id"].notna().all()
    assert (tmp_path / "out" / "runs" / trained["run_id"].iloc[0] / "checkpoint.pt").exists()


ADAPTIVE = TINY.replace("  mqa: {model.attention: mqa}\n", """\
  twin: {model.attention: {name: gqa, n_kv_head: 2}}
  near: {train.lr: 1.0001e-3}
  noisy: {model.dropout: 0.2}
""").replace("seeds: 2", "seeds: {min: 2, max: 3}")


def test_adaptive_seeds_go_only_to_inconclusive_comparisons(tmp_path, capsys):
    # near moves the learning rate by 0.01%: differences of ~1e-5 with a spread, equivalent at once;
    # twin computes exactly what mha computes (the same weights, kv heads = heads): differences of 0,
    # zero variance, no test; noisy (dropout) differs by seed-dependent amounts: undecided at two seeds
    spec = write_spec(tmp_path, ADAPTIVE)
    assert main([str(spec), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert ("seed 2: 2 comparison(s) still inconclusive (noisy vs mha, twin vs mha): training seed 2 of mha, twin, "
            "noisy") in out
    runs = load(tmp_path / "out").runs
    assert len(runs) == 11 and set(runs["status"]) == {"finished"}
    assert {v: sorted(g["seed"]) for v, g in runs.groupby("variant")} == {
        "mha": [0, 1, 2], "noisy": [0, 1, 2], "twin": [0, 1, 2], "near": [0, 1]}
    twin = runs[runs["variant"] == "twin"].set_index("seed")["val_loss"]
    assert (twin == runs[runs["variant"] == "mha"].set_index("seed")["val_loss"]).all()
    assert "near is equivalent to mha" in out  # decided at two seeds: no third
    assert "twin vs mha is inconclusive: every one of the 3 seeds moved by exactly +0" in out
    # a rerun trains nothing and reaches the same verdicts
    assert main([str(spec), "--out", str(tmp_path / "out")]) == 0
    assert "0 already done" not in capsys.readouterr().out and len(load(tmp_path / "out").runs) == 11
    # --seeds fixes the seeds: no adaptive rounds
    assert main([str(spec), "--out", str(tmp_path / "fixed"), "--seeds", "0", "1"]) == 0
    assert len(load(tmp_path / "fixed").runs) == 8


def test_runs_of_an_edited_spec_are_not_compared_with_the_new_ones(tmp_path):
    spec = write_spec(tmp_path, steps=2)
    assert main([str(spec), "--out", str(tmp_path / "out")]) == 0
    spec = write_spec(tmp_path, steps=3)  # another budget: a new plan
    assert main([str(spec), "--out", str(tmp_path / "out"), "--only", "mha"]) == 0
    runs = load(tmp_path / "out").runs
    current = runs[runs["current"]]
    assert len(runs) == 6 and sorted(current["variant"]) == ["mha", "mha"] and set(current["steps"]) == {3}
    assert main([str(spec), "--out", str(tmp_path / "out")]) == 0
    summary = bench.run.current_summary(load(tmp_path / "out"), load_spec(spec)[0].design)
    (comparison,) = summary.comparisons
    assert comparison.n == 2 and comparison.seeds == [0, 1]  # not four seeds from two budgets
    current = load(tmp_path / "out").runs.query("current")
    assert len(current) == 4 and set(current["steps"]) == {3}


def test_rerun_skips_finished_runs_and_a_failed_run_is_recorded(tmp_path):
    plugin = tmp_path / "broken_attention.py"
    plugin.write_text(textwrap.dedent("""\
        from models import register
        from models.attention import Attention

        @register("attention", "broken")
        class Broken(Attention):
            '''Fails at the first forward pass.'''
            def forward(self, *args, **kwargs):
                raise RuntimeError("this attention is broken")
        """))
    spec = write_spec(tmp_path, TINY.replace("  mqa: {model.attention: mqa}", "  broken: {model.attention: broken}")
                      + "plugins: [broken_attention]\n")
    out = tmp_path / "out"
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    first = run_cli(str(spec), "--out", str(out), env=env)
    assert first.returncode == 1 and "this attention is broken" in first.stdout
    runs = load(out).runs.set_index("variant")
    assert set(runs.loc["mha", "status"]) == {"finished"}
    assert set(runs.loc["broken", "status"]) == {"failed"}
    assert all("RuntimeError: this attention is broken" in r for r in runs.loc["broken", "reason"])
    finished_at = load(out).runs.set_index("run_id")["finished_at"]
    second = run_cli(str(spec), "--out", str(out), env=env)
    assert "4 runs, 2 already done" in second.stdout
    again = load(out).runs.set_index("run_id")
    for run_id, row in again.iterrows():
        if row["variant"] == "mha":
            assert row["finished_at"] == finished_at[run_id] and row["attempts"] == 1  # not retrained
        else:
            assert row["attempts"] == 2  # failed runs are retried


def _runs(folder: Path) -> list[tuple]:
    """The store's runs; none while the runner has created the file but not yet its tables."""
    db = sqlite3.connect(folder / "results.db")
    try:
        return db.execute("SELECT run_id, status, attempts FROM runs").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def test_sigkill_mid_sweep_then_rerun_finishes_every_run_exactly_once(tmp_path):
    spec = write_spec(tmp_path, steps=40)
    out = tmp_path / "out"
    # dies as a SIGKILL would once one run finished and another is past its checkpoint at step 10
    died = subprocess.run([sys.executable, str(ROOT / "tests" / "dying_runner.py"), "13", str(spec), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert died.returncode == 9, died.stdout[-2000:] + died.stderr[-2000:]
    before = {r[0]: r for r in _runs(out)}
    killed = [run_id for run_id, r in before.items() if r[1] == "running"]
    assert len(killed) == 1 and any(r[1] == "finished" for r in before.values())
    result = run_cli(str(spec), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    after = {r[0]: r for r in _runs(out)}
    assert len(after) == 4 and {r[1] for r in after.values()} == {"finished"}
    for run_id, (_, status, attempts) in after.items():
        assert attempts == (2 if run_id in killed else 1)  # finished runs were not retrained
    killed_metrics = load(out).metrics.query("run_id == @killed[0]")
    assert list(killed_metrics["step"]) == list(range(1, 41))  # resumed: each step recorded once


def test_two_runners_on_one_folder_share_the_work_without_corrupting_it(tmp_path):
    spec = write_spec(tmp_path, steps=15)
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "bench.run", str(spec), "--out", str(out), *extra], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra in ([], ["--workers", "2"])]
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stdout + stderr
    db = sqlite3.connect(out / "results.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    rows = _runs(out)
    assert len(rows) == 4 and {r[1] for r in rows} == {"finished"}
    assert all(r[2] == 1 for r in rows)  # every run trained by exactly one of them, once
    metrics = load(out).metrics
    assert len(metrics) == 4 * 15 and not metrics.duplicated(["run_id", "step"]).any()


NO_NETWORK = """\
import socket

def _refuse(*args, **kwargs):
    raise OSError("the network is off in this test")

socket.socket.connect = socket.socket.connect_ex = socket.create_connection = _refuse
"""


@pytest.fixture(scope="module")
def offline(tmp_path_factory) -> tuple[dict, Path]:
    """Environment for a process with no network and an empty data cache (hardware peaks, measured once
    by the first dry run, are shared: they are not data)."""
    root = tmp_path_factory.mktemp("offline")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(NO_NETWORK)
    env = {"ARCHBENCH_CACHE": str(root / "cache"), "TIKTOKEN_CACHE_DIR": str(root / "tiktoken"),
           "PYTHONPATH": f"{root / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return env, root


@pytest.mark.parametrize("spec", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_spec_passes_dry_run_offline_with_an_empty_cache(spec, tmp_path, offline):
    """A dry run plans from the specs alone: no download, no tokenizing, no data in the cache."""
    env, root = offline
    result = run_cli(str(spec), "--dry-run", "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 0, result.stderr
    assert "nothing was trained or downloaded" in result.stdout
    if "dtype:" not in spec.read_text():  # auto: the run table says what was picked and why
        assert "dtype: auto on" in result.stdout and "speed-up threshold for bf16" in result.stdout
    written = {p.relative_to(root).parts[:2] for p in root.rglob("*") if p.is_file()}
    assert written <= {("site", "sitecustomize.py"), ("cache", "hardware")}  # no data, tokens, tokenizers
    if "source: shakespeare" in spec.read_text():
        assert "preparing the data will download tiny Shakespeare" in result.stdout
        assert "vocab_size: determined when the data is prepared" in result.stdout
        assert "after data" in result.stdout


def test_the_network_is_really_off_in_the_dry_run_test(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(NO_NETWORK)
    code = "import urllib.request; urllib.request.urlopen('http://example.com', timeout=5)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0 and "the network is off in this test" in result.stderr


def test_the_default_ablation_is_shipped():
    assert (ROOT / "ablations" / "attention.yaml") in SHIPPED
    assert "python -m bench.run ablations/attention.yaml" in (ROOT / "README.md").read_text()


def test_the_readmes_example_spec_is_valid(tmp_path):
    text = re.search(r"```yaml\n(name: attention\n.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    spec, sources = load_spec(write_spec(tmp_path, text), [])
    tuning, plan = expand(spec, sources, tuning=True), expand(spec, sources)
    assert spec.compare == {"gqa_window": "gqa"} and len(tuning.runs) == 3 * 2 * 1  # variants × lr × tuning seeds
    assert {r.seed for r in tuning.runs} == {1000} and {r.role for r in tuning.runs} == {"tune"}
    assert len(plan.runs) == 3 * 2 and {r.seed for r in plan.runs} == {0, 1}  # variants × evaluation seeds


def test_a_specs_kernels_section_is_timed_and_stored_once_per_machine(tmp_path, capsys, monkeypatch):
    import bench.kernels
    from bench.kernels.timer import run_kernels

    given = []  # the kernel choices the timer was given: the study's recorded ones first
    monkeypatch.setattr(bench.kernels, "run_kernels", lambda spec, **kw: given.append(kw["kernels"].records())
                        or run_kernels(spec, **kw))
    kernels = ("kernels:\n  attention: {variants: [mha], backends: [math, sdpa, flash_attn], seq_lens: [32], batch: 1, "
               "n_head: 2, head_dim: 8}\n"
               "  min_time: 0.01\n")
    spec = write_spec(tmp_path, TINY + kernels, steps=2)
    out = tmp_path / "out"
    assert main([str(spec), "--out", str(out), "--only", "mha", "--seeds", "0"]) == 0
    recorded = load(out).runs["attention_choices"].iloc[0]
    assert recorded and given == [recorded]  # what the run chose is what `auto` replays when timed
    stored = load(out).kernels
    assert len(stored) == 3 and set(stored["study"]) == {"tiny"}
    assert set(stored["status"]) >= {"ok"} and stored["machine_id"].nunique() == 1
    assert main([str(spec), "--out", str(out), "--only", "mha", "--seeds", "0"]) == 0
    assert "already stored" in capsys.readouterr().out and len(load(out).kernels) == 3
    message = spec_error(tmp_path, TINY + "kernels:\n  attention: {seq_len: [32]}\n")
    assert "kernels.attention.seq_len: unknown key" in message


def test_a_claim_whose_pid_was_reused_is_abandoned():
    from bench.store.writer import _owner_alive, owner_id

    me = owner_id()  # this process holds the PID now
    assert _owner_alive(me, time.time())
    # a claim heard from last a day ago cannot belong to a process that started minutes ago
    assert not _owner_alive(me, time.time() - 86400)
    assert not _owner_alive("elsewhere:1", time.time() - 3600) and _owner_alive("elsewhere:1", time.time())


TANH_MLP = '''\
from torch import nn

from models import register


@register("mlp", "tanh")
class TanhMLP(nn.Module):
    """Linear, tanh, linear."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(self.c_fc(x).tanh())
'''


def test_a_plan_selects_variants_and_seeds_as_expand_plans_them(tmp_path):
    """One expansion per invocation: --only's variants and adaptive seeds' next seed are selected from the
    study's plan, each run (a quantized variant's float run included) as expand would plan it."""
    text = TINY.replace("  mqa: {model.attention: mqa}",
                        "  mqa: {model.attention: mqa}\n  int8: {model.quantization: int8_dynamic}")
    spec, sources = load_spec(write_spec(tmp_path, text + "sweep: {train.lr: [1.0e-3, 2.0e-3]}\n"))
    study = expand(spec, sources)

    def planned(plan) -> list[tuple]:
        return [(r.run_id, r.variant, r.sweep, r.seed, r.kind, r.parent_id, r.role, r.config) for r in plan.runs]

    for only, seeds in ((["int8"], [5]), (["mqa", "mha"], [3, 0]), (["int8", "mha"], None), (None, None)):
        assert planned(study.select(only, seeds)) == planned(expand(spec, sources, only=only, seeds=seeds)), only
    assert {r.variant for r in study.select(["int8"], [5]).runs} == {"int8", "int8 (float)"}  # its float run, for it
    with pytest.raises(SpecError, match="--only nope: no such variant; variants: mha, mqa, int8"):
        study.select(["nope"])


def test_editing_a_plugin_gives_the_runs_that_use_it_new_ids(tmp_path, monkeypatch):
    from models.registry import _REGISTRY

    (tmp_path / "tanh_mlp.py").write_text(TANH_MLP)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(_REGISTRY["mlp"], "tanh", None)  # restored (removed) after the test
    del _REGISTRY["mlp"]["tanh"]
    spec = write_spec(tmp_path, TINY.replace("  mqa: {model.attention: mqa}", "  tanh: {model.mlp: tanh}")
                      + "plugins: [tanh_mlp]\n")

    def ids() -> dict[tuple[str, int], str]:
        plan = expand(*load_spec(spec, []))
        return {(r.variant, r.seed): r.run_id for r in plan.runs}

    before = ids()
    plan = expand(*load_spec(spec, []))
    tanh = next(r for r in plan.runs if r.variant == "tanh")
    assert list(tanh.config.plugins) == ["tanh_mlp"] and len(tanh.config.plugins["tanh_mlp"]) == 64
    assert next(r for r in plan.runs if r.variant == "mha").config.plugins == {}  # the baseline uses no plugin
    assert ids() == before  # the same code: the same runs, found again
    (tmp_path / "tanh_mlp.py").write_text(TANH_MLP.replace("Linear, tanh, linear.", "Linear, tanh, linear (edited)."))
    after = ids()
    assert after[("mha", 0)] == before[("mha", 0)] and after[("mha", 1)] == before[("mha", 1)]
    assert after[("tanh", 0)] != before[("tanh", 0)] and after[("tanh", 1)] != before[("tanh", 1)]


def test_a_run_refuses_a_plugin_edited_since_it_was_planned(tmp_path, monkeypatch):
    from bench.executor import run_claimed
    from bench.worker import read_config, write_config
    from models.registry import _REGISTRY

    (tmp_path / "tanh_mlp2.py").write_text(TANH_MLP.replace('"tanh"', '"tanh2"'))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(_REGISTRY["mlp"], "tanh2", None)
    del _REGISTRY["mlp"]["tanh2"]
    spec = write_spec(tmp_path, TINY.replace("  mqa: {model.attention: mqa}", "  tanh: {model.mlp: tanh2}")
                      + "plugins: [tanh_mlp2]\n")
    run = next(r for r in expand(*load_spec(spec, [])).runs if r.variant == "tanh")
    write_config(tmp_path, run.config)  # what its torchrun ranks and any executing process read back
    assert read_config(tmp_path) == run.config
    (tmp_path / "tanh_mlp2.py").write_text(TANH_MLP.replace('"tanh"', '"tanh2"') + "# edited\n")
    with pytest.raises(ValueError, match="plugin 'tanh_mlp2' changed since this run was planned"):
        read_config(tmp_path)
    outcome = run_claimed(run, tmp_path / "out", lambda event: None)  # as an executor executes it: failed, not trained
    assert outcome.status == "failed" and not (tmp_path / "out" / "runs" / run.run_id / "metrics.jsonl").exists()
    assert outcome.reason.startswith("ComponentError: plugin 'tanh_mlp2' changed since this run was planned")


def test_a_plugin_attention_that_cannot_rotate_is_refused_with_the_spec_line(tmp_path, monkeypatch):
    from models.registry import _REGISTRY

    (tmp_path / "linear_attention.py").write_text(textwrap.dedent('''\
        from torch import nn
        from models import register

        @register("attention", "linear_plugin")
        class LinearAttention(nn.Module):
            """Uses no positions."""
            handles = staticmethod(lambda config, options: frozenset())

            def __init__(self, config):
                super().__init__()
                self.c_proj = nn.Linear(config.n_embd, config.n_embd)

            def forward(self, x, positional, pos, cache=None):
                return self.c_proj(x)
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(_REGISTRY["attention"], "linear_plugin", None)
    del _REGISTRY["attention"]["linear_plugin"]
    text = TINY.replace("  mqa: {model.attention: mqa}", "  linear: {model.attention: linear_plugin, model.positional: rope}")
    message = spec_error(tmp_path, text + "plugins: [linear_attention]\n")
    assert "spec.yaml" in message and "variant 'linear'" in message
    assert "attention 'linear_plugin' does not rotate q and k by the positional encoding (rotate), needed by " \
           "positional 'rope'" in message


def test_tuning_chooses_each_setting_on_held_out_seeds_and_only_eval_runs_are_judged(tmp_path):
    import json

    from bench.report import summary_json

    # lr 1e6 diverges (a point with a diverged seed is not eligible); the choice is made on seed 1000
    text = TINY + "tune: {train.lr: [3.0e-3, 1.0e+6], tune_seeds: 1}\n"
    spec = write_spec(tmp_path, text.replace("device: cpu,", "device: cpu, diverge_above: 50,"), steps=6)
    out = tmp_path / "out"
    assert main([str(spec), "--out", str(out)]) == 0
    runs = load(out).runs
    tune, evals = runs[runs["role"] == "tune"], runs[runs["role"] == "eval"]
    assert set(tune["seed"]) == {1000} and len(tune) == 4  # 2 variants × 2 points × 1 tuning seed
    assert set(evals["seed"]) == {0, 1} and len(evals) == 4  # 2 variants × 2 eval seeds, at the chosen point
    assert set(tune[tune["sweep"].map(lambda p: p["train.lr"]) == 1e6]["status"]) == {"diverged"}
    assert all(p == {"train.lr": 3e-3} for p in evals["sweep"])
    (c,) = summary_json([out])["comparisons"]
    assert c["n"] == 2 and sorted(c["seeds"]) == [0, 1]  # tuning seeds never enter the verdict
    assert c["tuned"] == {"mqa": {"train.lr": 3e-3}, "mha": {"train.lr": 3e-3}}
    assert json.dumps(c)  # the JSON summary carries it
    html = (out / "report.html").read_text()
    assert "Tuning: sensitivity to the tuned setting" in html and "sensitivity to the tuned setting\"" in html
    assert "train.lr=1000000.0" in html  # the diverged point is listed (not eligible)
    # the same spec again: every run is found; nothing trains twice
    assert main([str(spec), "--out", str(out)]) == 0
    assert len(load(out).runs) == 8


def test_tune_seeds_must_be_held_out(tmp_path):
    message = spec_error(tmp_path, TINY + "tune: {train.lr: [1.0e-3, 2.0e-3], tune_seeds: [1, 7]}\n")
    assert "tune_seeds [1] are also evaluation seeds" in message
    assert "tune '" in spec_error(tmp_path, TINY + "tune: {train.lr: [1.0e-3]}\n")
    assert "not both" in spec_error(tmp_path, TINY + "tune: {train.lr: [1.0e-3, 2.0e-3]}\nsweep: {train.lr: [1.0e-3]}\n")


def test_a_tune_grid_per_variant_tunes_each_variant_over_its_own_values(tmp_path):
    # e.g. optimizers whose good learning rates lie an order of magnitude apart
    text = TINY + "tune: {train.lr: {mha: [1.0e-3, 2.0e-3], mqa: [1.0e-4, 2.0e-4, 4.0e-4]}, tune_seeds: 1}\n"
    spec, sources = load_spec(write_spec(tmp_path, text), [])
    plan = expand(spec, sources, tuning=True)
    grids = {v: sorted(r.config.train.lr for r in plan.runs if r.variant == v) for v in spec.variants}
    assert grids == {"mha": [1e-3, 2e-3], "mqa": [1e-4, 2e-4, 4e-4]}
    assert {r.seed for r in plan.runs} == {1000}
    missing = spec_error(tmp_path, TINY + "tune: {train.lr: {mha: [1.0e-3, 2.0e-3]}}\n")
    assert "tune 'train.lr' gives a grid per variant: no grid for mqa" in missing
    extra = spec_error(tmp_path, TINY + "tune: {train.lr: {mha: [1.0e-3, 2.0e-3], mqa: [1.0e-3, 2.0e-3], gqa: [1.0, 2.0]}}\n")
    assert "no variant named gqa" in extra
    assert "one such list per variant" in spec_error(tmp_path, TINY + "tune: {train.lr: {mha: [1.0e-3], mqa: [1.0e-3, 2.0e-3]}}\n")



LADDER = TINY.replace("""variants:
  mha: {}
  mqa: {model.attention: mqa}
""", """ladder:
  - gpt2: {}
  - rope: {model.positional: rope}
  - rmsnorm: {model.norm: rmsnorm}
""")


def test_a_ladder_climbs_each_step_on_the_one_before_and_compares_it_with_it(tmp_path):
    spec, sources = load_spec(write_spec(tmp_path, LADDER), [])
    assert spec.ladder == ["gpt2", "rope", "rmsnorm"] and spec.baseline == "gpt2"
    assert spec.variants["rmsnorm"] == {"model": {"positional": "rope", "norm": "rmsnorm"}}  # every change so far
    assert [spec.reference_of(v) for v in spec.ladder] == [None, "gpt2", "rope"]
    plan = expand(spec, sources)
    configs = {r.variant: r.config.model for r in plan.runs if r.seed == 0}
    assert configs["rmsnorm"].positional["name"] == "rope" and configs["rmsnorm"].norm["name"] == "rmsnorm"
    assert configs["rope"].norm["name"] == "layernorm" and configs["gpt2"].positional["name"] == "learned"
    assert "not both" in spec_error(tmp_path, LADDER + "variants: {x: {}}\n")
    assert "at least two steps" in spec_error(tmp_path, LADDER.replace("  - rope: {model.positional: rope}\n  - rmsnorm: {model.norm: rmsnorm}\n", ""))


def test_a_ladder_study_reports_each_steps_change_and_the_climb_from_the_first(tmp_path):
    out = tmp_path / "out"
    assert main([str(write_spec(tmp_path, LADDER, steps=6)), "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "Recipe ladder" in html and '="recipe ladder: each step\'s paired change"' in html  # the figure's label
    assert "vs the first step" in html and html.count("n = 2") >= 4  # two later steps × (step, cumulative)


def test_workers_auto_runs_the_measured_number_of_processes(tmp_path, capsys, monkeypatch):
    from bench import hardware, workers

    seen = []
    monkeypatch.setattr(workers, "workers_decision",
                        lambda run: seen.append(run) or {"workers": 2, "reason": "2×1 threads trains most here"})
    out = tmp_path / "out"
    assert main([str(write_spec(tmp_path, steps=3)), "--out", str(out), "--workers", "auto"]) == 0
    assert "workers: 2 (2×1 threads trains most here)" in capsys.readouterr().out
    assert seen[0].train.batch_size == 4  # measured on the plan's first training run
    runs = load(out).runs
    assert len(runs) == 4 and set(runs["threads"]) == {max(1, hardware.cpu_cores() // 2)}  # trained in 2 processes


def test_workers_must_be_a_positive_number_or_auto(tmp_path):
    result = run_cli(str(write_spec(tmp_path)), "--workers", "0", "--dry-run")
    assert result.returncode == 2 and "expected a positive number of processes or auto, got '0'" in result.stderr
    assert "Traceback" not in result.stderr
