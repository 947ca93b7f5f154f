"""The results store's named queries, and that SQL stays inside the store and the results loader."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from bench.store import Store, owner_id

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(run_id: str) -> SimpleNamespace:
    return SimpleNamespace(run_id=run_id, variant="v", sweep={}, seed=0, kind="train", role="eval", parent_id=None,
                           config=SimpleNamespace(model_dump_json=lambda: "{}"))


def _record(store: Store, run_id: str, status: str, machine: str, metrics: dict) -> None:
    store.add_runs("study", [_run(run_id)])
    assert store.claim(run_id, owner_id()) == "claimed"
    store.finish(run_id, status, metrics, None, [], {"machine_id": machine})


def test_finished_mfus_are_those_of_runs_finished_on_that_machine(tmp_path):
    store = Store(tmp_path)
    _record(store, "a", "finished", "laptop", {"mfu": 0.4})
    _record(store, "b", "finished", "laptop", {"mfu": 0.5, "val_loss": 2.0})
    _record(store, "c", "finished", "gpu", {"mfu": 0.9})  # another machine
    _record(store, "d", "failed", "laptop", {"mfu": 0.1})  # not finished
    _record(store, "e", "diverged", "laptop", {"mfu": 0.2})  # not finished either
    _record(store, "f", "finished", "laptop", {"val_loss": 2.0})  # no MFU recorded
    _record(store, "g", "finished", "laptop", {"mfu": 0})  # none measured
    store.add_runs("study", [_run("h")])  # pending: no metrics, no machine
    assert sorted(store.finished_mfus("laptop")) == [0.4, 0.5]
    assert store.finished_mfus("gpu") == [0.9]
    assert store.finished_mfus("elsewhere") == []
    store.close()


def test_kernel_spec_hashes_are_those_stored_for_that_study_on_that_machine(tmp_path):
    store = Store(tmp_path)
    store.add_kernels("attention", [{"case": "sdpa", "spec_hash": "aaaa"}, {"case": "math", "spec_hash": "aaaa"}],
                      {"machine_id": "laptop"})
    store.add_kernels("attention", [{"case": "sdpa", "spec_hash": "bbbb"}], {"machine_id": "laptop"})  # an edited section
    store.add_kernels("attention", [{"case": "sdpa", "spec_hash": "cccc"}], {"machine_id": "gpu"})
    store.add_kernels("mlp", [{"case": "swiglu", "spec_hash": "dddd"}], {"machine_id": "laptop"})
    store.add_kernels("attention", [{"case": "old row without a hash"}], {"machine_id": "laptop"})
    assert store.kernel_spec_hashes("attention", "laptop") == {"aaaa", "bbbb"}
    assert store.kernel_spec_hashes("attention", "gpu") == {"cccc"}
    assert store.kernel_spec_hashes("mlp", "laptop") == {"dddd"}
    assert store.kernel_spec_hashes("mlp", "gpu") == set() and store.kernel_spec_hashes("norm", "laptop") == set()
    store.close()


def test_no_sql_outside_the_store_package():
    """The schema, its writer and its reader sit side by side in bench/store/; no other module holds SQL."""
    sql = re.compile(r"\b(SELECT\s.+\sFROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|WHERE\s+\w+\s*=)")
    offenders = [f"{path.relative_to(BENCH.parent)}:{number}"
                 for path in sorted(BENCH.rglob("*.py")) if path.parent != BENCH / "store"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if sql.search(line)]
    assert offenders == []
    assert any(map(sql.search, (BENCH / "store" / "reader.py").read_text().splitlines()))  # the check sees SQL
    assert not hasattr(Store, "rows")  # no generic query that callers fill with SQL fragments


def test_runs_of_one_machine_at_different_thread_counts_are_one_machines_sample(tmp_path):
    """Workers train with one thread each, a lone run with all of them: the same machine either way."""
    from bench.results import load

    store = Store(tmp_path)
    cpu = {"cpu": "AMD EPYC", "cpu_cores": 2, "gpu": None}
    for run_id, threads, machine in (("a", 1, "epyc"), ("b", 2, "epyc"), ("c", 4, "xeon")):
        store.add_runs("study", [_run(run_id)])
        assert store.claim(run_id, owner_id()) == "claimed"
        fingerprint = {**cpu, "torch_threads": threads, **({"cpu": "Xeon"} if machine == "xeon" else {})}
        store.finish(run_id, "finished", {"val_loss": 1.0}, None, [], {"machine_id": machine, "hardware": fingerprint})
    store.close()
    machines = load(tmp_path).runs.set_index("run_id")["machine"]
    assert machines.to_dict() == {"a": "AMD EPYC (1–2 threads)", "b": "AMD EPYC (1–2 threads)", "c": "Xeon (4 threads)"}


def test_runners_opening_one_new_store_at_once_migrate_it_once(tmp_path):
    """Two runners on one folder (``bench.run`` twice) open a fresh store together: each adds the
    columns a new store lacks, and the second to look must see the first's (not fail on a duplicate)."""
    import threading

    start, errors = threading.Barrier(8), []

    def open_store(folder: Path) -> None:
        start.wait()
        try:
            Store(folder).close()
        except Exception as e:  # noqa: BLE001 - collected, asserted below
            errors.append(e)

    for attempt in range(40):  # the race is between reading the schema and altering it: give it many chances
        threads = [threading.Thread(target=open_store, args=(tmp_path / str(attempt),)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
