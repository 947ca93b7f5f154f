"""The store's tables, and the columns a store written by an older version gains when it is opened.

``studies``: the spec as run (JSON), the command that ran it and the identity of its current plan.
``runs``: resolved config and hash, role — ``tune`` for runs that choose a variant's setting on tuning
seeds, ``eval`` for those that enter verdicts — status, final metrics, hardware fingerprint, git
commit, library versions. ``planned``: which runs each plan of a study holds (runs of an edited
spec's old plan stay in the store but are not compared with the new ones). ``metrics``: one row per
run and step. ``kernels``: kernel timings. ``serving``: a run served under load, one row per
offered request rate (``python -m bench.serve bench``), its measurements as JSON in ``data`` (new keys
need no column; ``bench.store.reader`` reads rows of the closed-loop generator before it in the new
keys' terms).
"""

from __future__ import annotations

import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, command TEXT, updated_at REAL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    study TEXT NOT NULL,
    variant TEXT NOT NULL,
    sweep TEXT NOT NULL,
    seed INTEGER NOT NULL,
    kind TEXT NOT NULL,
    role TEXT NOT NULL DEFAULT 'eval',
    parent_id TEXT,
    config TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    reason TEXT,
    metrics TEXT,
    owner TEXT,
    heartbeat REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    finished_at REAL,
    machine_id TEXT,
    hardware TEXT,
    libraries TEXT,
    git_commit TEXT
);
CREATE TABLE IF NOT EXISTS planned (
    study TEXT NOT NULL, plan TEXT NOT NULL, run_id TEXT NOT NULL, PRIMARY KEY (study, plan, run_id)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS kernels (
    id INTEGER PRIMARY KEY AUTOINCREMENT, study TEXT, machine_id TEXT, hardware TEXT, data TEXT NOT NULL,
    recorded_at REAL
);
CREATE TABLE IF NOT EXISTS serving (
    id INTEGER PRIMARY KEY AUTOINCREMENT, study TEXT, run_id TEXT, variant TEXT, machine_id TEXT, hardware TEXT,
    data TEXT NOT NULL, recorded_at REAL
);
"""


def columns(db: sqlite3.Connection, table: str) -> set[str]:
    """The names of a table's columns (none where the table does not exist)."""
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def tables(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def migrate(db: sqlite3.Connection) -> None:
    """Add the columns a store written before them lacks; call under the write lock, so that two runners
    opening one store migrate it once."""
    if "plan" not in columns(db, "studies"):  # before plans were recorded
        db.execute("ALTER TABLE studies ADD COLUMN plan TEXT")
    if "role" not in columns(db, "runs"):  # before tuning
        db.execute("ALTER TABLE runs ADD COLUMN role TEXT NOT NULL DEFAULT 'eval'")
