"""Executors: run a plan's runs and write each outcome into the store.

An executor is anything with ``execute(plan, folder, events)`` (``Executor``), built as
``cls(workers=N, address=A)``; ``--executor`` picks one by its registered name (``register_executor``:
local, ray) or as ``module:Class``. Every executor follows the same rules, each a public function here:

- float runs first, then the quantized variants that evaluate their checkpoints, and runs another
  runner holds retried until it records them (``in_phases``);
- a run is claimed in the store before it executes (``Store.claim``; ``execute_run`` claims, executes
  and records in one call), and the claim is kept alive while it does (``Heartbeat``);
- it executes in whichever process or machine the executor chooses (``run_claimed``: trained, or a
  quantized variant of its float run evaluated, given its float run's status: ``parent_status``),
  writing only its own folder;
- its outcome is written into the store by the store's one writer on that machine (``record_outcome``).

A run that fails records its reason and the study goes on; a run claimed by another live runner is
left to it and waited for.
"""

from __future__ import annotations

import importlib
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
from typing import Protocol

import torch
from pydantic import ValidationError

from bench import parallel
from bench.config import RunConfig, budget_steps
from bench.hardware import cpu_cores, environment
from bench.plan import Plan, PlannedRun
from bench.posttrain import evaluate_quantized
from bench.store import Store, owner_id
from bench.train import train
from bench.worker import read_config, write_config

Events = Callable[[dict], None]
HEARTBEAT_SECONDS = 30.0


class Executor(Protocol):
    """What the runner needs of an executor: built as ``cls(workers=N, address=A)`` (--workers, and
    --ray-address or None), it executes each round's plan, writing every run's outcome into the store
    in `folder` and announcing progress through `events` (start, step, end: see ``run_claimed`` and
    ``record_outcome``). It follows the rules in this module's docstring by calling its functions."""

    def execute(self, plan: Plan, folder: Path, events: Events) -> None: ...


class ExecutorUnavailable(RuntimeError):
    """The chosen executor cannot run here (a missing package, an unreachable cluster); says why."""


EXECUTORS: dict[str, Callable[..., Executor]] = {}  # --executor NAME -> the executor's class


def register_executor(name: str):
    """Class decorator: make an executor selectable as ``--executor NAME``."""
    def register(cls):
        EXECUTORS[name] = cls
        return cls
    return register


def executor_class(name: str) -> Callable[..., Executor]:
    """The executor `name` selects: a registered name (``EXECUTORS``) or ``module:Class``; an
    ExecutorUnavailable says why not."""
    if name in EXECUTORS:
        return EXECUTORS[name]
    if ":" in name:
        module, _, attribute = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as e:
            raise ExecutorUnavailable(f"--executor {name}: {e}") from None
    raise ExecutorUnavailable(f"--executor {name}: no such executor; executors: {', '.join(sorted(EXECUTORS))} "
                              "(or module:Class)")


# -- the rules every executor follows ------------------------------------------------------------------


def in_phases(plan: Plan, run_batch: Callable[[list[PlannedRun]], dict[str, str]]) -> None:
    """Float runs first (quantized variants evaluate their checkpoints); `run_batch` executes runs and
    returns each one's outcome (``execute_run``'s words), and runs another runner holds are retried
    until it records them or its claim lapses."""
    for phase in (plan.train_runs, plan.quantize_runs):
        remaining = phase
        while remaining:
            outcomes = run_batch(remaining)
            remaining = [r for r in remaining if outcomes[r.run_id] == "held"]
            if remaining:
                time.sleep(2.0)


class Heartbeat(threading.Thread):
    """Tells the store every 30 s that this runner still holds its runs (its own connection); `run_ids`
    may change while it beats. Stop it with ``stopped.set()``."""

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
        heartbeat = Heartbeat(folder, {planned.run_id}, owner) if store else None
        if heartbeat:
            heartbeat.start()
        try:
            outcome = run_claimed(planned, folder, events, parent_status(store, planned))
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


def parent_status(store: Store | None, planned: PlannedRun) -> str | None:
    """A quantized variant's float run's status in the store (it evaluates only a finished one); None
    for a run that trains."""
    return store.status(planned.parent_id) if store and planned.kind == "quantize" else None


def run_claimed(planned: PlannedRun, folder: Path, events: Events, parent_status: str | None = None) -> Outcome:
    """Execute a run someone has claimed, writing only its own folder (runs/<id>/): never the store.
    Any failure becomes a failed outcome with its reason; the study goes on. The run executes the
    configuration its folder records (config.yaml, written here once per attempt): reading it back
    validates it, which imports its plugins in whichever process or machine executes it and refuses
    one edited since the run was planned."""
    main = parallel.world().main
    run_dir = folder / "runs" / planned.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        write_config(run_dir, planned.config)
        with open(run_dir / "log.txt", "a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {planned.label}: started by {owner_id()}\n")
        events({"event": "start", "run_id": planned.run_id, "label": planned.label,
                "total": budget_steps(planned.config) if planned.kind == "train" else 1})
    outcome = Outcome("failed")
    try:
        if planned.kind == "quantize" and parent_status != "finished":
            raise RuntimeError(f"its float run {planned.parent_id} is {parent_status}, not finished")
        config = read_config(run_dir) if main else planned.config  # the other ranks planned it themselves
        outcome.result = _execute(planned, config, folder, run_dir, events)
        outcome.status = outcome.result["status"]
        if outcome.status == "diverged":
            outcome.reason = f"diverged at step {outcome.result['diverged_at']}"
    except Exception as e:  # noqa: BLE001 - any failure is recorded with its reason; the study goes on
        if isinstance(e, ValidationError) and "error" in e.errors()[0].get("ctx", {}):
            e = e.errors()[0]["ctx"]["error"]  # e.g. a plugin edited since planning: the reason is the plugin's
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


def _execute(planned: PlannedRun, config: RunConfig, folder: Path, run_dir: Path, events: Events) -> dict:
    if planned.kind == "quantize":
        return evaluate_quantized(config, folder / "runs" / planned.parent_id)

    def on_step(record: dict) -> None:
        events({"event": "step", "run_id": planned.run_id, "step": record["step"],
                "loss": record["train_loss"], "tokens_per_s": record["tokens_per_s"]})

    distributed = config.train.distributed
    if distributed and distributed.nproc > 1 and parallel.world().size == 1:
        return launch_torchrun(config, run_dir, on_step)
    return train(config, run_dir, on_step=on_step)


def launch_torchrun(config: RunConfig, run_dir: Path, on_step: Callable[[dict], None] | None = None) -> dict:
    """Run one training run on its train.distributed.nproc processes with torchrun; follow its metrics
    for progress; return its final metrics. The ranks read the run (its plugins included) from its
    folder's config.yaml (``bench.worker.read_config``), which ``run_claimed`` wrote."""
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


@register_executor("local")
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
            forward = threading.Thread(target=forward_events, args=(queue, events), daemon=True)
            forward.start()
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                     initargs=(threads,)) as pool:
                futures = {r.run_id: pool.submit(_worker, r, folder, queue) for r in runs}
                outcomes = {run_id: f.result() for run_id, f in futures.items()}
            queue.put(None)
            forward.join()
        return outcomes


def forward_events(queue, events: Events) -> None:
    """Hand `events` what runs in other processes put on `queue` (their ``events``), until None."""
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


@register_executor("ray")
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
        forward = threading.Thread(target=forward_events, args=(queue, events), daemon=True)
        forward.start()
        store, owner, held_by_us = Store(folder), owner_id(), set()
        heartbeat = Heartbeat(folder, held_by_us, owner)
        heartbeat.start()

        def run_batch(runs: list[PlannedRun]) -> dict[str, str]:
            outcomes = {r.run_id: store.claim(r.run_id, owner) for r in runs}
            claimed = [r for r in runs if outcomes[r.run_id] == "claimed"]
            held_by_us.update(r.run_id for r in claimed)
            refs = {r.run_id: task.options(**self.resources(r, gpus)).remote(
                        r, str(folder.resolve()), queue, parent_status(store, r)) for r in claimed}
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

