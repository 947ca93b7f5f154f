"""Study metrics: learning speed read off the curves (online loss, tokens to a target, censored when
never reached), the spec's metric key, and verdicts on them; failures counted against a variant."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bench.analysis import summarise
from bench.metrics import MetricSpec, online_loss, run_values, to_target
from bench.spec import Spec
from tests.test_analysis import design


def curve(losses) -> pd.DataFrame:
    return pd.DataFrame({"step": np.arange(1, len(losses) + 1), "train_loss": losses})


def test_online_loss_is_the_area_under_the_curve_of_unseen_batches():
    losses = np.linspace(4.0, 2.0, 100)
    assert online_loss(curve(losses), 100, 150).value == pytest.approx(3.0)
    assert online_loss(curve(losses), 100, 150, last=0.5).value == pytest.approx(losses[50:].mean())
    repeated = online_loss(curve(losses), 100, 80)  # the data held 80 steps of unseen batches
    assert math.isnan(repeated.value) and "repeat data" in repeated.missing
    assert "did not record" in online_loss(curve(losses), 100, None).missing


def test_tokens_to_target_takes_the_first_smoothed_crossing_and_censors_the_rest():
    losses = np.r_[np.full(10, 3.0), 0.9, np.full(9, 1.5), np.full(20, 0.8)]  # one lucky step is not a crossing
    reached = to_target(curve(losses), 40, target=1.0, smooth=5, per_step=100.0)
    # trailing means of 5: the first at or below 1.0 ends at step 24 (0.8 × 4 + 1.5) / 5 = 0.94
    assert (reached.value, reached.censored) == (2400.0, False)
    never = to_target(curve(np.full(40, 1.2)), 40, target=1.0, smooth=5, per_step=100.0)
    assert (never.value, never.censored) == (4000.0, True)  # its whole budget: a lower bound


def test_the_spec_names_its_metric_and_refuses_what_cannot_be_measured():
    base = {"name": "s", "base": {"data": {"source": "markov"}}, "variants": {"a": {}}}
    assert Spec.model_validate({**base, "metric": "online_loss"}).metric == MetricSpec(name="online_loss")
    spec = Spec.model_validate({**base, "metric": {"name": "tokens_to_target", "target": 1.0, "unit": "steps"}})
    assert spec.metric.target == 1.0 and spec.metric.unit_name == "steps"
    assert Spec.model_validate({**base, "metric": "val_loss@256_beyond"}).metric.name == "val_loss@256_beyond"
    for bad, message in (("val_perplexity", "unknown metric 'val_perplexity'"),
                         ({"name": "tokens_to_target"}, "needs target"),
                         ({"name": "online_loss", "target": 1.0}, "target belongs to tokens_to_target")):
        with pytest.raises(ValueError, match=message):
            Spec.model_validate({**base, "metric": bad})
    with pytest.raises(ValueError, match="bootstrap is not offered.*permutation"):
        Spec.model_validate({**base, "paired_test": "bootstrap"})


def study(variants: dict[str, list[list[float]]], single_pass: float = 1e9, **extra) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs with learning curves: variant → one curve per seed."""
    runs, steps = [], []
    for variant, curves in variants.items():
        for seed, losses in enumerate(curves):
            run_id = f"{variant}{seed}"
            runs.append({"run_id": run_id, "variant": variant, "seed": seed, "status": "finished", "sweep": {},
                         "steps": len(losses), "tokens": 100 * len(losses), "single_pass_steps": single_pass,
                         "val_loss": float(losses[-1]), **extra})
            steps += [{"run_id": run_id, "step": i + 1, "train_loss": float(x)} for i, x in enumerate(losses)]
    return pd.DataFrame(runs), pd.DataFrame(steps)


def test_a_study_is_judged_on_its_learning_speed_read_off_the_curves():
    rng = np.random.default_rng(0)
    decay = np.exp(-np.arange(60) / 15)
    fast = [2 + 2 * decay ** 1.3 + rng.normal(0, 0.01, 60) for _ in range(4)]
    slow = [2 + 2 * decay + rng.normal(0, 0.01, 60) for _ in range(4)]
    runs, curves = study({"mha": fast, "mqa": slow})
    spec = {"name": "s", "variants": {"mha": {}, "mqa": {}}, "metric": "online_loss"}
    (c,) = summarise(runs, design(spec), curves=curves).comparisons
    assert c.metric == "online_loss" and c.verdict == "worse" and c.unit == "nats"
    assert c.delta == pytest.approx(np.mean([np.mean(s) - np.mean(f) for s, f in zip(slow, fast)]))
    target = {**spec, "metric": {"name": "tokens_to_target", "target": 2.5, "smooth": 3}}
    (c,) = summarise(runs, design(target), curves=curves).comparisons
    assert c.metric == "tokens_to_target" and c.unit == "tokens" and c.delta > 0 and c.verdict == "worse"
    # past one pass over the data the online loss is no measure: no verdict, and the reason
    repeated, curves = study({"mha": fast, "mqa": slow}, single_pass=40)
    (c,) = summarise(repeated, design(spec), curves=curves).comparisons
    assert c.verdict == "inconclusive" and "repeat data" in c.sentence() and not c.needs_seeds


def test_diverged_seeds_count_against_a_variant_instead_of_vanishing():
    runs, _ = study({"base": [[3.0, 2.0]] * 4, "risky": [[3.0, 1.5]] * 4})
    runs.loc[runs.index[(runs["variant"] == "risky") & (runs["seed"] >= 2)], ["status", "val_loss"]] = ["diverged", math.nan]
    runs.loc[runs["variant"] == "risky", "val_loss"] = runs.loc[runs["variant"] == "risky", "val_loss"] + [0.0, 0.01, 0, 0]
    (c,) = summarise(runs, design({"name": "s", "variants": {"base": {}, "risky": {}}})).comparisons
    assert c.verdict == "inconclusive" and "2 of 4 seeds of risky diverged" in c.sentence() and not c.needs_seeds
    every = runs.assign(status=np.where(runs["variant"] == "risky", "failed", runs["status"]))
    (c,) = summarise(every, design({"name": "s", "variants": {"base": {}, "risky": {}}})).comparisons
    assert c.verdict == "inconclusive" and "4 of 4 seeds of risky failed" in c.sentence()


def test_final_metrics_are_read_as_recorded_and_missing_ones_say_so():
    runs = pd.DataFrame([{"run_id": "a", "val_loss@256_beyond": 2.5}, {"run_id": "b", "val_loss@256_beyond": None}])
    values = run_values(runs, None, MetricSpec(name="val_loss@256_beyond"))
    assert values["a"].value == 2.5 and "records no val_loss@256_beyond" in values["b"].missing
