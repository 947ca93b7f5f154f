"""Optional experiment tracking: ``python -m bench.run SPEC --log tensorboard wandb``.

Each archbench run that trains becomes one tracker run, fed exactly the step records the results
store receives for it (its folder's metrics.jsonl: train loss, learning rate, tokens, throughput, MFU
each step; validation metrics at each evaluation); numbers only, under the store's names.

- tensorboard: a SummaryWriter per run in <results folder>/tensorboard/<run id>
  (``tensorboard --logdir results/<name>/tensorboard``). Needs ``pip install 'archbench[tensorboard]'``.
- wandb: a run named <run id> in group <study>, its config the run's resolved config, written under
  <results folder>/wandb; offline (``wandb sync`` uploads it later) unless WANDB_MODE says otherwise;
  project archbench unless WANDB_PROJECT says otherwise. Needs ``pip install 'archbench[wandb]'``.

The store stays the source of truth. Tracking happens in the runner process (``StudyTracking``
follows the executor's events, whichever process or machine trained the run, and reads the run's
records from its folder), so it never touches training; a tracker that fails warns once and is
dropped for the rest of the invocation while the study goes on.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class TrackingUnavailable(RuntimeError):
    """A tracker --log names cannot run here (its package is missing or too old); says what to install."""


class Tracker(Protocol):
    """One tracker run for one archbench run."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """A SummaryWriter in <folder>/tensorboard/<run id>, one scalar series per metric. It opens at the
    first step it logs and purges from that step on what an earlier attempt of the run wrote there, so a
    resumed run shows the store's curve, not two overlapping ones."""

    def __init__(self, run_id: str, study: str, config: dict, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(folder) / "tensorboard" / run_id
        self._writer_class, self.study, self.config = SummaryWriter, study, config
        self.writer = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer is None:
            self.writer = self._writer_class(str(self.log_dir), purge_step=step, flush_secs=10)
            text = json.dumps({"study": self.study, **self.config}, indent=2, default=str)
            self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), step)
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbTracker:
    """A wandb run named after the archbench run, grouped by study, in <folder>/wandb: offline unless
    WANDB_MODE is set; it never captures the console or samples system metrics."""

    def __init__(self, run_id: str, study: str, config: dict, folder: Path):
        import wandb

        Path(folder).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "archbench", name=run_id, group=study, config=config,
            dir=str(folder), mode=os.environ.get("WANDB_MODE") or "offline",
            reinit="create_new",  # runs trained side by side (--workers N, Ray) are tracked side by side
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, save_code=False,
                                    disable_job_creation=True))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


@dataclass(frozen=True)
class Backend:
    factory: Callable[[str, str, dict, Path], Tracker]
    module: str  # imported by ``require_trackers``: a missing or broken install fails before training
    minimum: tuple[int, ...] = ()  # the oldest version that works


TRACKERS: dict[str, Backend] = {  # --log NAME; the extra to install is archbench[NAME]
    "tensorboard": Backend(TensorBoardTracker, "torch.utils.tensorboard"),
    "wandb": Backend(WandbTracker, "wandb", (0, 19, 10)),  # 0.19.10: several runs open in one process
}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def require_trackers(names: Iterable[str]) -> None:
    """Import each named tracker's package; a TrackingUnavailable (one line) says what to install."""
    for name in dict.fromkeys(names):
        backend = TRACKERS[name]
        try:
            module = importlib.import_module(backend.module)
        except Exception as e:  # noqa: BLE001 - missing, or installed but broken: either way, what to install
            raise TrackingUnavailable(f"--log {name} needs the {name} package ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''}): pip install 'archbench[{name}]'") from None
        found = getattr(module, "__version__", "")
        if backend.minimum and found and _version(found) < backend.minimum:
            raise TrackingUnavailable(f"--log {name} needs {name}>={'.'.join(map(str, backend.minimum))}, found "
                                      f"{found}: pip install -U 'archbench[{name}]'")


def _warn(name: str, error: BaseException, failed: set[str]) -> None:
    """Warn about a tracker that failed, once per name in `failed` (one invocation's)."""
    if name in failed:
        return
    failed.add(name)
    reason = str(error).splitlines()[0][:300] if str(error) else ""
    print(f"warning: --log {name} failed ({type(error).__name__}: {reason}); the study goes on without it "
          "(the results store is unaffected)", file=sys.stderr)


class Trackers:
    """One archbench run's trackers. Never raises: a tracker that fails warns once (per `failed` set)
    and is dropped, as are the other runs' trackers of the same kind (``failed`` names it)."""

    def __init__(self, trackers: dict[str, Tracker], failed: set[str]):
        self.trackers, self.failed = trackers, failed

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, tracker in list(self.trackers.items()):
            if name in self.failed:
                self._drop(name)
                continue
            try:
                tracker.log(step, metrics)
            except Exception as e:  # noqa: BLE001 - tracking never stops a study
                _warn(name, e, self.failed)
                self._drop(name)

    def close(self) -> None:
        for name in list(self.trackers):
            try:
                self.trackers.pop(name).close()
            except Exception as e:  # noqa: BLE001
                _warn(name, e, self.failed)

    def _drop(self, name: str) -> None:
        with contextlib.suppress(Exception):  # it has warned already
            self.trackers.pop(name).close()


def open_trackers(names: Iterable[str], run_id: str, study: str, config: dict, folder: str | Path,
                  *, failed: set[str] | None = None) -> Trackers:
    """The named trackers for one run (``TRACKERS``); one that cannot open warns once and is left out.
    `failed`: the names that failed already in this invocation (updated), skipped here."""
    failed = set() if failed is None else failed
    opened: dict[str, Tracker] = {}
    for name in dict.fromkeys(names):
        if name in failed:
            continue
        try:
            opened[name] = TRACKERS[name].factory(run_id, study, config, Path(folder))
        except Exception as e:  # noqa: BLE001 - e.g. wandb could not start its service
            _warn(name, e, failed)
    return Trackers(opened, failed)


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """A step record's numbers (the step itself aside): what a tracker plots."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


@dataclass
class _Followed:
    """A run being followed: how far its metrics.jsonl was read, its trackers (open once it has a record),
    the last step logged and the metrics logged at it (a step may be recorded twice: a time budget's
    final evaluation adds its metrics to the last step's record)."""

    path: Path
    offset: int = 0
    trackers: Trackers | None = None
    step: int | None = None
    logged: set[str] = field(default_factory=set)


class StudyTracking:
    """Streams the runs of a study to trackers, from the runner process. It sits in front of the executor's
    events (``follow``): at a run's start it begins following the run's runs/<id>/metrics.jsonl, at each of
    its steps it logs the records appended since (the store's records, as the store will read them), and
    at its end it logs the rest and closes the run's trackers. Any executor serves: the processes or
    machines that train never hear of tracking."""

    def __init__(self, names: Iterable[str], study: str, folder: str | Path):
        self.names, self.study, self.folder = list(dict.fromkeys(names)), study, Path(folder)
        self.failed: set[str] = set()
        self.configs: dict[str, dict] = {}
        self.runs: dict[str, _Followed] = {}
        self.ended: set[str] = set()
        self.lock = threading.Lock()  # Ray: ends come from the driver's thread, steps from the queue's

    def follow(self, runs: Iterable, events: Callable[[dict], None]) -> Callable[[dict], None]:
        """`events` (e.g. the progress display), with the tracking of `runs` (planned runs) behind it."""
        self.configs.update({r.run_id: r.config.model_dump(mode="json") for r in runs})

        def tracked(event: dict) -> None:
            events(event)
            try:
                self.handle(event)
            except Exception as e:  # noqa: BLE001 - e.g. an unreadable record: tracking never stops a study
                _warn("tracking", e, self.failed)
        return tracked

    def handle(self, event: dict) -> None:
        kind, run_id = event.get("event"), event.get("run_id")
        with self.lock:
            if kind == "start":
                self._stop(run_id)
                self.ended.discard(run_id)
                self.runs[run_id] = _Followed(self.folder / "runs" / run_id / "metrics.jsonl")
            elif kind in ("step", "end") and run_id not in self.ended:  # a step announced after its end: read
                run = self.runs.setdefault(run_id, _Followed(self.folder / "runs" / run_id / "metrics.jsonl"))
                self._read(run_id, run)
                if kind == "end":
                    self._stop(run_id)
                    self.ended.add(run_id)

    def close(self) -> None:
        """Close every run's trackers (the study ended or was interrupted)."""
        with self.lock:
            for run_id in list(self.runs):
                self._stop(run_id)

    def _stop(self, run_id: str) -> None:
        run = self.runs.pop(run_id, None)
        if run and run.trackers:
            run.trackers.close()

    def _read(self, run_id: str, run: _Followed) -> None:
        try:
            size = run.path.stat().st_size
        except FileNotFoundError:
            return
        if size < run.offset:  # another attempt cut the records back to its checkpoint: track it afresh
            self._stop(run_id)
            run = self.runs[run_id] = _Followed(run.path)
        with open(run.path, "rb") as f:
            f.seek(run.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next look
        run.offset += len(complete)
        for line in complete.splitlines():
            if line.strip():
                self._log(run_id, run, json.loads(line))

    def _log(self, run_id: str, run: _Followed, record: dict) -> None:
        step, metrics = int(record["step"]), numeric(record)
        if step == run.step:  # recorded again with more metrics: log only those
            metrics = {k: v for k, v in metrics.items() if k not in run.logged}
            run.logged |= metrics.keys()
        else:
            run.step, run.logged = step, set(metrics)
        if not metrics:
            return
        if run.trackers is None:
            run.trackers = open_trackers(self.names, run_id, self.study, self.configs.get(run_id, {}), self.folder,
                                         failed=self.failed)
        run.trackers.log(step, metrics)
