"""Progress of a study: a live rich display on a terminal, plain lines otherwise (CI logs, pipes)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.table import Table


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Receives executor events (start, step, end); shows run i/N, step, loss, tokens/s and ETA."""

    def __init__(self, n_runs: int, total_steps: int, console: Console | None = None):
        self.console = console or Console()
        self.n_runs, self.total_steps = n_runs, max(1, total_steps)
        self.started = time.perf_counter()
        self.done_runs = 0
        self.steps_done = 0
        self.active: dict[str, dict] = {}
        self.live = Live(self._table(), console=self.console, refresh_per_second=4) if self.console.is_terminal else None
        self._last_line = 0.0

    def __enter__(self) -> Progress:
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.live.__exit__(*exc)

    def eta(self) -> float | None:
        elapsed = time.perf_counter() - self.started
        return elapsed / self.steps_done * (self.total_steps - self.steps_done) if self.steps_done else None

    def __call__(self, event: dict) -> None:
        run = self.active.setdefault(event["run_id"], {"step": 0})
        kind = event["event"]
        if kind == "start":
            run.update(label=event["label"], total=event["total"] or 0, index=self.done_runs + len(self.active))
            self._line(f"[{run['index']}/{self.n_runs}] {event['label']}: started")
        elif kind == "step":
            self.steps_done += event["step"] - run["step"]
            run.update(step=event["step"], loss=event["loss"], tokens_per_s=event["tokens_per_s"])
            if not self.live and time.perf_counter() - self._last_line > 10:  # plain: at most every 10 s
                self._line(f"[{run.get('index', '?')}/{self.n_runs}] {run.get('label', '')}: step {run['step']}"
                           f"/{run.get('total', '?')} loss {run['loss']:.4f} {run['tokens_per_s']:.0f} tok/s "
                           f"ETA {_duration(self.eta())}")
        elif kind == "end":
            self.done_runs += 1
            self.steps_done += max(0, run.get("total", 0) - run["step"])  # a diverged run ends early
            self.active.pop(event["run_id"], None)
            loss = f" val loss {event['val_loss']:.4f}" if event.get("val_loss") is not None else ""
            why = f" ({event['reason']})" if event.get("reason") else ""
            self._line(f"[{self.done_runs}/{self.n_runs} done] {run.get('label', event['run_id'])}: "
                       f"{event['status']}{why}{loss}")
        if self.live:
            self.live.update(self._table())

    def _line(self, text: str) -> None:
        self._last_line = time.perf_counter()
        self.console.print(text, markup=False, highlight=False)

    def _table(self) -> Table:
        table = Table(title=f"runs {self.done_runs}/{self.n_runs} done · ETA {_duration(self.eta())}",
                      title_justify="left")
        for column in ("run", "step", "loss", "tokens/s"):
            table.add_column(column)
        for run in self.active.values():
            if "label" in run:
                table.add_row(run["label"], f"{run['step']}/{run['total'] or '?'}",
                              f"{run['loss']:.4f}" if "loss" in run else "-",
                              f"{run['tokens_per_s']:.0f}" if "tokens_per_s" in run else "-")
        return table
