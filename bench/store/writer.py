"""Writing the store: one SQLite database per results folder (WAL mode, writes in transactions).

Several runner processes, on one machine or on several sharing the folder, claim runs through the
store, so each run is trained once; a claim whose owner died is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from bench.store.schema import SCHEMA, migrate

DONE = ("finished", "diverged")  # a rerun does not train these again
STALE_SECONDS = 300.0  # a claim whose owner has not been heard from in this long is abandoned


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_started(pid: int) -> float | None:
    """When process `pid` started (Unix time), where /proc says; None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in clock ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_alive(owner: str | None, heartbeat: float | None) -> bool:
    """Whether the process that claimed a run still runs: on this host by its PID (a PID reused by a
    process that started after the owner's last heartbeat is not the owner); elsewhere by heartbeat."""
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except (ProcessLookupError, ValueError):
            return False
        except PermissionError:
            pass
        started = _process_started(int(pid))
        return started is None or heartbeat is None or started <= heartbeat + 1.0  # ticks are coarse
    return heartbeat is not None and time.time() - heartbeat < STALE_SECONDS


class Store:
    """A results folder's store, opened for writing: a runner's claims, heartbeats and outcomes, and the
    kernel and serving rows. ``bench.store.reader`` reads it back as DataFrames."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "results.db"
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self._use_wal()
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)  # idempotent; executescript manages its own transaction
        with self.transaction() as db:  # under the write lock: two runners opening a new store migrate it once
            migrate(db)

    def _use_wal(self) -> None:
        """Switch to WAL (a persistent mode of the file). The switch takes its lock without waiting on the
        busy timeout, so a runner opening a new store while another switches it retries until it can."""
        deadline = time.monotonic() + 60
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: take the write lock up front, so concurrent writers queue instead of failing."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- studies and runs ---------------------------------------------------------------------

    def record_study(self, name: str, spec: dict, command: str, plan: str | None = None) -> None:
        """The spec as run, its command, and the identity of its plan (what its runs are compared on)."""
        with self.transaction() as db:
            db.execute("INSERT INTO studies (name, spec, command, updated_at, plan) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT(name) DO UPDATE SET spec=excluded.spec, command=excluded.command, "
                       "updated_at=excluded.updated_at, plan=excluded.plan",
                       (name, json.dumps(spec, default=str), command, time.time(), plan))

    def add_runs(self, study: str, runs: Iterable, plan: str | None = None) -> None:
        """Register planned runs (as part of `plan`); runs already in the store keep their status and results."""
        with self.transaction() as db:
            for r in runs:
                db.execute(
                    "INSERT INTO runs (run_id, study, variant, sweep, seed, kind, role, parent_id, config) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE SET variant=excluded.variant, "
                    "role=excluded.role",
                    (r.run_id, study, r.variant, json.dumps(r.sweep, default=str), r.seed, r.kind, r.role, r.parent_id,
                     r.config.model_dump_json()),
                )
                if plan:
                    db.execute("INSERT OR IGNORE INTO planned VALUES (?, ?, ?)", (study, plan, r.run_id))

    def status(self, run_id: str) -> str | None:
        row = self.db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return row["status"] if row else None

    def claim(self, run_id: str, owner: str) -> str:
        """Take a run to execute. Returns 'claimed', 'done' (finished before) or 'held' (another live runner)."""
        with self.transaction() as db:
            row = db.execute("SELECT status, owner, heartbeat FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row["status"] in DONE:
                return "done"
            if row["status"] == "running" and row["owner"] != owner and _owner_alive(row["owner"], row["heartbeat"]):
                return "held"
            db.execute("UPDATE runs SET status='running', owner=?, heartbeat=?, started_at=?, attempts=attempts+1, "
                       "reason=NULL WHERE run_id=?", (owner, time.time(), time.time(), run_id))
            return "claimed"

    def heartbeat(self, run_id: str, owner: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE runs SET heartbeat=? WHERE run_id=? AND owner=?", (time.time(), run_id, owner))

    def finish(self, run_id: str, status: str, metrics: dict[str, Any], reason: str | None,
               steps: list[dict], environment: dict[str, Any]) -> None:
        """Record a run's outcome and its per-step metrics in one transaction."""
        with self.transaction() as db:
            db.execute("DELETE FROM metrics WHERE run_id=?", (run_id,))
            db.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?)",  # a step may be re-recorded
                           [(run_id, s["step"], json.dumps(s)) for s in steps])
            db.execute(
                "UPDATE runs SET status=?, reason=?, metrics=?, finished_at=?, owner=NULL, machine_id=?, hardware=?, "
                "libraries=?, git_commit=? WHERE run_id=?",
                (status, reason, json.dumps(metrics, default=str), time.time(), environment.get("machine_id"),
                 json.dumps(environment.get("hardware")), json.dumps(environment.get("libraries")),
                 environment.get("git_commit"), run_id),
            )

    def release(self, run_id: str, owner: str) -> None:
        """Give a claimed run back unfinished (interrupted): the next runner resumes it."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET status='interrupted', owner=NULL WHERE run_id=? AND owner=?", (run_id, owner))

    def finished_mfus(self, machine_id: str) -> list[float]:
        """The MFU of every run that finished on `machine_id` and recorded one (nonzero); order not defined."""
        mfus = []
        for row in self.db.execute("SELECT metrics FROM runs WHERE status='finished' AND machine_id=?", (machine_id,)):
            mfu = json.loads(row["metrics"] or "{}").get("mfu")
            if mfu:
                mfus.append(mfu)
        return mfus

    # -- kernels ------------------------------------------------------------------------------

    def kernel_spec_hashes(self, study: str, machine_id: str) -> set[str]:
        """The ``spec_hash`` of every kernel row stored for `study` on `machine_id`: which kernels sections
        (their hash) this machine has timed already."""
        rows = self.db.execute("SELECT data FROM kernels WHERE study=? AND machine_id=?", (study, machine_id))
        return {h for row in rows if (h := json.loads(row["data"]).get("spec_hash")) is not None}

    def add_kernels(self, study: str | None, rows: Iterable[dict], environment: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO kernels (study, machine_id, hardware, data, recorded_at) VALUES (?, ?, ?, ?, ?)",
                [(study, environment.get("machine_id"), json.dumps(environment.get("hardware")),
                  json.dumps(row, default=str), time.time()) for row in rows],
            )

    # -- serving ------------------------------------------------------------------------------

    def serving_measured(self, study: str, machine_id: str, key: str) -> bool:
        """Whether serving rows with these settings (their key) are stored for `study` on `machine_id`."""
        rows = self.db.execute("SELECT data FROM serving WHERE study=? AND machine_id=?", (study, machine_id))
        return any(json.loads(row["data"]).get("settings_key") == key for row in rows)

    def add_serving(self, study: str, run_id: str, variant: str, rows: Iterable[dict], environment: dict[str, Any]) -> None:
        """One row per offered request rate of a run (or, with ``bench.serve bench --target``, an external
        server: `run_id` None) served under load; each row's JSON holds the load generator's keys, its
        sweep's id and saturation point (``bench.serve.sweep``)."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO serving (study, run_id, variant, machine_id, hardware, data, recorded_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(study, run_id, variant, environment.get("machine_id"), json.dumps(environment.get("hardware")),
                  json.dumps(row, default=str), time.time()) for row in rows],
            )
