"""Learning-rate schedules, each with linear warmup: cosine, warmup-stable-decay (WSD), constant.

WSD (Hägele et al. 2024) holds the peak rate and decays over the last ``decay_fraction`` of training:
one run's cooldown gives a point per budget, and it matches cosine at the end.
"""

from __future__ import annotations

import math
from typing import Literal


def learning_rate(
    progress_step: float,
    total_steps: float,
    *,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    schedule: Literal["cosine", "wsd", "constant"],
    decay_fraction: float = 0.2,
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear",
) -> float:
    """The rate for step `progress_step` (0-based) of `total_steps`."""
    if warmup_steps and progress_step < warmup_steps:
        return lr * (progress_step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1.0, total_steps - warmup_steps)
        t = min(1.0, (progress_step - warmup_steps) / span)
        return min_lr + 0.5 * (1 + math.cos(math.pi * t)) * (lr - min_lr)
    decay_start = total_steps * (1 - decay_fraction)
    if progress_step < decay_start:
        return lr
    t = min(1.0, (progress_step - decay_start) / max(1.0, total_steps - decay_start))
    shape = {"linear": t, "cosine": 0.5 * (1 - math.cos(math.pi * t)), "sqrt": math.sqrt(t)}[decay_shape]
    return lr - shape * (lr - min_lr)
