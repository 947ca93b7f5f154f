"""What a study's verdicts test: a metric per run, read from its final metrics or its learning curve.

    metric: val_loss                                   # the fixed-budget final metrics
    metric: val_accuracy                               # (tasks: the default)
    metric: val_loss@256_beyond                        # any final metric a run records
    metric: {name: online_loss, last: 0.5}             # mean pre-update training loss, last half
    metric: {name: tokens_to_target, target: 1.0}      # tokens until the training loss reaches 1.0

A fixed-budget metric can hide what separates two variants: at the budget a task may be solved by
both (accuracy 1.0: saturated), while one learnt it later. Learning-speed metrics see that:

- ``online_loss``: the mean training loss over the run's steps (or their last fraction), each taken
  before the step's update, on a batch the model had not seen: the area under the learning curve.
  It is a held-out measure only while no example repeats, so a run past its first epoch
  (``single_pass_steps``) gives no value, with the reason. Averaging hundreds of batches, it carries
  less seed noise than one final evaluation.
- ``tokens_to_target`` (or steps): the first step at which the training loss, averaged over the last
  ``smooth`` steps, is at or below ``target`` (the modded-nanoGPT speedrun's measure). A run that
  never gets there is *censored*: its value is its whole budget, a lower bound, and it is flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

LEARNING_SPEED = ("online_loss", "tokens_to_target")
ACCURACY_BOUND = 0.995  # accuracy at or above this is the task's ceiling: saturated


class MetricSpec(BaseModel):
    """The metric a study's verdicts test (spec key ``metric``); None: accuracy for tasks, else val loss."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="val_loss | val_accuracy | val_bpb | online_loss | tokens_to_target | any "
                                  "final metric runs record (e.g. val_loss@256_beyond)")
    last: float = Field(1.0, gt=0, le=1, description="online_loss: the last fraction of the steps averaged")
    target: float | None = Field(None, description="tokens_to_target: the training loss to reach")
    smooth: int = Field(10, ge=1, description="tokens_to_target: steps averaged before comparing with the target")
    unit: Literal["tokens", "steps"] = Field("tokens", description="tokens_to_target: counted in tokens or steps")

    @model_validator(mode="after")
    def _target_given(self) -> MetricSpec:
        if self.name == "tokens_to_target" and self.target is None:
            raise ValueError("tokens_to_target needs target: the training loss to reach, e.g. "
                             "{name: tokens_to_target, target: 1.0}")
        if self.name != "tokens_to_target" and self.target is not None:
            raise ValueError(f"target belongs to tokens_to_target, not {self.name}")
        return self

    @property
    def column(self) -> str:
        """The runs column holding each run's value (derived metrics are added under this name)."""
        return self.name

    @property
    def higher_is_better(self) -> bool:
        return "accuracy" in self.name or "recall" in self.name

    @property
    def unit_name(self) -> str:
        if self.name == "tokens_to_target":
            return self.unit
        if "accuracy" in self.name or "recall" in self.name:
            return "accuracy" if "accuracy" in self.name else "recall"
        return {"val_bpb": "bits per byte"}.get(self.name, "nats" if "loss" in self.name else "")

    @property
    def default_margin(self) -> float:
        """Equivalence margin when the spec gives none: 0.01 (nats, accuracy); none for counts."""
        return 0.0 if self.name == "tokens_to_target" else 0.01

    @property
    def default_bound(self) -> float | None:
        """The value at which the metric saturates when the spec gives none: accuracy (recall) ≥ 0.995."""
        return ACCURACY_BOUND if self.higher_is_better else None

    @property
    def label(self) -> str:
        """A short name: "val loss", "online loss", "steps to loss 1"."""
        if self.name == "tokens_to_target":
            return f"{self.unit} to loss {self.target:g}"
        return self.name.replace("_", " ")

    def describe(self) -> str:
        if self.name == "online_loss":
            part = "all steps" if self.last == 1 else f"the last {self.last:.0%} of the steps"
            return f"online loss (mean pre-update training loss over {part}, each batch seen once)"
        if self.name == "tokens_to_target":
            return (f"{self.unit} to reach training loss {self.target:g} (mean of {self.smooth} steps; a run that "
                    "never does is censored at its budget)")
        return self.name.replace("_", " ")


def metric_of(given: MetricSpec | None, runs: pd.DataFrame | None = None) -> MetricSpec:
    """The metric a study tests: the one its spec gives, else accuracy for tasks (runs that record it)
    and val loss otherwise."""
    if given is not None:
        return given
    recorded = runs is not None and "val_accuracy" in runs and runs.loc[runs["status"] == "finished", "val_accuracy"].notna().any()
    return MetricSpec(name="val_accuracy" if recorded else "val_loss")


@dataclass(frozen=True)
class Value:
    """One run's value of a metric: censored (a lower bound), or missing with the reason."""

    value: float
    censored: bool = False
    missing: str = ""


def online_loss(curve: pd.DataFrame, steps: int, single_pass_steps: float | None, last: float = 1.0) -> Value:
    """The mean training loss over the last `last` of a run's `steps` (curve: step, train_loss), valid
    only if no step repeated data (steps ≤ single_pass_steps)."""
    if single_pass_steps is None or (isinstance(single_pass_steps, float) and math.isnan(single_pass_steps)):
        return Value(math.nan, missing="the run did not record how many steps its data lasts (trained before "
                                       "online loss was measured)")
    if steps > single_pass_steps:
        return Value(math.nan, missing=f"the run trained {steps} steps but its data holds {int(single_pass_steps)} "
                                       "steps of unseen batches: later batches repeat data, so its training loss is no "
                                       "held-out measure (fewer steps, a larger batch's budget, or more data)")
    first = steps - max(1, round(last * steps))
    window = curve[(curve["step"] > first) & (curve["step"] <= steps)]["train_loss"]
    if len(window) < max(1, round(last * steps)):
        return Value(math.nan, missing=f"the curve holds {len(window)} of the {round(last * steps)} steps averaged")
    return Value(float(window.mean()))


def to_target(curve: pd.DataFrame, steps: int, target: float, smooth: int, per_step: float) -> Value:
    """(first step whose trailing mean of `smooth` training losses is ≤ target) × per_step; a run
    that never reaches it is censored at steps × per_step."""
    losses = curve.sort_values("step")["train_loss"].to_numpy(dtype=float)
    if len(losses) < smooth:
        return Value(math.nan, missing=f"the curve holds {len(losses)} steps, fewer than the {smooth} averaged")
    trailing = np.convolve(losses, np.ones(smooth) / smooth, mode="valid")  # trailing[i]: steps i+1 .. i+smooth
    reached = np.flatnonzero(trailing <= target)
    if len(reached):
        return Value(float((reached[0] + smooth) * per_step))
    return Value(float(steps * per_step), censored=True)


def run_values(runs: pd.DataFrame, curves: pd.DataFrame | None, metric: MetricSpec) -> dict[str, Value]:
    """run_id → its value of `metric`: the final metric as recorded, or the learning-speed metric
    from its curve (``curves``: the store's per-step metrics)."""
    out = {}
    if metric.name not in LEARNING_SPEED:
        for _, run in runs.iterrows():
            value = run.get(metric.name)
            ok = value is not None and isinstance(value, int | float) and math.isfinite(value)
            out[run["run_id"]] = Value(float(value)) if ok else Value(math.nan, missing=f"the run records no {metric.name}")
        return out
    by_run = dict(iter(curves.groupby("run_id"))) if curves is not None and not curves.empty else {}
    for _, run in runs.iterrows():
        curve = by_run.get(run["run_id"])
        steps = run.get("steps")
        if curve is None or "train_loss" not in curve or not isinstance(steps, int | float) or math.isnan(steps):
            out[run["run_id"]] = Value(math.nan, missing="no learning curve stored")
            continue
        steps = int(steps)
        if metric.name == "online_loss":
            out[run["run_id"]] = online_loss(curve, steps, run.get("single_pass_steps"), metric.last)
        else:
            per_step = 1.0 if metric.unit == "steps" else float(run["tokens"]) / steps
            out[run["run_id"]] = to_target(curve, steps, metric.target, metric.smooth, per_step)
    return out
