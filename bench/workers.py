"""How many processes ``--workers auto`` runs: measured on this machine by training a run's copies
side by side in each process layout (w processes × cores // w threads), once per machine, core count
and model/batch shape, and kept with the numbers behind it (bench.hardware's cache)."""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from bench import hardware
from bench.config import RunConfig
from bench.train import Trainer

WORKERS_PROBE_TIME = 4.0  # seconds of concurrent training per process layout


def _probe_steps(run_json: str, threads: int, start, seconds: float) -> float:
    """In a fresh process: train the run on `threads` threads, from the moment every probe is ready,
    for `seconds`; its optimizer steps per second."""
    torch.set_num_threads(threads)
    trainer = Trainer(RunConfig.model_validate_json(run_json), None)  # validation loads the run's plugins
    steps = trainer.steps(0)
    for _ in range(3):  # allocator, first calls, `backend: auto`'s choice
        next(steps)
    start.wait()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        next(steps)
        n += 1
    return n / (time.perf_counter() - t0)


def measure_layouts(run: RunConfig, layouts: list[int], cores: int, seconds: float = WORKERS_PROBE_TIME) -> dict[int, float]:
    """Training steps per second of the whole machine with w processes × cores // w threads each, for
    each w in layouts: w copies of the run train side by side, as the local executor's workers would."""
    probe = run.model_copy(update={"train": run.train.model_copy(update=dict(
        steps=10**9, tokens=None, flops=None, seconds=None, eval_every=10**9, checkpoint_every=None,
        compile=False, distributed=None))})
    context = multiprocessing.get_context("spawn")  # as the executor's workers: no forked torch state
    rates = {}
    with context.Manager() as manager:
        for w in layouts:
            start = manager.Barrier(w)
            with ProcessPoolExecutor(w, mp_context=context) as pool:
                futures = [pool.submit(_probe_steps, probe.model_dump_json(), cores // w, start, seconds) for _ in range(w)]
                rates[w] = sum(f.result() for f in futures)
    return rates


def workers_decision(run: RunConfig) -> dict:
    """How many local processes (each with cores // workers threads) train the most runs per hour of
    this run's kind here: measured once per machine, core count and model/batch shape; runs on a GPU
    use one process (the GPU, not the cores, sets their pace)."""
    cores = hardware.cpu_cores()
    if hardware.resolve_device(run.train.device).type != "cpu":
        return {"workers": 1, "reason": "runs train on the GPU: one process"}
    layouts = [w for w in (1, 2, 4, 8, 16, 32) if w <= cores]
    if len(layouts) == 1:
        return {"workers": 1, "reason": "one CPU core"}
    shape = dict(model=run.model.to_dict(), batch=run.train.batch_size, micro=run.train.micro_batch_size,
                 seq_len=run.seq_len, dtype=run.train.dtype)
    key = f"workers:cpu:{cores}c:{hardware.config_hash(shape)}"

    def measure() -> dict:
        rates = measure_layouts(run, layouts, cores)
        best = max(rates, key=rates.get)
        described = ", ".join(f"{w}×{cores // w} threads {r:.3g} steps/s" for w, r in rates.items())
        return {"workers": best, "steps_per_s": {str(w): r for w, r in rates.items()},
                "reason": f"measured processes × threads per process: {described}"}

    return hardware.cached(key, measure)
