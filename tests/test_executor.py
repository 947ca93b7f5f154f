"""Executors are plugged in by name: a toy one, defined and registered here (no other file changed),
runs a study end to end through the rules bench.executor publishes, selected as --executor is."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.executor import (EXECUTORS, Events, Executor, executor_class, in_phases, parent_status, record_outcome,
                            register_executor, run_claimed)
from bench.plan import Plan, PlannedRun
from bench.run import main
from bench.store import DONE, Store, load, owner_id
from tests.test_runner import write_spec


@register_executor("toy")
class ToyExecutor:
    """Runs each phase's runs in this process, last planned first, as a driver does: it claims each run in
    the store, executes it, then records its outcome itself."""

    executed: list[str] = []  # run ids, in the order they ran

    def __init__(self, workers: int = 1, address: str | None = None):
        self.workers = workers

    def execute(self, plan: Plan, folder: Path, events: Events) -> None:
        store, owner = Store(folder), owner_id()

        def run_batch(runs: list[PlannedRun]) -> dict[str, str]:
            outcomes = {}
            for run in reversed(runs):
                outcomes[run.run_id] = store.claim(run.run_id, owner)
                if outcomes[run.run_id] == "claimed":
                    ToyExecutor.executed.append(run.run_id)
                    outcome = run_claimed(run, folder, events, parent_status(store, run))
                    outcomes[run.run_id] = record_outcome(store, run, outcome, events)
            return outcomes

        try:
            in_phases(plan, run_batch)
        finally:
            store.close()


def test_a_toy_executor_registered_in_a_test_runs_a_study_into_the_store(tmp_path):
    toy: Executor = ToyExecutor()  # it satisfies the protocol
    assert toy.workers == 1 and EXECUTORS["toy"] is ToyExecutor
    ToyExecutor.executed.clear()
    out = tmp_path / "out"
    assert main([str(write_spec(tmp_path, steps=3)), "--out", str(out), "--executor", "toy"]) == 0
    runs = load(out).runs
    assert len(runs) == 4 and set(runs["status"]) <= set(DONE) and runs["val_loss"].notna().all()
    assert ToyExecutor.executed == list(reversed(runs["run_id"]))  # its own order: last planned first
    assert (out / "report.html").exists()
    ToyExecutor.executed.clear()
    assert main([str(tmp_path / "spec.yaml"), "--out", str(out), "--executor", "toy"]) == 0
    assert ToyExecutor.executed == []  # a rerun finds every run done


def test_an_executor_is_found_by_name_or_module_path_and_an_unknown_one_is_refused(tmp_path, capsys):
    assert executor_class("local") is EXECUTORS["local"] and executor_class("ray") is EXECUTORS["ray"]
    assert executor_class("tests.test_executor:ToyExecutor") is ToyExecutor
    with pytest.raises(SystemExit) as exit_:
        main([str(write_spec(tmp_path)), "--executor", "nope"])
    assert exit_.value.code == 2
    assert "--executor: no such executor; executors: local, ray, toy (or module:Class)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "spec.yaml"), "--executor", "tests.test_executor:Missing"])
    assert "has no attribute 'Missing'" in capsys.readouterr().err
