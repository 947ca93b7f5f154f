"""Scale-out: one run on 2 processes (DDP, FSDP, DeepSpeed ZeRO-1/2/3) and many runs on Ray."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.results import load
from bench.config import resolve_run
from bench.worker import write_config
from tests.test_runner import ROOT, TINY, write_spec

MARKOV = {"source": "markov", "vocab_size": 16, "n_train_tokens": 20_000, "n_val_tokens": 4096, "doc_len": 256}
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
HAS_RAY = importlib.util.find_spec("ray") is not None
STRATEGIES = [
    ("ddp", {"strategy": "ddp", "nproc": 2}),
    ("fsdp", {"strategy": "fsdp", "nproc": 2}),
    *[pytest.param(f"zero{k}", {"strategy": "deepspeed", "zero_stage": k, "nproc": 2},
                   marks=pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")) for k in (1, 2, 3)],
]


def write_run(folder: Path, distributed: dict | None, steps: int = 20, checkpoint_every: int | None = None,
              **train) -> Path:
    run = resolve_run(dict(n_layer=2, n_head=2, n_embd=32), MARKOV,
                      dict(steps=steps, batch_size=8, micro_batch_size=2, seq_len=32, eval_every=10, device="cpu",
                           dtype="float32", checkpoint_every=checkpoint_every, distributed=distributed, **train))
    folder.mkdir(parents=True, exist_ok=True)
    write_config(folder, run)
    return folder


def torchrun(folder: Path, nproc: int, *program: str) -> tuple[int, str]:
    """Run `program` (default: bench.worker on `folder`) on `nproc` processes; (exit code, output)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *(program or ("-m", "bench.worker")), str(folder)]
    result = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    return result.returncode, result.stdout


def losses(folder: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    folder = write_run(tmp_path_factory.mktemp("single") / "run", None)
    subprocess.run([sys.executable, "-m", "bench.worker", str(folder)], cwd=ROOT, check=True, capture_output=True)
    return folder


@pytest.mark.parametrize("name,distributed", STRATEGIES)
def test_two_processes_follow_the_one_process_trajectory(one_process, tmp_path, name, distributed):
    folder = write_run(tmp_path / name, distributed)
    code, output = torchrun(folder, 2)
    assert code == 0, output[-3000:]
    single, multi = losses(one_process), losses(folder)
    assert len(multi) == 20
    for a, b in zip(single, multi):
        assert b == pytest.approx(a, rel=1e-4)
    final = json.loads((folder / "final.json").read_text())
    assert final["world_size"] == 2 and final["strategy"].startswith(name if name in ("ddp", "fsdp") else "deepspeed")
    assert final["val_loss"] == pytest.approx(json.loads((one_process / "final.json").read_text())["val_loss"], rel=1e-4)


OPTIMIZERS = {"muon": {"lr": 0.02, "optimizer": {"name": "muon", "adamw_lr": 3e-3}}, "lion": {"lr": 3e-4, "optimizer": "lion"}}
ZERO = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")


@pytest.fixture(scope="module")
def one_process_with(tmp_path_factory):
    """The one-process run per optimizer, trained once for the module."""
    done: dict[str, Path] = {}

    def run(optimizer: str) -> Path:
        if optimizer not in done:
            folder = write_run(tmp_path_factory.mktemp(optimizer) / "run", None, **OPTIMIZERS[optimizer])
            subprocess.run([sys.executable, "-m", "bench.worker", str(folder)], cwd=ROOT, check=True, capture_output=True)
            done[optimizer] = folder
        return done[optimizer]

    return run


@pytest.mark.parametrize("optimizer,name,distributed", [
    ("muon", "ddp", {"strategy": "ddp", "nproc": 2}),
    ("muon", "fsdp", {"strategy": "fsdp", "nproc": 2}),
    ("lion", "fsdp", {"strategy": "fsdp", "nproc": 2}),
    *[pytest.param("lion", f"zero{k}", {"strategy": "deepspeed", "zero_stage": k, "nproc": 2}, marks=ZERO) for k in (1, 2, 3)],
])
def test_muon_and_lion_on_two_processes_follow_their_one_process_trajectory(one_process_with, tmp_path, optimizer,
                                                                            name, distributed):
    folder = write_run(tmp_path / name, distributed, **OPTIMIZERS[optimizer])
    code, output = torchrun(folder, 2)
    assert code == 0, output[-3000:]
    single = losses(one_process_with(optimizer))
    assert losses(folder) == pytest.approx(single, rel=1e-4)
    assert losses(folder) != pytest.approx(losses(one_process_with("lion" if optimizer == "muon" else "muon")), rel=1e-2)


def torchrun_until_killed(folder: Path, nproc: int, at_step: int) -> None:
    """Run on `nproc` processes until rank 0 has written step `at_step`'s record, then lose it as a killed node."""
    code, output = torchrun(folder, nproc, str(ROOT / "tests" / "dying_worker.py"), str(at_step))
    assert code != 0, output[-3000:]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_checkpoint_from_two_processes_resumes_on_one(one_process, tmp_path, strategy):
    folder = write_run(tmp_path / strategy, {"strategy": strategy, "nproc": 2}, checkpoint_every=5)
    torchrun_until_killed(folder, 2, at_step=12)
    assert (folder / "checkpoint.pt").exists() and not (folder / "final.json").exists()
    resumed = write_run(folder, {"strategy": strategy, "nproc": 1}, checkpoint_every=5)  # same run, one process
    if strategy == "ddp":
        result = subprocess.run([sys.executable, "-m", "bench.worker", str(resumed)], cwd=ROOT, capture_output=True, text=True)
    else:
        code, output = torchrun(resumed, 1)
        result = subprocess.CompletedProcess([], code, output, "")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert json.loads((folder / "final.json").read_text())["resumed_from"] >= 10  # from a checkpoint, not from scratch
    assert losses(folder) == pytest.approx(losses(one_process), rel=1e-4)
    assert [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == list(range(1, 21))


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_a_deepspeed_checkpoint_says_why_it_cannot_resume_on_another_world_size(tmp_path):
    folder = write_run(tmp_path / "zero2", {"strategy": "deepspeed", "zero_stage": 2, "nproc": 2}, checkpoint_every=5)
    torchrun_until_killed(folder, 2, at_step=12)
    write_run(folder, {"strategy": "deepspeed", "zero_stage": 2, "nproc": 1}, checkpoint_every=5)
    code, output = torchrun(folder, 1)
    assert code != 0
    assert "was written by 2 processes" in output and "resume with nproc=2" in output


def test_a_two_process_study_writes_one_store_row_per_run(tmp_path):
    spec = write_spec(tmp_path, TINY.replace("device: cpu", "device: cpu, threads: 1"), steps=6)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "bench.run", str(spec), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    db = sqlite3.connect(out / "results.db")
    rows = db.execute("SELECT variant, status, attempts FROM runs").fetchall()
    steps = db.execute("SELECT run_id, COUNT(*) FROM metrics GROUP BY run_id").fetchall()
    db.close()
    assert len(rows) == 4 and {r[1] for r in rows} == {"finished"} and {r[2] for r in rows} == {1}
    assert {count for _, count in steps} == {6}  # each step recorded once, by rank 0
    runs = load(out).runs
    assert set(runs["world_size"]) == {2} and set(runs["strategy"]) == {"ddp"}
    assert result.stdout.count("Verdicts on val loss") == 1  # only rank 0 prints


def test_the_runner_launches_a_distributed_run_with_torchrun(tmp_path):
    spec = write_spec(tmp_path, TINY.replace("seeds: 2", "seeds: [0]").replace("  mqa: {model.attention: mqa}\n", ""),
                      steps=6)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "bench.run", str(spec), "--out", str(out),
                             "--set", "base.train.distributed={strategy: ddp, nproc: 2}", "--set", "base.train.threads=1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    runs = load(out).runs
    assert len(runs) == 1 and runs["status"].iloc[0] == "finished"
    assert runs["world_size"].iloc[0] == 2 and runs["strategy"].iloc[0] == "ddp"
    assert (out / "runs" / runs["run_id"].iloc[0] / "torchrun.log").exists()  # launched by the runner


RAY_SPEC = TINY.replace("device: cpu", "device: cpu, threads: 1")


@pytest.mark.skipif(not HAS_RAY, reason="ray is not installed")
def test_the_ray_executor_gives_the_local_executors_runs_and_metrics(tmp_path):
    spec = write_spec(tmp_path, RAY_SPEC, steps=8)
    for executor in ("local", "ray"):
        result = subprocess.run([sys.executable, "-m", "bench.run", str(spec), "--out", str(tmp_path / executor),
                                 "--executor", executor], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    local = load(tmp_path / "local").runs.set_index("run_id")
    ray = load(tmp_path / "ray").runs.set_index("run_id")
    assert set(local.index) == set(ray.index) and set(ray["status"]) == {"finished"}
    assert (ray["val_loss"] - local.loc[ray.index, "val_loss"]).abs().max() == 0.0


@pytest.mark.skipif(not HAS_RAY, reason="ray is not installed")
def test_a_killed_ray_worker_is_retried_resumes_and_finishes_once(tmp_path):
    spec = write_spec(tmp_path, RAY_SPEC.replace("seeds: 2", "seeds: [0]").replace("  mqa: {model.attention: mqa}\n", ""),
                      steps=400)
    out = tmp_path / "out"
    runner = subprocess.Popen([sys.executable, "-m", "bench.run", str(spec), "--out", str(out), "--executor", "ray"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and killed is None:
        time.sleep(0.2)
        if not (out / "results.db").exists():
            continue
        db = sqlite3.connect(out / "results.db")
        try:
            row = db.execute("SELECT run_id FROM runs WHERE status='running'").fetchone()
        except sqlite3.OperationalError:  # the runner has created the file, not yet its tables: not ready
            row = None
        finally:
            db.close()
        if row:
            metrics, log = out / "runs" / row[0] / "metrics.jsonl", out / "runs" / row[0] / "log.txt"
            if metrics.exists() and len(metrics.read_text().splitlines()) > 60:  # past the checkpoint at step 5·k
                worker = log.read_text().split("started by ")[1].split()[0]  # the Ray worker running the task
                killed = int(worker.rpartition(":")[2])
                os.kill(killed, signal.SIGKILL)
    output, _ = runner.communicate(timeout=600)
    assert killed is not None and runner.returncode == 0, output[-3000:]
    runs = load(out).runs
    assert len(runs) == 1 and runs["status"].iloc[0] == "finished"
    assert runs["resumed_from"].iloc[0] >= 60 - 5  # the retry resumed from a checkpoint, not from scratch
    assert (out / "runs" / runs["run_id"].iloc[0] / "log.txt").read_text().count("started by ") == 2
    steps = load(out).metrics["step"].tolist()
    assert steps == list(range(1, 401))  # every step recorded once
