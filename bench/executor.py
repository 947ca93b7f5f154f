"""Executors: run a plan's runs and write each outcome into the store.

``execute_run`` is the unit of work, whatever executes it: claim the run in the store, train it (or
evaluate a quantized variant of its float run), record the result. A run that fails records its
reason and the study goes on; a run claimed by another live runner is left to it and waited for.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import yaml

from bench.hardware import environment
from bench.plan import Plan, PlannedRun
from bench.posttrain import evaluate_quantized
from bench.store import Store, owner_id
from bench.train import budget_steps, train

Events = Callable[[dict], None]
HEARTBEAT_SECONDS = 30.0


class _Heartbeat(threading.Thread):
    """Tells the store every 30 s that this runner still holds the run (its own connection)."""

    def __init__(self, folder: Path, run_id: str, owner: str):
        super().__init__(daemon=True)
        self.folder, self.run_id, self.owner = folder, run_id, owner
        self.stopped = threading.Event()

    def run(self) -> None:
        store = Store(self.folder)
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            store.heartbeat(self.run_id, self.owner)
        store.close()


def execute_run(planned: PlannedRun, folder: Path, owner: str | None = None, events: Events | None = None) -> str:
    """Claim and execute one run; returns finished, diverged, failed, done (earlier) or held (by another)."""
    owner = owner or owner_id()
    events = events or (lambda e: None)
    store = Store(folder)
    try:
        claim = store.claim(planned.run_id, owner)
        if claim != "claimed":
            return claim
        run_dir = folder / "runs" / planned.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(planned.config.model_dump(mode="json"), sort_keys=False))
        total = budget_steps(planned.config) if planned.kind == "train" else 1
        events({"event": "start", "run_id": planned.run_id, "label": planned.label, "total": total})
        heartbeat = _Heartbeat(folder, planned.run_id, owner)
        heartbeat.start()
        result, reason = {}, None
        try:
            result = _execute(planned, folder, run_dir, store, events)
            status = result["status"]
            if status == "diverged":
                reason = f"diverged at step {result['diverged_at']}"
        except KeyboardInterrupt:
            store.release(planned.run_id, owner)
            raise
        except Exception as e:  # noqa: BLE001 - any failure is recorded with its reason; the study goes on
            status = "failed"
            oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
            reason = ("out of memory: " if oom else f"{type(e).__name__}: ") + str(e).splitlines()[0][:500]
            with open(run_dir / "log.txt", "a") as log:
                log.write(traceback.format_exc())
        finally:
            heartbeat.stopped.set()
        with open(run_dir / "log.txt", "a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {planned.label}: {status}" + (f" ({reason})" if reason else "") + "\n")
        steps_path = run_dir / "metrics.jsonl"
        steps = [json.loads(line) for line in steps_path.read_text().splitlines()] if steps_path.exists() else []
        store.finish(planned.run_id, status, result, reason, steps, environment())
        events({"event": "end", "run_id": planned.run_id, "status": status, "reason": reason,
                "val_loss": result.get("val_loss")})
        return status
    finally:
        store.close()


def _execute(planned: PlannedRun, folder: Path, run_dir: Path, store: Store, events: Events) -> dict:
    if planned.kind == "quantize":
        parent_status = store.status(planned.parent_id)
        if parent_status != "finished":
            raise RuntimeError(f"its float run {planned.parent_id} is {parent_status}, not finished")
        return evaluate_quantized(planned.config, folder / "runs" / planned.parent_id)

    def on_step(record: dict) -> None:
        events({"event": "step", "run_id": planned.run_id, "step": record["step"],
                "loss": record["train_loss"], "tokens_per_s": record["tokens_per_s"]})

    return train(planned.config, run_dir, on_step=on_step)


# -- the local executor ---------------------------------------------------------------------------


def _init_worker(threads: int, plugins: list[str]) -> None:
    from models import load_plugins

    torch.set_num_threads(threads)
    load_plugins(plugins)


def _worker(planned: PlannedRun, folder: Path, queue) -> str:
    return execute_run(planned, folder, events=queue.put)


class LocalExecutor:
    """Runs on this machine: in this process, or in `workers` processes sharing the store."""

    def __init__(self, workers: int = 1):
        self.workers = workers

    def execute(self, plan: Plan, folder: Path, events: Events) -> None:
        # float runs first: quantized variants evaluate their checkpoints
        for phase in (plan.train_runs, plan.quantize_runs):
            remaining = phase
            while remaining:
                outcomes = self._run_all(remaining, folder, events, plan.spec.plugins)
                remaining = [r for r in remaining if outcomes[r.run_id] == "held"]
                if remaining:  # another runner has them: wait for it (or for its claim to lapse)
                    time.sleep(2.0)

    def _run_all(self, runs: list[PlannedRun], folder: Path, events: Events, plugins: list[str]) -> dict[str, str]:
        if self.workers <= 1:
            return {r.run_id: execute_run(r, folder, events=events) for r in runs}
        context = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        with context.Manager() as manager:
            queue = manager.Queue()
            forward = threading.Thread(target=_forward, args=(queue, events), daemon=True)
            forward.start()
            with ProcessPoolExecutor(self.workers, mp_context=context, initializer=_init_worker,
                                     initargs=(threads, plugins)) as pool:
                futures = {r.run_id: pool.submit(_worker, r, folder, queue) for r in runs}
                outcomes = {run_id: f.result() for run_id, f in futures.items()}
            queue.put(None)
            forward.join()
        return outcomes


def _forward(queue, events: Events) -> None:
    while (event := queue.get()) is not None:
        events(event)


EXECUTORS = {"local": LocalExecutor}
