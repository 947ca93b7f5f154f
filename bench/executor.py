"""Executors: run a plan's runs and write each outcome into the store.

A run is claimed in the store, executed (``run_claimed``: trained, or a quantized variant of its float
run evaluated), and its outcome recorded (``record_outcome``). Locally and under torchrun one process
does all three (``execute_run``); on Ray the driver claims and records and the tasks only execute,
so the store has one writer per machine. A run that fails records its reason and the study goes on;
a run claimed by another live runner is left to it and waited for.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from bench import parallel
from bench.hardware import cpu_cores, environment
from bench.plan import Plan, PlannedRun
from bench.posttrain import evaluate_quantized
from bench.store import Store, owner_id
from bench.config import RunConfig, budget_steps
from bench.train import train
from models import load_plugins

Events = Callable[[dict], None]
HEARTBEAT_SECONDS = 30.0


class _Heartbeat(threading.Thread):
    """Tells the store every 30 s that this runner still holds its runs (its own connection)."""

    def __init__(self, folder: Path, run_ids: set[str], owner: str):
        super().__init__(daemon=True)
        self.folder, self.run_ids, self.owner = folder, run_ids, owner
        self.stopped = threading.Event()

    def run(self) -> None:
        store = Store(self.folder)
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            for run_id in list(self.run_ids):
                store.heartbeat(run_id, self.owner)
        store.close()


@dataclass
class Outcome:
    """What executing a run gave: its status, final metrics, reason (failed, diverged) and per-step records."""

    status: str
    result: dict = field(default_factory=dict)
    reason: str | None = None
    steps: list[dict] = field(default_factory=list)


def execute_run(planned: PlannedRun, folder: Path, owner: str | None = None, events: Events | None = None) -> str:
    """Claim and execute one run; returns finished, diverged, failed, done (earlier) or held (by another).

    Under torchrun (this process is one rank of several) rank 0 claims and records, and every rank
    trains. A run asking for several processes from a single process is launched with torchrun.
    """
    owner = owner or owner_id()
    events = events or (lambda e: None)
    world = parallel.world()
    store = Store(folder) if world.main else None
    try:
        claim = parallel.broadcast_object(store.claim(planned.run_id, owner) if store else None, world)
        if claim != "claimed":
            return claim
        if planned.kind == "quantize" and not world.main:
            return "done"  # rank 0 evaluates quantized variants alone
        heartbeat = _Heartbeat(folder, {planned.run_id}, owner) if store else None
        if heartbeat:
            heartbeat.start()
        try:
            outcome = run_claimed(planned, folder, events, _parent_status(store, planned))
        except KeyboardInterrupt:
            if store:
                store.release(planned.run_id, owner)
            raise
        finally:
            if heartbeat:
                heartbeat.stopped.set()
        return record_outcome(store, planned, outcome, events) if store else outcome.status
    finally:
        if store:
            store.close()


def _parent_status(store: Store | None, planned: PlannedRun) -> str | None:
    return store.status(planned.parent_id) if store and planned.kind == "quantize" else None


def run_claimed(planned: PlannedRun, folder: Path, events: Events, parent_status: str | None = None) -> Outcome:
    """Execute a run someone has claimed, writing only its own folder (runs/<id>/): never the store.
    Any failure becomes a failed outcome with its reason; the study goes on. The run's plugins are
    imported here, in whichever process or machine executes it, and must be the planned code."""
    main = parallel.world().main
    run_dir = folder / "runs" / planned.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(planned.config.model_dump(mode="json"), sort_keys=False))
        with open(run_dir / "log.txt", "a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {planned.label}: started by {owner_id()}\n")
        events({"event": "start", "run_id": planned.run_id, "label": planned.label,
                "total": budget_steps(planned.config) if planned.kind == "train" else 1})
    outcome = Outcome("failed")
    try:
        if planned.kind == "quantize" and parent_status != "finished":
            raise RuntimeError(f"its float run {planned.parent_id} is {parent_status}, not finished")
        load_plugins(planned.config.plugins)
        outcome.result = _execute(planned, folder, run_dir, events)
        outcome.status = outcome.result["status"]
        if outcome.status == "diverged":
            outcome.reason = f"diverged at step {outcome.result['diverged_at']}"
    except Exception as e:  # noqa: BLE001 - any failure is recorded with its reason; the study goes on
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        outcome.reason = ("out of memory: " if oom else f"{type(e).__name__}: ") + str(e).splitlines()[0][:500]
        with open(run_dir / "log.txt", "a") as log:
            log.write(traceback.format_exc())
    if main:
        with open(run_dir / "log.txt", "a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {planned.label}: {outcome.status}"
                      + (f" ({outcome.reason})" if outcome.reason else "") + "\n")
        steps_path = run_dir / "metrics.jsonl"
        outcome.steps = [json.loads(line) for line in steps_path.read_text().splitlines()] if steps_path.exists() else []
    return outcome


def record_outcome(store: Store, planned: PlannedRun, outcome: Outcome, events: Events) -> str:
    """Write a run's outcome into the store (its one writer for this run) and announce the end."""
    store.finish(planned.run_id, outcome.status, outcome.result, outcome.reason, outcome.steps, environment())
    events({"event": "end", "run_id": planned.run_id, "status": outcome.status, "reason": outcome.reason,
            "val_loss": outcome.result.get("val_loss")})
    return outcome.status


def _execute(planned: PlannedRun, folder: Path, run_dir: Path, events: Events) -> dict:
    if planned.kind == "quantize":
        return evaluate_quantized(planned.config, folder / "runs" / planned.parent_id)

    def on_step(record: dict) -> None:
        events({"event": "step", "run_id": planned.run_id, "step": record["step"],
                "loss": record["train_loss"], "tokens_per_s": record["tokens_per_s"]})

    distributed = planned.config.train.distributed
    if distributed and distributed.nproc > 1 and parallel.world().size == 1:
        return launch_torchrun(planned.config, run_dir, on_step)
    return train(planned.config, run_dir, on_step=on_step)


def launch_torchrun(config: RunConfig, run_dir: Path, on_step: Callable[[dict], None] | None = None) -> dict:
    """Run one training run on its train.distributed.nproc processes with torchrun; follow its metrics
    for progress; return its final metrics. The workers read the run (its plugins included) from run.json."""
    (run_dir / "run.json").write_text(config.model_dump_json())
    (run_dir / "final.json").unlink(missing_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={config.train.distributed.nproc}", "-m", "bench.worker", str(run_dir)]
    metrics, offset = run_dir / "metrics.jsonl", 0
    with open(run_dir / "torchrun.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            time.sleep(1.0)
            if on_step:
                offset = _follow(metrics, offset, on_step)
    if process.returncode != 0 or not (run_dir / "final.json").exists():
        tail = (run_dir / "torchrun.log").read_text().splitlines()
        errors = [line for line in tail if "Error" in line or "error:" in line] or tail[-3:]
        raise RuntimeError(f"torchrun exited with {process.returncode}: {errors[-1].strip() if errors else ''} "
                           f"(see {run_dir / 'torchrun.log'})")
    return json.loads((run_dir / "final.json").read_text())


def _follow(path: Path, offset: int, on_step: Callable[[dict], None]) -> int:
    """Hand on_step each complete record appended to path since byte `offset`; returns the new offset."""
    if not path.exists():
        return offset
    if path.stat().st_size < offset:  # a resuming run cut the records after its checkpoint
        offset = 0
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next look
    for line in complete.splitlines():
        on_step(json.loads(line))
    return offset + len(complete)


# -- the local executor ---------------------------------------------------------------------------


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker(planned: PlannedRun, folder: Path, queue) -> str:
    return execute_run(planned, folder, events=queue.put)


class ExecutorUnavailable(RuntimeError):
    """The chosen executor cannot run here (a missing package, an unreachable cluster); says why."""


def in_phases(plan: Plan, run_batch: Callable[[list[PlannedRun]], dict[str, str]]) -> None:
    """Float runs first (quantized variants evaluate their checkpoints); `run_batch` returns each run's
    outcome, and runs another runner holds are retried until it records them or its claim lapses."""
    for phase in (plan.train_runs, plan.quantize_runs):
        remaining = phase
        while remaining:
            outcomes = run_batch(remaining)
            remaining = [r for r in remaining if outcomes[r.run_id] == "held"]
            if remaining:
                time.sleep(2.0)


class LocalExecutor:
    """Runs on this machine: in this process, or in `workers` processes sharing the store."""

    def __init__(self, workers: int = 1, address: str | None = None):
        if address:
            raise ExecutorUnavailable("--ray-address goes with --executor ray")
        self.workers = workers

    def execute(self, plan: Plan, folder: Path, events: Events) -> None:
        in_phases(plan, lambda runs: self._run_all(runs, folder, events))

    def _run_all(self, runs: list[PlannedRun], folder: Path, events: Events) -> dict[str, str]:
        workers = min(self.workers, len(runs))  # fewer runs than workers: more threads for each
        if workers <= 1:
            return {r.run_id: execute_run(r, folder, events=events) for r in runs}
        context = multiprocessing.get_context("spawn")
        threads = max(1, cpu_cores() // workers)
        with context.Manager() as manager:
            queue = manager.Queue()
            forward = threading.Thread(target=_forward, args=(queue, events), daemon=True)
            forward.start()
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                     initargs=(threads,)) as pool:
                futures = {r.run_id: pool.submit(_worker, r, folder, queue) for r in runs}
                outcomes = {run_id: f.result() for run_id, f in futures.items()}
            queue.put(None)
            forward.join()
        return outcomes


def _forward(queue, events: Events) -> None:
    while (event := queue.get()) is not None:
        events(event)


# -- Ray: many runs on many machines ------------------------------------------------------------------


def _ray_execute(planned: PlannedRun, folder: str, queue, parent_status: str | None) -> Outcome:
    """A Ray task: one run, claimed by the driver. It writes only the run's folder (shared storage) and
    returns the outcome; the driver is the store's one writer. Retried by Ray if its worker dies, when
    it resumes from the run's last checkpoint."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))
    return run_claimed(planned, Path(folder), queue.put, parent_status)


class RayExecutor:
    """Each run is a Ray task with its resource needs (CPUs, GPUs); results go into the same store as
    the local executor's. Without --ray-address a local Ray instance is started on this machine; with
    one (auto, or HOST:PORT after `ray start`) the runs spread over the cluster. Only this driver
    touches the SQLite store (claims, heartbeats, results), so it may sit on the driver's local disk;
    the tasks write each run's folder (metrics, checkpoints), which the nodes must share at the same
    absolute path so that a retried task resumes wherever it lands."""

    MAX_RETRIES = 3

    def __init__(self, workers: int = 1, address: str | None = None):
        self.address = address

    def execute(self, plan: Plan, folder: Path, events: Events) -> None:
        try:
            import ray
            from ray.util.queue import Queue
        except ImportError:
            raise ExecutorUnavailable("--executor ray needs ray: pip install 'archbench[distributed]'") from None
        started = not ray.is_initialized()
        if started:
            try:
                ray.init(address=self.address, include_dashboard=False, logging_level="ERROR",
                         runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ExecutorUnavailable(f"could not reach a Ray cluster at {self.address}: {e}") from None
        gpus = ray.cluster_resources().get("GPU", 0)
        task = ray.remote(max_retries=self.MAX_RETRIES, retry_exceptions=False)(_ray_execute)
        queue = Queue()
        forward = threading.Thread(target=_forward, args=(queue, events), daemon=True)
        forward.start()
        store, owner, held_by_us = Store(folder), owner_id(), set()
        heartbeat = _Heartbeat(folder, held_by_us, owner)
        heartbeat.start()

        def run_batch(runs: list[PlannedRun]) -> dict[str, str]:
            outcomes = {r.run_id: store.claim(r.run_id, owner) for r in runs}
            claimed = [r for r in runs if outcomes[r.run_id] == "claimed"]
            held_by_us.update(r.run_id for r in claimed)
            refs = {r.run_id: task.options(**self.resources(r, gpus)).remote(
                        r, str(folder.resolve()), queue, _parent_status(store, r)) for r in claimed}
            for r in claimed:
                outcomes[r.run_id] = record_outcome(store, r, self._outcome(ray, refs[r.run_id]), events)
                held_by_us.discard(r.run_id)
            return outcomes

        try:
            in_phases(plan, run_batch)
        finally:
            for run_id in held_by_us:  # interrupted: hand back what was not recorded
                store.release(run_id, owner)
            heartbeat.stopped.set()
            store.close()
            queue.put(None)
            forward.join(timeout=10)
            if started:
                ray.shutdown()

    @staticmethod
    def resources(run: PlannedRun, cluster_gpus: float) -> dict:
        train = run.config.train
        processes = train.distributed.nproc if train.distributed else 1
        wants_gpu = train.device == "cuda" or (train.device == "auto" and cluster_gpus > 0)
        return {"num_cpus": processes * (train.threads or 1), "num_gpus": processes if wants_gpu else 0}

    def _outcome(self, ray, ref) -> Outcome:
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as e:  # the task failed more often than it may be retried
            return Outcome("failed", reason=f"Ray task failed after {self.MAX_RETRIES} retries: "
                                            f"{str(e).splitlines()[0][:300]}")


EXECUTORS = {"local": LocalExecutor, "ray": RayExecutor}
