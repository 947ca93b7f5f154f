"""Training speed side by side: each variant's training step against its reference's, interleaved.

A run's own tokens/s on a shared machine moves by 10-30% from one minute to the next, so two runs
timed at different times say nothing about which variant trains faster. Here both take training
steps in the same minutes: each round times one step of each, the order alternating (ABBA), after a
warm-up (first calls, autotuning) that is not timed. The per-round log ratios of step times give the
speed ratio and its 95% CI (paired t); a claim of "faster" or "slower" needs the CI to exclude 1.

    speed: {rounds: 20}     # spec key; speed: null times nothing (default: 20 rounds per comparison)
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from bench.stats import paired_t

if TYPE_CHECKING:  # the spec reads SpeedSpec without torch; timing needs it
    from bench.config import RunConfig


class SpeedSpec(BaseModel):
    """How a study times each comparison's training steps side by side (``bench.speed``)."""

    model_config = ConfigDict(extra="forbid")
    rounds: int = Field(20, ge=3, description="rounds of one step each, order alternating")
    warmup: int = Field(3, ge=1, description="untimed steps of each first")


def _stepper(run: RunConfig, steps: int):
    """A trainer of `run` (its model, data, dtype, kernels and optimizer) that takes `steps` steps
    with no evaluation or checkpoint; returns its step generator."""
    from bench.config import RunConfig
    from bench.train import Trainer  # torch: only when timing

    train = {**run.train.model_dump(), "steps": steps, "tokens": None, "flops": None, "seconds": None,
             "eval_every": 10**9, "checkpoint_every": None}
    return Trainer(RunConfig.model_validate({**run.model_dump(), "train": train}), None).steps()


def paired_speed(variant: RunConfig, reference: RunConfig, settings: SpeedSpec) -> dict:
    """Time `variant`'s and `reference`'s training steps interleaved; returns the speed ratio
    (variant tokens/s ÷ reference tokens/s: above 1, the variant trains faster) with its 95% CI and
    the raw step times."""
    began = time.perf_counter()
    total = settings.warmup + settings.rounds + 1
    loops = {"variant": _stepper(variant, total), "reference": _stepper(reference, total)}
    for loop in loops.values():
        for _ in range(settings.warmup):
            next(loop)
    times: dict[str, list[float]] = {"variant": [], "reference": []}
    for i in range(settings.rounds):
        order = ("variant", "reference") if i % 4 in (0, 3) else ("reference", "variant")  # ABBA BAAB ...
        for name in order:
            start = time.perf_counter()
            next(loops[name])
            times[name].append(time.perf_counter() - start)
    tokens = {"variant": variant.train.batch_size * variant.seq_len, "reference": reference.train.batch_size * reference.seq_len}
    # log of (variant tokens/s ÷ reference tokens/s) per round
    logs = [math.log(tokens["variant"] / a) - math.log(tokens["reference"] / b)
            for a, b in zip(times["variant"], times["reference"])]
    test = paired_t(logs)
    return {"component": "train_step", "status": "ok", "rounds": settings.rounds, "warmup": settings.warmup,
            "ratio": math.exp(test.delta), "ci_low": math.exp(test.ci_low) if math.isfinite(test.ci_low) else None,
            "ci_high": math.exp(test.ci_high) if math.isfinite(test.ci_high) else None,
            "variant_step_s": float(np.median(times["variant"])), "reference_step_s": float(np.median(times["reference"])),
            "samples_variant": times["variant"], "samples_reference": times["reference"],
            "seconds": time.perf_counter() - began}


def speed_phrase(row: dict) -> str:
    """A side-by-side timing in words: faster or slower where the CI excludes 1, else no resolved difference."""
    ratio, low, high = row["ratio"], row.get("ci_low"), row.get("ci_high")
    if low is None or high is None:
        return f"trains at {ratio:.2f}× its reference's speed (no interval: the step times did not vary)"
    interval = f"95% CI {low:.2f}–{high:.2f}×, {int(row['rounds'])} interleaved rounds of training steps"
    if low > 1:
        return f"trains {ratio:.2f}× faster ({interval})"
    if high < 1:
        return f"trains {1 / ratio:.2f}× slower ({interval})"
    return f"shows no resolved difference in training speed ({ratio:.2f}×, {interval})"
