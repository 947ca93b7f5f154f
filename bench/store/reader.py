"""Reading the store: a results folder's tables as pandas DataFrames (``load``), and a study's spec
as stored, validated again into the typed ``Spec`` (``read_spec``).

    results = load("results/attention")
    results.runs      # one row per run: run_id, variant, seed, status, val_loss, params, current, ...
    results.metrics   # one row per run and step: run_id, step, train_loss, val_loss, lr, mfu, ...
    results.kernels   # one row per kernel measurement, with the machine it ran on
    results.serving   # one row per variant served under load and offered request rate (bench.serve bench)
    results.study_spec().design   # the study's design (bench.spec.StudyDesign)
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pydantic import ValidationError

from bench.hardware import machine_label
from bench.spec import STORED, Spec, problems
from bench.store.schema import columns, tables


@dataclass
class Results:
    """A store's tables as DataFrames (``load``); ``studies`` holds each spec as stored (JSON text),
    ``study_spec`` gives it typed."""

    runs: pd.DataFrame
    metrics: pd.DataFrame
    kernels: pd.DataFrame
    studies: pd.DataFrame
    serving: pd.DataFrame
    folder: Path | None = None

    def study_spec(self, name: str | None = None) -> Spec:
        """The spec of study `name` (default: the first recorded), validated again (``read_spec``)."""
        rows = self.studies if name is None else self.studies[self.studies["name"] == name]
        where = f"{self.folder / 'results.db'}" if self.folder else "the store"
        if rows.empty:
            raise ValueError(f"{where}: no study {'recorded' if name is None else repr(name)}")
        row = rows.iloc[0]
        return read_spec(row["spec"], f"{where}: study '{row['name']}'")


def read_spec(text: str, where: str) -> Spec:
    """A spec as the store holds it (JSON), validated again into the typed ``Spec``: the one place a
    stored spec becomes typed, so its defaults (the baseline, each reference, the seeds) are worked
    out where a spec file's are (``Spec.design``). A spec this version cannot read is a ValueError
    naming `where` and the keys."""
    try:
        return Spec.model_validate(json.loads(text), context={STORED: True})
    except ValidationError as e:
        problems_ = "; ".join(f"{'.'.join(loc) or '(top level)'}: {message}" for loc, message in problems(e))
        raise ValueError(f"{where}: the stored spec does not validate ({problems_}); run the spec again to "
                         "record it") from None


def _json(text):
    return json.loads(text) if isinstance(text, str) and text else None  # NULL reads as None or NaN


def load(folder: str | Path) -> Results:
    """The store in `folder` (results.db) as DataFrames; final metrics are flattened into runs' columns."""
    path = Path(folder) / "results.db"
    if not path.exists():
        raise FileNotFoundError(f"no results store at {path}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        # current: the run belongs to its study's latest plan (or the store predates plans)
        plans = "plan" in columns(db, "studies")
        runs = pd.read_sql_query(
            "SELECT runs.*, (studies.plan IS NULL OR EXISTS (SELECT 1 FROM planned WHERE planned.study = runs.study "
            "AND planned.plan = studies.plan AND planned.run_id = runs.run_id)) AS current "
            "FROM runs LEFT JOIN studies ON studies.name = runs.study" if plans else "SELECT *, 1 AS current FROM runs", db)
        metrics = pd.read_sql_query("SELECT * FROM metrics ORDER BY run_id, step", db)
        kernels = pd.read_sql_query("SELECT * FROM kernels ORDER BY id", db)
        studies = pd.read_sql_query("SELECT * FROM studies", db)
        serving = (pd.read_sql_query("SELECT * FROM serving ORDER BY id", db) if "serving" in tables(db)
                   else pd.DataFrame())  # a store written before the table existed
    finally:
        db.close()
    return Results(_runs_frame(runs), _metrics_frame(metrics), _kernels_frame(kernels), studies, _serving_frame(serving),
                   Path(folder))


def _runs_frame(runs: pd.DataFrame) -> pd.DataFrame:
    final = pd.DataFrame([_json(m) or {} for m in runs["metrics"]], index=runs.index)
    params = pd.DataFrame([p if isinstance(p, dict) else {} for p in final.get("params", [None] * len(runs))],
                          index=runs.index)
    out = runs.drop(columns=["metrics"]).copy()
    out["current"] = out["current"].astype(bool)
    for column in ("sweep", "config", "hardware", "libraries"):
        out[column] = out[column].map(_json)
    out["machine"] = _run_machines(out)
    for column in final.columns.difference(["params", "status"]):
        out[column] = final[column]
    out["params"] = params.get("total")
    out["non_embedding_params"] = params.get("non_embedding")
    out["active_params"] = params.get("active")
    for column in ("val_loss", "val_accuracy", "val_bpb", "tokens_per_s", "flops_per_token", "peak_memory_bytes", "mfu"):
        if column not in out:
            out[column] = float("nan")
    return out


def _run_machines(runs: pd.DataFrame) -> pd.Series:
    """Each run's machine label; runs of one machine (``machine_id``: CPU, cores, GPU, torch) that ran
    with different thread counts (workers take one each; a lone run takes them all) share one label,
    "AMD EPYC (1–2 threads)": they are one machine's sample, not two."""
    labels = runs["hardware"].map(lambda fp: machine_label(fp) if fp else None)
    if "machine_id" not in runs:
        return labels
    for _, group in runs[labels.notna()].groupby("machine_id"):
        threads = sorted({fp.get("torch_threads") for fp in group["hardware"]} - {None})
        if len(threads) > 1 and not group["hardware"].iloc[0].get("gpu"):
            labels[group.index] = f"{group['hardware'].iloc[0]['cpu']} ({threads[0]}–{threads[-1]} threads)"
    return labels


def _metrics_frame(metrics: pd.DataFrame) -> pd.DataFrame:
    if metrics.empty:
        return pd.DataFrame(columns=["run_id", "step"])
    rows = pd.DataFrame([_json(d) for d in metrics["data"]])
    rows.insert(0, "run_id", metrics["run_id"].values)
    return rows


def _kernels_frame(kernels: pd.DataFrame) -> pd.DataFrame:
    if kernels.empty:
        return pd.DataFrame(columns=["study", "machine_id"])
    rows = pd.DataFrame([_json(d) for d in kernels["data"]])
    rows.insert(0, "machine_id", kernels["machine_id"].values)
    rows.insert(0, "study", kernels["study"].values)
    rows["hardware"] = kernels["hardware"].map(_json).values
    labels = rows["hardware"].map(lambda fp: machine_label(fp) if fp else None)
    rows["machine"] = rows["machine"].fillna(labels) if "machine" in rows else labels  # rows that name none
    return rows


def _serving_frame(serving: pd.DataFrame) -> pd.DataFrame:
    """One row per served variant and offered rate: the load generator's keys (vLLM's names), with the
    rows of the closed-loop generator before it read in those terms (``_open_loop``), and ``errors``
    (failed + rejected) as before."""
    if serving.empty:
        return pd.DataFrame(columns=["study", "run_id", "variant", "machine"])
    rows = pd.DataFrame([_open_loop(_json(d) or {}) for d in serving["data"]])
    for column in ("variant", "run_id", "study", "machine_id"):
        rows.insert(0, column, serving[column].values)
    rows["hardware"] = serving["hardware"].map(_json).values
    rows["machine"] = rows["hardware"].map(lambda fp: machine_label(fp) if fp else None)
    zero = pd.Series(0, index=rows.index)
    rows["errors"] = (rows.get("failed", zero).fillna(0) + rows.get("rejected", zero).fillna(0)).astype(int)
    return rows


# a closed-loop row's keys (seconds) -> the open-loop row's (milliseconds), by vLLM's names
_CLOSED_LOOP = {"requests_per_s": "request_throughput", "tokens_per_s": "output_throughput", "seconds": "duration",
                "requests": "num_prompts", "concurrency": "max_concurrency"}


def _open_loop(row: dict) -> dict:
    """A serving row as the open-loop load generator writes it. A row of the closed-loop generator (at most
    `concurrency` requests in flight, all sent at once: request rate inf with max_concurrency) is renamed;
    its percentiles are kept, its means and TPOT were never measured; its sweep is its settings key."""
    if "request_rate" in row or "concurrency" not in row:
        return row
    out = {_CLOSED_LOOP.get(k, k): v for k, v in row.items() if not k.endswith("_s") or k in _CLOSED_LOOP}
    for name in ("ttft", "itl"):
        for q in (50, 90, 99):
            value = row.get(f"{name}_p{q}_s")
            out[f"p{q}_{name}_ms"] = None if value is None else 1e3 * value
        out[f"median_{name}_ms"] = out[f"p50_{name}_ms"]
    errors = row.get("errors") or 0
    out.update(request_rate=float("inf"), burstiness=1.0, warmup=0, completed=row.get("requests", 0) - errors,
               failed=errors, rejected=0, engine="archbench", request_goodput=None, goodput_slos={},
               percentiles=[50.0, 90.0, 99.0], sweep_id=row.get("settings_key"), percentile_notes=[])
    return out
