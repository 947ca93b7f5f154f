"""Training speed timed side by side: both steps in the same rounds, the ratio from paired log ratios."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.config import resolve_run
from bench.speed import SpeedSpec, paired_speed
from bench.stats import paired_t

MARKOV = {"source": "markov", "vocab_size": 16, "n_train_tokens": 20_000, "n_val_tokens": 2048, "doc_len": 256}
TRAIN = {"batch_size": 4, "seq_len": 32, "device": "cpu", "dtype": "float32", "steps": 100}


def test_the_speed_ratio_is_the_mean_paired_log_ratio_of_interleaved_steps(monkeypatch):
    small = resolve_run({"n_layer": 1, "n_head": 2, "n_embd": 32}, MARKOV, TRAIN)
    wide = resolve_run({"n_layer": 1, "n_head": 2, "n_embd": 64}, MARKOV, TRAIN)
    order = []
    import bench.speed as speed

    real = speed._stepper

    def tracking(run, steps):  # which model takes each step, in order
        loop = real(run, steps)
        name = "small" if run.model.n_embd == 32 else "wide"
        while True:
            order.append(name)
            yield next(loop)

    monkeypatch.setattr(speed, "_stepper", tracking)
    row = paired_speed(small, wide, SpeedSpec(rounds=8, warmup=2))
    timed = order[4:]  # after two warm-up steps of each
    assert timed == ["small", "wide", "wide", "small", "wide", "small", "small", "wide"] * 2  # ABBA BAAB: no side first
    a, b = np.array(row["samples_variant"]), np.array(row["samples_reference"])
    assert len(a) == len(b) == 8 and row["rounds"] == 8
    test = paired_t(np.log(b) - np.log(a))  # equal tokens per step: the ratio of speeds is the inverse of times
    assert row["ratio"] == pytest.approx(math.exp(test.delta))
    assert row["ci_low"] == pytest.approx(math.exp(test.ci_low)) and row["ci_low"] < row["ratio"] < row["ci_high"]
