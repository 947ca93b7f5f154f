"""Study summaries: each variant against its reference on the study's metric (the tests themselves
are in test_stats.py), failures counted, tuning choices and their doubts, learning-speed metrics read
off the curves, and the scaling-law summary."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from bench.analysis import (
    best_of_sweep,
    choose_tuned,
    compute_envelope,
    eval_runs,
    grid_edges,
    ladder_climb,
    pareto_front,
    scaling_per_machine,
    scaling_summary,
    study_tuning,
    summarise,
    unstable_neighbours,
    variant_summary,
)
from bench.spec import Spec, StudyDesign

BASE = [1.8467, 1.8979, 1.8712, 1.9104]


def design(keys: dict) -> StudyDesign:
    """The design of a study with these spec keys (a stand-in base), worked out as a spec file's is."""
    return Spec.model_validate({"name": "s", "base": {"data": {"source": "markov"}}, **keys}).design


def runs_frame(values: dict[str, list[float]], metric: str = "val_loss", **extra) -> pd.DataFrame:
    return pd.DataFrame([{"variant": v, "status": "finished", "sweep": {}, "seed": s, "run_id": f"{v}{s}",
                          metric: x, **({} if metric == "val_loss" else {"val_loss": 1.0}), **extra}
                         for v, xs in values.items() for s, x in enumerate(xs)])


def test_each_variant_is_compared_with_its_reference_and_holm_spans_the_study():
    runs = runs_frame({"a": [2.0, 2.05, 1.97], "a_window": [2.5, 2.56, 2.46], "b": [1.0, 1.06, 0.98],
                       "b_window": [1.0, 1.06, 0.98]})
    summary = summarise(runs, design({"name": "s", "baseline": "a", "compare": {"b_window": "b"},
                                      "variants": {"a": {}, "a_window": {}, "b": {}, "b_window": {}}}))
    by = {c.variant: c for c in summary.comparisons}
    assert by["a_window"].reference == "a" and by["a_window"].verdict == "worse"
    assert by["b_window"].reference == "b" and by["b_window"].delta == pytest.approx(0.0)
    # the same values on every seed: zero variance, no test; it still counts in the correction
    assert by["b_window"].verdict == "inconclusive" and "zero variance" in by["b_window"].note
    assert by["b"].verdict == "better"
    assert all(c.test == "paired t" for c in summary.comparisons)
    # three comparisons, each with a null that may be true until both of its hypotheses fall: × 3 for each
    for name in ("a_window", "b"):
        assert by[name].p_adjusted == pytest.approx(3 * by[name].p_sequential)
    assert [c.verdict for c in summary.comparisons] == ["better", "worse", "inconclusive"]  # sorted by verdict
    assert summary.noise.baseline_sd == pytest.approx(np.std([2.0, 2.05, 1.97], ddof=1))
    assert summary.noise.paired_df == 6  # three comparisons of three pairs


def test_a_variant_on_another_task_is_compared_with_nothing_but_its_own_task():
    runs = runs_frame({"mqar": [0.5, 0.52], "mqar_window": [0.3, 0.31], "recall": [0.9, 0.92],
                       "recall_window": [0.4, 0.43]}, metric="val_accuracy")
    task = {"mqar": "mqar", "mqar_window": "mqar", "recall": "in_context_recall", "recall_window": "in_context_recall"}
    runs["config"] = [{"data": {"source": "task", "task": task[v]}} for v in runs["variant"]]
    variants = {v: {} for v in task}
    summary = summarise(runs, design({"name": "s", "baseline": "mqar", "variants": variants,
                                      "compare": {"recall": None, "recall_window": "recall"}}))
    assert {(c.variant, c.reference) for c in summary.comparisons} == {("mqar_window", "mqar"),
                                                                       ("recall_window", "recall")}
    table = summary.variants.set_index("variant")
    assert table.loc["recall", "reference"] == "" and table.loc["recall_window", "reference"] == "recall"
    # a store planned before specs said so: the data differ, so recall is still not judged against mqar
    older = summarise(runs, design({"name": "s", "baseline": "mqar", "variants": variants,
                                    "compare": {"recall_window": "recall"}}))
    assert ("recall", "mqar") not in {(c.variant, c.reference) for c in older.comparisons}


def test_a_diverged_seed_disqualifies_its_point_and_failures_count_per_point():
    rows = [{"variant": "a", "sweep": {"lr": lr}, "seed": seed, "status": status, "val_loss": loss, "run_id": f"{lr}{seed}"}
            for lr, seed, status, loss in [(1, 0, "finished", 2.0), (1, 1, "finished", 2.1),
                                           (2, 0, "finished", 1.5), (2, 1, "diverged", float("nan")),
                                           (3, 0, "finished", 1.9), (3, 1, "finished", 1.95)]]
    runs = pd.DataFrame(rows)
    best = best_of_sweep(runs)  # lr 2 has the lowest mean of its finished seeds, but one seed diverged
    assert set(best["sweep"].map(lambda p: p["lr"])) == {3}
    table = variant_summary(runs, "a")
    assert table.loc[0, "diverged"] == 0 and table.loc[0, "sweep"] == {"lr": 3}  # counted at its own point
    tuning = runs.assign(role="tune")
    assert choose_tuned(tuning) == ({"a": {"lr": 3}}, {})
    everywhere = tuning.assign(status="diverged")
    assert choose_tuned(everywhere)[0] == {} and "every tuning point of 'a'" in choose_tuned(everywhere)[1]["a"]
    assert eval_runs(tuning).empty  # tuning runs never enter a verdict


def test_a_quantized_variant_is_tested_against_its_own_checkpoint_evaluated_the_same_way():
    # the float runs' own (autocast) val loss differs from the quantize runs' same-dtype float eval
    runs = runs_frame({"mha": [2.00, 2.10, 1.95]}, kind="train")
    quant = runs_frame({"int8": [2.012, 2.111, 1.963]}, kind="quantize")
    quant["val_loss_float"] = [2.010, 2.109, 1.961]  # the same checkpoints, evaluated like the quantized copy
    summary = summarise(pd.concat([runs, quant], ignore_index=True),
                        design({"name": "q", "baseline": "mha", "variants": {"mha": {}, "int8": {}}}))
    (c,) = summary.comparisons
    assert c.reference == "int8 (float)" and c.test == "paired t" and c.n == 3
    assert c.delta == pytest.approx(0.002)  # the paired val_loss change, not 2.029 − 2.017 across evaluations
    assert c.verdict == "equivalent"


def test_two_post_training_methods_are_compared_on_the_same_checkpoints_when_the_spec_says_so():
    runs = runs_frame({"mha": [2.00, 2.10, 1.95]}, kind="train")
    rtn = runs_frame({"rtn": [2.060, 2.170, 2.000]}, kind="quantize")
    gptq = runs_frame({"gptq": [2.030, 2.141, 1.972]}, kind="quantize")
    for frame in (rtn, gptq):
        frame["val_loss_float"] = [2.010, 2.109, 1.961]
    spec = {"name": "q", "baseline": "mha", "variants": {"mha": {}, "rtn": {}, "gptq": {}}, "compare": {"gptq": "rtn"}}
    summary = summarise(pd.concat([runs, rtn, gptq], ignore_index=True), design(spec))
    pairs = {(c.variant, c.reference): c for c in summary.comparisons}
    assert set(pairs) == {("rtn", "rtn (float)"), ("gptq", "gptq (float)"), ("gptq", "rtn")}
    direct = pairs[("gptq", "rtn")]
    assert direct.delta == pytest.approx(-0.029) and direct.test == "paired t" and direct.n == 3


def test_tasks_are_judged_on_accuracy_and_bits_per_byte_are_not_tested_again():
    runs = runs_frame({"full": [0.9, 0.95, 0.92], "window": [0.5, 0.52, 0.55]}, metric="val_accuracy")
    summary = summarise(runs, design({"name": "t", "variants": {"full": {}, "window": {}}}))
    (c,) = summary.comparisons
    assert summary.metric == "val_accuracy" and c.metric == "val_accuracy" and c.verdict == "worse"
    text = runs_frame({"mha": [1.9, 1.95], "mqa": [1.94, 1.99]}, val_bpb=1.2)
    summary = summarise(text, design({"name": "t", "variants": {"mha": {}, "mqa": {}}}))
    assert [c.metric for c in summary.comparisons] == ["val_loss"]


def test_inconclusive_comparisons_say_what_they_could_detect():
    runs = runs_frame({"mha": [1.90, 1.95, 1.93], "gqa": [1.91, 1.94, 1.96]})
    summary = summarise(runs, design({"name": "s", "variants": {"mha": {}, "gqa": {}}}))
    (c,) = summary.comparisons
    assert c.verdict == "inconclusive" and c.mde > abs(c.delta) and "could detect a difference of ±" in c.sentence()
    assert summary.pending() == {"mha", "gqa"}
    lonely = summarise(runs_frame({"mha": [1.9], "gqa": [1.95]}),
                       design({"name": "s", "variants": {"mha": {}, "gqa": {}}}))
    assert lonely.comparisons[0].verdict == "inconclusive" and "needs two" in lonely.comparisons[0].sentence()


def test_p_values_read_as_numbers_in_sentences():
    from bench.formatting import p_value

    assert [p_value(p) for p in (1.0, 0.5, 0.168, 0.0123, 0.00072, 3e-5)] == ["1", "0.5", "0.168", "0.0123", "0.00072", "< 0.0001"]


def test_pareto_front():
    cost = np.array([1.0, 2.0, 3.0, 2.5])
    loss = np.array([3.0, 2.0, 1.0, 2.5])
    assert pareto_front(cost, loss).tolist() == [True, True, True, False]


# -- the scaling-law summary ----------------------------------------------------------------------------

GELU = (1.69, 406.4, 410.7)  # E, A, B of Hoffmann et al. (2022), α = 0.34, β = 0.28
SWIGLU = (1.69, 406.4 * 1.3**-0.34, 410.7 * 1.1**-0.28)  # m_N = 1.3, m_D = 1.1: a constant multiplier of 1.43


def isoflop_grid(machines: dict[str, float] | None = None) -> pd.DataFrame:
    """Runs on three IsoFLOP lines (1e17, 1e18, 1e19 FLOPs × 5 sizes) per variant, losses from known laws
    (scaled per machine); plus what must not be fitted: a variant with 2 sizes, a failed and a quantize run."""
    rows = []
    for machine, scale in (machines or {"m1": 1.0}).items():
        for variant, (e, a, b) in {"gelu": GELU, "swiglu": SWIGLU}.items():
            for c in (1e17, 1e18, 1e19):
                for n in np.geomspace(1e7, 1e9, 5):
                    d = c / (6 * n)
                    rows.append(dict(variant=variant, status="finished", kind="train", params=n, tokens=d,
                                     val_loss=(e + a / n**0.34 + b / d**0.28) * scale, machine=machine))
        for n, d in ((1e7, 1e9), (1e8, 1e10), (1e7, 1e11)):  # two sizes only
            rows.append(dict(variant="small", status="finished", kind="train", params=n, tokens=d, val_loss=3.0,
                             machine=machine))
        rows.append(dict(variant="gelu", status="failed", kind="train", params=1e9, tokens=1e12, val_loss=0.1,
                         machine=machine))
        rows.append(dict(variant="gelu", status="finished", kind="quantize", params=1e9, tokens=1e12, val_loss=0.1,
                         machine=machine))
    return pd.DataFrame(rows)


def test_the_compute_envelope_keeps_the_points_that_set_a_new_best_loss():
    compute, best = compute_envelope([4.0, 1.0, 3.0, 2.0, 5.0, 6.0], [1.0, 3.0, 2.5, 2.8, 1.5, 1.0])
    assert compute.tolist() == [1.0, 2.0, 3.0, 4.0] and best.tolist() == [3.0, 2.8, 2.5, 1.0]  # 5 and 6: no better


def test_the_scaling_summary_recovers_known_laws_and_multipliers():
    summary = scaling_summary(isoflop_grid(), "gelu")
    assert set(summary["parametric"]) == {"gelu", "swiglu"} and set(summary["points"]["variant"]) == {"gelu", "swiglu"}
    assert len(summary["points"]) == 30 and summary["points"]["val_loss"].min() > 1  # no failed or quantize run
    fits = {r["variant"]: r for r in summary["fits"]}
    for name, value in zip(("E", "A", "B", "alpha", "beta"), (*GELU, 0.34, 0.28)):
        assert fits["gelu"][name] == pytest.approx(value, rel=1e-4), name
        low, high = fits["gelu"][f"{name}_ci"]
        assert low == pytest.approx(value, rel=1e-3) and high == pytest.approx(value, rel=1e-3)
    assert fits["swiglu"]["A"] == pytest.approx(SWIGLU[1], rel=1e-4)
    assert fits["gelu"]["a"] == pytest.approx(0.28 / 0.62) and fits["gelu"]["b"] == pytest.approx(0.34 / 0.62)
    assert fits["gelu"]["r2"] > 0.999999 and fits["gelu"]["max_residual"] < 1e-6
    # these runs recorded no FLOPs per token: compute falls back to 6·N·D, and the summary says so
    assert fits["gelu"]["warnings"] == ["compute is 6·N·D for 15 of 15 runs: they recorded no FLOPs per token"]
    assert summary["estimated"] == 30 and summary["compute"].endswith("; 6·N·D for 30 of 30 runs, which recorded no FLOPs per token")
    assert summary["points"]["compute"].tolist() == (6 * summary["points"]["params"] * summary["points"]["tokens"]).tolist()
    # the baseline's frontier at the largest trained budget, and at 100× it (an extrapolation)
    assert [(m["variant"], m["where"], m["compute"], m["extrapolated"]) for m in summary["multipliers"]] == [
        ("swiglu", "largest trained budget", pytest.approx(1e19), False),
        ("swiglu", "extrapolated to 100× that", pytest.approx(1e21), True)]
    for m in summary["multipliers"]:
        assert m["multiplier"] == pytest.approx(1.3 * 1.1, rel=1e-3)
        assert m["ci"][0] == pytest.approx(1.43, rel=1e-3) and m["ci"][1] == pytest.approx(1.43, rel=1e-3)
        assert m["loss"] == pytest.approx(float(summary["parametric"]["gelu"].frontier_loss(m["compute"])))
    at = scaling_summary(isoflop_grid(), "gelu", extrapolate_to=1e24)["multipliers"][1]
    assert at["where"] == "the spec's extrapolate_to" and at["compute"] == 1e24 and at["extrapolated"]
    (gelu, swiglu) = summary["approach2"]
    assert gelu["error"] is None and gelu["budgets"] == 3 and gelu["a"] == pytest.approx(0.28 / 0.62, abs=0.002)
    assert gelu["a"] + gelu["b"] == pytest.approx(1) and 0.99 < gelu["parabola_r2"] <= 1 and gelu["r2"] > 0.9999
    laws = {c["variant"]: c for c in summary["compute_law"]}
    assert set(laws) == {"gelu", "swiglu"}
    points = summary["points"][summary["points"]["variant"] == "gelu"]
    compute, best = compute_envelope(6 * points["params"] * points["tokens"], points["val_loss"])
    assert laws["gelu"]["points"] == len(compute) >= 3 and laws["gelu"]["range"] == (compute.min(), compute.max())
    assert laws["gelu"]["E"] <= best.min() and laws["gelu"]["r2"] > 0.9


def flops_budgeted_runs() -> pd.DataFrame:
    """A train.flops IsoFLOP sweep (3 budgets × 7 sizes) as ``bench.results.load`` returns it: per run the
    training FLOPs per token the trainer recorded (6N plus attention's, 10–35% more at these sizes), the
    tokens of its whole steps and, in its config, the budget it was planned with. moe holds 4× the
    parameters, of which the active quarter follows gelu's law at gelu's FLOPs; costly follows gelu's
    law at twice the FLOPs per token (a variant that spends more per token for nothing)."""
    from tests.test_scaling import TOKENS_PER_STEP, flops_budgeted_sweep, flops_per_token

    n, _, _, planned = flops_budgeted_sweep()
    rows = []
    for variant, total, cost in (("gelu", 1, 1), ("moe", 4, 1), ("costly", 1, 2)):
        for size, budget in zip(n, planned):
            f = cost * flops_per_token(size)
            d = np.ceil(budget / (f * TOKENS_PER_STEP)) * TOKENS_PER_STEP
            rows.append(dict(variant=variant, status="finished", kind="train", params=total * size, active_params=size,
                             flops_per_token=f, tokens=d, val_loss=GELU[0] + GELU[1] / size**0.34 + GELU[2] / d**0.28,
                             config={"train": {"flops": budget, "batch_size": 16, "seq_len": 128}}, machine="m1"))
    return pd.DataFrame(rows)


def test_a_flops_budgeted_sweep_is_fitted_in_the_compute_it_spent_with_an_approach_2_optimum_per_variant(monkeypatch):
    from bench import analysis
    from tests.test_scaling import true_optimum

    monkeypatch.setattr(analysis, "SCALING_BOOTSTRAP", 10)
    runs = flops_budgeted_runs()
    summary = scaling_summary(runs, "gelu")
    # Approach 2: the runs of each train.flops budget form one IsoFLOP curve, whose minimum is the optimum
    assert [r["variant"] for r in summary["approach2"]] == ["costly", "gelu", "moe"]
    for row in summary["approach2"]:
        assert row["error"] is None and row["budgets"] == 3, row
        assert [o["budget"] for o in row["optima"]] == [2.5e11, 5e11, 1e12] and all(o["inside"] for o in row["optima"])
        cost = 2 if row["variant"] == "costly" else 1  # twice the FLOPs: the optimum of half the budget
        for o in row["optima"]:
            assert o["n_opt"] == pytest.approx(true_optimum(o["budget"] / cost), rel=0.03)
    fits = {r["variant"]: r for r in summary["fits"]}
    for variant in ("gelu", "moe", "costly"):  # the law in active parameters, for the MoE too
        assert [fits[variant][k] for k in ("E", "A", "B", "alpha", "beta")] == pytest.approx([*GELU, 0.34, 0.28], rel=1e-4)
        assert fits[variant]["warnings"] == []
    # multipliers at the largest compute spent (not 6ND): twice the FLOPs for the same loss is a multiplier of ½
    largest = float((runs["flops_per_token"] * runs["tokens"]).max())
    assert largest > 1.1 * float((6 * runs["active_params"] * runs["tokens"]).max())
    multipliers = {(m["variant"], m["where"]): m for m in summary["multipliers"]}
    assert set(multipliers) == {(v, w) for v in ("costly", "moe") for w in ("largest trained budget", "extrapolated to 100× that")}
    for (variant, where), m in multipliers.items():
        assert m["compute"] == pytest.approx(largest if where == "largest trained budget" else 100 * largest)
        assert m["multiplier"] == pytest.approx(0.5 if variant == "costly" else 1.0, rel=1e-3)
    gelu = summary["parametric"]["gelu"]
    assert gelu.compute(*gelu.optimal(largest)) == pytest.approx(largest)
    points = summary["points"]
    assert summary["estimated"] == 0 and "6·N·D" not in summary["compute"] and not points["estimated"].any()
    assert points["compute"].tolist() == (runs["flops_per_token"] * runs["tokens"]).tolist()
    assert points["params"].tolist() == runs["active_params"].tolist()  # MoE: N is what a token uses
    compute, _ = compute_envelope(points.loc[points["variant"] == "gelu", "compute"], points.loc[points["variant"] == "gelu", "val_loss"])
    law = next(c for c in summary["compute_law"] if c["variant"] == "gelu")
    assert law["range"] == (compute.min(), compute.max())


def test_the_scaling_summary_needs_three_sizes_and_budgets_and_the_baseline_for_multipliers():
    runs = isoflop_grid()
    assert scaling_summary(runs[runs["variant"] == "small"], "gelu") is None
    without_baseline = scaling_summary(runs[runs["variant"] != "gelu"], "gelu")
    assert [r["variant"] for r in without_baseline["fits"]] == ["swiglu"] and without_baseline["multipliers"] == []
    two_lines = runs[(runs["variant"] == "gelu") & (runs["tokens"] * runs["params"] < 1e18)]
    (row,) = scaling_summary(two_lines, "gelu")["approach2"]
    assert row["error"] is None and row["budgets"] == 2
    grid = pd.DataFrame([dict(variant="gelu", status="finished", kind="train", params=n, tokens=d,
                              val_loss=GELU[0] + GELU[1] / n**0.34 + GELU[2] / d**0.28)
                         for n in (1e7, 1e8, 1e9) for d in (1e9, 1e10, 1e11)])  # only 6e18 FLOPs has 3 sizes
    (row,) = scaling_summary(grid, "gelu")["approach2"]
    assert row["a"] is None and row["error"] == "Approach 2 needs at least two compute budgets with three or more sizes each"


def test_scaling_is_fitted_per_machine_not_pooled():
    runs = isoflop_grid({"laptop": 1.0, "gpu": 1.1})  # the second machine's losses 10% higher
    parts = scaling_per_machine(runs[runs["variant"] != "small"], "gelu")
    assert [p["machine"] for p in parts] == ["laptop", "gpu"]
    for part, scale in zip(parts, (1.0, 1.1)):
        machine = part["machine"]
        assert [r["variant"] for r in part["fits"]] == [f"gelu @ {machine}", f"swiglu @ {machine}"]
        assert set(part["points"]["variant"]) == {f"gelu @ {machine}", f"swiglu @ {machine}"}
        assert part["fits"][0]["E"] == pytest.approx(GELU[0] * scale, rel=1e-4)  # not a pooled E
        assert {m["variant"] for m in part["multipliers"]} == {f"swiglu @ {machine}"}
        assert all(m["multiplier"] == pytest.approx(1.43, rel=1e-3) for m in part["multipliers"])
    (alone,) = scaling_per_machine(runs[runs["machine"] == "gpu"], "gelu")  # one machine: names stay
    assert alone["machine"] == "gpu" and [r["variant"] for r in alone["fits"]] == ["gelu", "swiglu"]
    assert scaling_per_machine(runs[runs["variant"] == "small"], "gelu") == []


def test_the_analysis_does_not_depend_on_the_report():
    code = "import sys, bench.analysis; assert not [m for m in sys.modules if m.startswith('bench.report')]"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_tuned_value_at_the_edge_of_its_grid_is_named():
    grid = {"train.lr": [1e-3, 2e-3, 4e-3], "train.warmup_steps": [10, 20, 40], "model.norm": ["a", "b", "c"]}
    edges = grid_edges(grid, {"train.lr": 4e-3, "train.warmup_steps": 20, "model.norm": "c"})
    assert edges == ["train.lr=0.004 is the largest value tried: the best may lie beyond [0.001, 0.002, 0.004]"]
    assert grid_edges(grid, {"train.lr": 1e-3})[0].startswith("train.lr=0.001 is the smallest value tried")
    # two values: every choice is an edge, and it is said (the optimum was never bracketed)
    assert grid_edges({"train.lr": [1e-3, 2e-3]}, {"train.lr": 2e-3}) == [
        "train.lr=0.002 is the largest value tried: the best may lie beyond [0.001, 0.002]"]


def tuning_runs(losses: dict[float, list[float | None]], variant: str = "adamw") -> pd.DataFrame:
    """Tuning runs over a learning-rate grid: None is a diverged seed."""
    return pd.DataFrame([{"variant": variant, "sweep": {"train.lr": lr}, "seed": 1000 + i, "role": "tune",
                          "status": "finished" if loss is not None else "diverged",
                          "val_loss": loss if loss is not None else math.nan, "run_id": f"{variant}{lr}{i}"}
                         for lr, seeds in losses.items() for i, loss in enumerate(seeds)])


def test_a_tuned_point_keeps_its_distance_from_a_cliff_when_the_gain_is_within_the_margin():
    grid = {"train.lr": [3e-3, 6e-3, 1.2e-2, 2.4e-2]}
    cliff = tuning_runs({3e-3: [3.95], 6e-3: [3.80], 1.2e-2: [3.795], 2.4e-2: [None]})
    # 1.2e-2 is best by 0.005 < margin 0.01 but borders a diverged point: the stable 6e-3 is taken
    assert choose_tuned(cliff, {"adamw": grid}, margin=0.01)[0] == {"adamw": {"train.lr": 6e-3}}
    assert choose_tuned(cliff, {"adamw": grid}, margin=0.0)[0] == {"adamw": {"train.lr": 1.2e-2}}
    assert unstable_neighbours(grid, {"train.lr": 1.2e-2}, {'{"train.lr": 0.024}'})[0].startswith(
        "train.lr=0.024, next to the chosen 0.012, had a diverged or failed seed")
    spec = {"tune": {"train.lr": grid["train.lr"], "tune_seeds": 1}, "margin": 0.0, "variants": {"adamw": {}}}
    flags = study_tuning(cliff, design(spec)).flags
    assert flags == {"adamw": [unstable_neighbours(grid, {"train.lr": 1.2e-2}, {'{"train.lr": 0.024}'})[0]]}
    edge = tuning_runs({3e-3: [3.9], 6e-3: [3.8]})
    assert study_tuning(edge, design({"tune": {"train.lr": [3e-3, 6e-3]}, "variants": {"adamw": {}}})).flags == {
        "adamw": ["train.lr=0.006 is the largest value tried: the best may lie beyond [0.003, 0.006]"]}


def test_a_ladder_climb_gives_each_steps_paired_change_and_the_cumulative_one_from_the_first():
    runs = runs_frame({"gpt2": [3.0, 3.1, 2.9], "rope": [2.9, 3.05, 2.8], "rmsnorm": [2.85, 2.95, 2.8]})
    climb = ladder_climb(runs, ["gpt2", "rope", "rmsnorm"], "val_loss").set_index("step")
    assert climb.loc["rope", "change"] == pytest.approx(np.mean([-0.1, -0.05, -0.1]))
    assert climb.loc["rmsnorm", "change"] == pytest.approx(np.mean([-0.05, -0.1, 0.0]))
    # paired on the same seeds, the steps telescope: the cumulative change is their sum
    assert climb.loc["rmsnorm", "cumulative"] == pytest.approx(climb.loc["rope", "change"] + climb.loc["rmsnorm", "change"])
    assert climb.loc["rmsnorm", "cumulative"] == pytest.approx(np.mean([-0.15, -0.15, -0.1]))
    assert climb.loc["rmsnorm", "cumulative_low"] < climb.loc["rmsnorm", "cumulative"] < climb.loc["rmsnorm", "cumulative_high"]
    assert climb.loc["gpt2", "cumulative"] == 0 and climb.loc["rope", "cumulative_n"] == 3


def test_runs_planned_but_never_run_leave_no_machine_and_no_crash():
    """An interrupted study (`--only` a subset): the other variants' tuning runs were planned, never run."""
    from bench.analysis import analyse

    runs = runs_frame({"a": [2.0, 2.05, 1.97], "b": [2.5, 2.56, 2.46]}, machine="laptop", kind="train", role="eval")
    planned = runs_frame({"c": [float("nan")]}, machine=None, kind="train", role="tune").assign(status="pending")
    spec = design({"name": "s", "baseline": "a", "variants": {"a": {}, "b": {}, "c": {}}})
    (part,) = analyse(pd.concat([runs, planned], ignore_index=True), spec)
    assert part.machine == "laptop" and [c.variant for c in part.summary.comparisons] == ["b"]
