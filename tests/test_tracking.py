"""--log tensorboard / wandb: each run's stored step records streamed to trackers, offline, never
changing the store; a missing extra fails before training; a failing tracker only warns."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import sys
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

import bench.run
from bench import hardware, tracking
from bench.results import load
from bench.run import main
from bench.tracking import Backend, StudyTracking
from tests.test_runner import write_spec

# one tiny run of 6 steps, evaluated at steps 5 and 6; nothing measured first (attention backend, peak FLOP/s)
ARGS = ["--only", "mha", "--seeds", "0", "--set", "base.model.attention={name: mha, backend: sdpa}",
        "--set", "base.train.eval_batches=2"]


def _quick(monkeypatch) -> None:
    """No report and no peak-FLOP/s sweep (tests start with an empty cache): tracking needs neither."""
    monkeypatch.setattr(bench.run, "write_report", lambda folders: Path(folders[0]) / "report.html")
    monkeypatch.setattr(hardware, "peak_matmul_flops", lambda device, dtype: 1e11)


def _offline_wandb(monkeypatch, root: Path) -> None:
    """wandb as a user who configured nothing would run it, kept in `root` and off the network: any
    attempt to go online would hit a closed local port, not wandb.ai."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(root / name.lower()))


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One tiny study trained with --log tensorboard wandb: (results folder, stderr, seconds)."""
    root = tmp_path_factory.mktemp("tracked")
    out, err = root / "out", io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        _quick(mp)
        _offline_wandb(mp, root)
        started = time.perf_counter()
        with contextlib.redirect_stderr(err):
            code = main([str(write_spec(root, steps=6)), "--out", str(out), *ARGS, "--log", "tensorboard", "wandb"])
        seconds = time.perf_counter() - started
    assert code == 0, err.getvalue()
    return out, err.getvalue(), seconds


def _stored(out: Path):
    """The one run's id and its step records as the store holds them."""
    results = load(out)
    (run_id,) = results.runs["run_id"]
    return run_id, results.metrics[results.metrics["run_id"] == run_id].sort_values("step")


# -- TensorBoard ----------------------------------------------------------------------------------


def test_tensorboard_event_files_hold_the_stored_curves(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, err, _ = tracked
    assert "warning" not in err
    run_id, stored = _stored(out)
    events = EventAccumulator(str(out / "tensorboard" / run_id))
    events.Reload()
    for tag in ("train_loss", "lr", "tokens", "tokens_per_s"):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == list(stored["step"]) == [1, 2, 3, 4, 5, 6]
        assert [s.value for s in scalars] == list(stored[tag].astype(np.float32))  # scalars are float32
    evaluated = stored.dropna(subset=["val_loss"])
    val = events.Scalars("val_loss")
    assert [s.step for s in val] == list(evaluated["step"]) == [5, 6]
    assert [s.value for s in val] == list(evaluated["val_loss"].astype(np.float32))
    assert "config/text_summary" in events.Tags()["tensors"]  # the run's config as text


# -- wandb, offline -------------------------------------------------------------------------------


def _wandb_records(path: Path) -> list:
    """The records of an offline run's .wandb file (a LevelDB-style log of wandb's protobuf Records:
    32 KiB blocks, each chunk with a 7-byte header: crc, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, records, pending = path.read_bytes(), 32768, [], b""
    assert data[:4] == b":W&B"
    position = 7
    while position + 7 <= len(data):
        if block - position % block < 7:  # the block's tail is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # full or last: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # wandb writes either


def test_wandb_writes_an_offline_run_with_the_stored_metrics(tracked):
    out, err, seconds = tracked
    failed = [line for line in err.splitlines() if "--log wandb failed" in line]
    if failed:
        pytest.skip(f"wandb could not start here: {failed[0]}")
    run_id, stored = _stored(out)
    (run_dir,) = (out / "wandb").glob("offline-run-*")  # offline: nothing was sent anywhere
    records = _wandb_records(next(run_dir.glob("*.wandb")))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.display_name, run.run_group, run.project) == (run_id, "tiny", "archbench")
    config = {_key(item): json.loads(item.value_json) for item in run.config.update}
    assert config["seed"] == 0 and config["model"]["attention"]["name"] == "mha"
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows[r.history.step.num] = {_key(item): json.loads(item.value_json) for item in r.history.item}
    assert sorted(rows) == list(stored["step"])
    assert [rows[s]["train_loss"] for s in stored["step"]] == list(stored["train_loss"])  # float64: exact
    assert [rows[s]["lr"] for s in stored["step"]] == list(stored["lr"])
    assert {s: rows[s]["val_loss"] for s in (5, 6)} == dict(zip(stored["step"][4:], stored["val_loss"][4:]))
    assert seconds < 20, f"a tiny study with both trackers took {seconds:.1f} s"


# -- failing before training; failing during it ---------------------------------------------------


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_extra_fails_before_training_with_one_line(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    out = tmp_path / "out"
    assert main([str(write_spec(tmp_path, steps=2)), "--out", str(out), *ARGS, "--log", name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: --log {name} needs the {name} package")
    assert err.rstrip().endswith(f"pip install 'archbench[{name}]'")
    assert not out.exists()  # nothing prepared, nothing trained


def test_a_too_old_wandb_is_refused_before_training(tmp_path, monkeypatch, capsys):
    import wandb

    monkeypatch.setattr(wandb, "__version__", "0.18.7")
    assert main([str(write_spec(tmp_path, steps=2)), "--out", str(tmp_path / "out"), "--log", "wandb"]) == 2
    assert "needs wandb>=0.19.10, found 0.18.7: pip install -U 'archbench[wandb]'" in capsys.readouterr().err


def test_an_unknown_tracker_is_refused_by_argparse(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(write_spec(tmp_path)), "--log", "mlflow"])
    assert info.value.code == 2
    assert "invalid choice: 'mlflow'" in capsys.readouterr().err


class Exploding:
    """A tracker whose every log raises."""

    logs = 0

    def __init__(self, run_id, study, config, folder):
        pass

    def log(self, step, metrics):
        Exploding.logs += 1
        raise RuntimeError("tracker is down")

    def close(self):
        pass


def test_a_tracker_that_raises_warns_once_and_changes_nothing_stored(tracked, tmp_path, monkeypatch, capsys):
    _quick(monkeypatch)
    monkeypatch.setattr(Exploding, "logs", 0)
    monkeypatch.setitem(tracking.TRACKERS, "tensorboard", Backend(Exploding, "json"))
    out = tmp_path / "out"
    assert main([str(write_spec(tmp_path, steps=6)), "--out", str(out), *ARGS, "--log", "tensorboard"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: --log tensorboard failed (RuntimeError: tracker is down)") == 1
    assert Exploding.logs == 1  # dropped after its first failure
    run_id, stored = _stored(out)
    reference_id, reference = _stored(tracked[0])  # the same run, trained with working trackers
    assert run_id == reference_id
    for column in ("step", "train_loss", "val_loss", "lr", "tokens", "grad_norm"):
        assert stored[column].tolist() == pytest.approx(reference[column].tolist(), nan_ok=True, rel=0, abs=0)
    runs = load(out).runs
    assert list(runs["status"]) == ["finished"]
    assert float(runs["val_loss"].iloc[0]) == float(load(tracked[0]).runs["val_loss"].iloc[0])


# -- following a run's records ----------------------------------------------------------------------


class Recording:
    """A tracker that keeps what it was given, in `opened` (one list of (step, metrics) per tracker run)."""

    opened: ClassVar[list[tuple[str, list]]] = []

    def __init__(self, run_id, study, config, folder):
        self.logged: list = []
        Recording.opened.append((run_id, self.logged))

    def log(self, step, metrics):
        self.logged.append((step, metrics))

    def close(self):
        self.logged.append("closed")


class Unopenable(Recording):
    def __init__(self, *args):
        raise ConnectionError("no service")


def test_the_follower_logs_each_record_once_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Recording, "opened", [])
    monkeypatch.setitem(tracking.TRACKERS, "tensorboard", Backend(Recording, "json"))
    monkeypatch.setitem(tracking.TRACKERS, "wandb", Backend(Unopenable, "json"))
    follower = StudyTracking(["tensorboard", "wandb"], "study", tmp_path)
    seen = []
    events = follower.follow([], seen.append)
    metrics = tmp_path / "runs" / "r1" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)

    def write(text: str) -> None:
        with open(metrics, "a") as f:
            f.write(text)

    events({"event": "start", "run_id": "r1", "label": "r1", "total": 3})
    write(json.dumps({"step": 1, "train_loss": 3.0, "moe_assignments": [1, 2], "val_loss@64": None}) + "\n")
    write('{"step": 2, "train_lo')  # a record still being written
    events({"event": "step", "run_id": "r1", "step": 1, "loss": 3.0, "tokens_per_s": 1.0})
    write('ss": 2.5}\n' + json.dumps({"step": 2, "train_loss": 2.5, "val_loss": 2.7}) + "\n")  # a re-recorded step
    events({"event": "end", "run_id": "r1", "status": "finished", "reason": None})
    events({"event": "step", "run_id": "r1", "step": 2, "loss": 2.5, "tokens_per_s": 1.0})  # late: ignored
    assert len(seen) == 4  # every event passed on
    assert Recording.opened == [("r1", [(1, {"train_loss": 3.0}), (2, {"train_loss": 2.5}), (2, {"val_loss": 2.7}),
                                        "closed"])]
    # a second attempt cut the records back to its checkpoint: a fresh tracker run from there
    events({"event": "start", "run_id": "r1", "label": "r1", "total": 3})
    metrics.write_text(json.dumps({"step": 1, "train_loss": 3.0}) + "\n")
    events({"event": "step", "run_id": "r1", "step": 1, "loss": 3.0, "tokens_per_s": 1.0})
    write(json.dumps({"step": 2, "train_loss": 2.4}) + "\n")
    events({"event": "end", "run_id": "r1", "status": "finished", "reason": None})
    assert Recording.opened[1] == ("r1", [(1, {"train_loss": 3.0}), (2, {"train_loss": 2.4}), "closed"])
    err = capsys.readouterr().err
    assert err.count("warning: --log wandb failed (ConnectionError: no service)") == 1  # once for both runs
