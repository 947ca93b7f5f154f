"""The tests behind the verdicts: exact p-values and intervals, TOST, Holm–Shaffer, the MDE, and
A/A calibration: for every test option, at 2..8 seeds fixed and adaptive, the rate of false
better/worse verdicts (no true difference) and of false equivalent verdicts (a true difference of
exactly the margin) stays at or below α + 1%, for the noise shapes the study metrics have."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
from scipy import stats

from bench.analysis import judge, pending
from bench.metrics import MetricSpec
from bench.stats import (
    Design, holm, holm_shaffer, minimum_detectable, paired_t, pocock_spending, sign_flip, t_test_power, welch,
)

LOSS = MetricSpec(name="val_loss")
ALPHA = 0.05


# -- single tests ---------------------------------------------------------------------------------------


def test_the_paired_t_test_and_its_tost_agree_with_scipy():
    d = np.array([0.012, -0.004, 0.009, 0.015, 0.003])
    t = paired_t(d, margin=0.02)
    assert t.p == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
    low, high = stats.t.interval(0.95, 4, loc=d.mean(), scale=stats.sem(d))
    assert (t.ci_low, t.ci_high) == (pytest.approx(low), pytest.approx(high))
    tost = max(stats.ttest_1samp(d, -0.02, alternative="greater").pvalue,
               stats.ttest_1samp(d, 0.02, alternative="less").pvalue)
    assert t.p_equivalent == pytest.approx(tost)
    assert math.isnan(paired_t(d).p_equivalent)  # margin 0: no equivalence hypothesis


def test_zero_variance_is_untestable_not_decided():
    same = paired_t([0.0, 0.0, 0.0])  # accuracy 1.0 on every seed of both
    assert math.isnan(same.p) and math.isnan(same.p_equivalent) and math.isnan(same.ci_low)
    assert "zero variance" in same.untestable
    shifted = paired_t([0.25, 0.25])
    assert math.isnan(shifted.p) and shifted.delta == 0.25 and "exactly +0.25" in shifted.untestable
    assert "a test needs two" in paired_t([0.1]).untestable and math.isnan(welch([1.0], [2.0, 2.1]).p)
    assert "zero variance" in welch([1.0, 1.0], [2.0, 2.0]).untestable
    # an exact test needs no variance: every seed moving the same way has probability 2/2^n under the null
    assert sign_flip([0.25] * 8).p == pytest.approx(2 / 2**8) and sign_flip([0.0] * 4).p == 1.0


def brute_force_sign_flip(d: np.ndarray, null: float = 0.0) -> float:
    """Two-sided p of the mean of d − null over every sign pattern, written out the slow way."""
    y = d - null
    flips = [abs(np.mean(np.array(signs) * y)) for signs in itertools.product((1, -1), repeat=len(y))]
    return float(np.mean(np.array(flips) >= abs(y.mean()) - 1e-12))


def test_the_sign_flip_test_is_exact_and_its_interval_inverts_it():
    rng = np.random.default_rng(3)
    for n in (2, 3, 5, 6, 8):
        d = rng.normal(0.01, 0.01, n)
        test = sign_flip(d, margin=0.02)
        assert test.p == pytest.approx(brute_force_sign_flip(d))
        assert test.p >= 2 / 2**n  # the smallest p n seeds can give
        if n <= 5:  # 2/2^n ≥ 0.0625: no 95% interval is finite
            assert (test.ci_low, test.ci_high) == (-math.inf, math.inf)
            continue
        # just inside the interval the one-sided test does not reject at 2.5%; just outside it does
        for bound, side in ((test.ci_low, "greater"), (test.ci_high, "less")):
            inside = bound + (1e-9 if side == "greater" else -1e-9)
            outside = bound - (1e-6 if side == "greater" else -1e-6)
            one_sided = lambda null: _one_sided(d, null, side)  # noqa: E731
            assert one_sided(inside) > 0.025 and one_sided(outside) <= 0.025
        # TOST: the larger one-sided p against ±margin, each by enumeration
        assert test.p_equivalent == pytest.approx(max(_one_sided(d, -0.02, "greater"), _one_sided(d, 0.02, "less")))
    big = sign_flip(rng.normal(0.3, 1.0, 20))  # Monte Carlo beyond 12 seeds: close to the exact answer
    assert big.test == "sign-flip permutation" and 0 < big.p <= 1


def _one_sided(d: np.ndarray, null: float, alternative: str) -> float:
    y = d - null
    means = np.array([np.mean(np.array(s) * y) for s in itertools.product((1, -1), repeat=len(y))])
    return float(np.mean(means >= y.mean() - 1e-12) if alternative == "greater" else np.mean(means <= y.mean() + 1e-12))


def test_welch_agrees_with_scipy():
    a, b = [2.31, 2.35, 2.29, 2.40, 2.33], [2.41, 2.45, 2.38, 2.47]
    result = welch(a, b)
    reference = stats.ttest_ind(a, b, equal_var=False)
    assert result.p == pytest.approx(reference.pvalue) and result.df == pytest.approx(reference.df)
    low, high = reference.confidence_interval(0.95)
    assert (result.ci_low, result.ci_high) == (pytest.approx(low), pytest.approx(high))


# -- multiplicity and power ---------------------------------------------------------------------------


def test_holm_on_a_hand_worked_example():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.2, math.nan, 0.01])  # no test: not counted among the comparisons
    assert adjusted[0] == pytest.approx(0.2) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)


def test_holm_shaffer_counts_one_possibly_true_null_per_comparison():
    # two comparisons, each with a difference p and an equivalence p: sorted 0.001 (c0 eq), 0.01 (c1 diff),
    # 0.02 (c0 diff), 0.3 (c1 eq). Multipliers: 2 (both open), 2 (c0's diff still open, c1 open), 1 (c1's eq
    # left only... c0 done? no: c0's diff is this one, c1's eq open) → 2, then 1.
    diff, eq = holm_shaffer([0.02, 0.01], [0.001, 0.3])
    assert eq[0] == pytest.approx(0.002) and diff[1] == pytest.approx(0.02)
    assert diff[0] == pytest.approx(0.04) and eq[1] == pytest.approx(0.3)
    # plain Holm over all four would have multiplied by 4, 3, 2, 1
    assert holm([0.02, 0.01, 0.001, 0.3]) == pytest.approx([0.04, 0.03, 0.004, 0.3])
    # a comparison that could not be tested still counts in the family
    diff, _ = holm_shaffer([0.01, math.nan], [math.nan, math.nan])
    assert diff[0] == pytest.approx(0.02)


def test_the_minimum_detectable_effect_has_the_power_it_claims():
    for df, level in ((7, 0.05), (3, 0.01), (2, 0.05)):
        critical = stats.t.ppf(1 - level / 2, df)
        for noncentrality in (1.0, 3.0, 6.0):
            exact = stats.nct.sf(critical, df, noncentrality) + stats.nct.cdf(-critical, df, noncentrality)
            assert t_test_power(noncentrality, df, level) == pytest.approx(exact, abs=1e-6)
    se = 0.002 / math.sqrt(8)
    mde = minimum_detectable(se, 7, 0.05)
    rng = np.random.default_rng(0)
    found = stats.ttest_1samp(rng.normal(mde, 0.002, size=(20_000, 8)), 0.0, axis=1).pvalue < 0.05
    assert found.mean() == pytest.approx(0.8, abs=0.01)
    assert math.isnan(minimum_detectable(0.0, 3, 0.05))


def test_the_mde_is_what_holm_leaves_detectable():
    rng = np.random.default_rng(5)
    base = {s: 2.0 + rng.normal(0, 0.03) for s in range(5)}
    values = {"base": base, **{v: {s: x + rng.normal(0, 0.01) for s, x in base.items()} for v in "abcd"}}
    comparisons = judge(values, [(v, "base") for v in "abcd"], LOSS, Design())
    for c in comparisons:
        se = c.sd / math.sqrt(5)
        assert c.mde == pytest.approx(minimum_detectable(se, 4, 0.05 / 4))
        assert c.mde > 1.4 * minimum_detectable(se, 4, 0.05)  # 0.0277 against 0.0188 at sd 0.01 (the review's numbers)


def test_looks_spend_alpha_once_in_total():
    design = Design(min_seeds=2, max_seeds=8)
    looks = design.looks(8)
    assert [n for n, _ in looks] == [2, 3, 4, 5, 6, 7, 8]
    assert sum(level for _, level in looks) == pytest.approx(0.05)
    assert looks[0][1] == pytest.approx(0.05 * pocock_spending(2 / 8))
    assert Design().looks(5) == [(5, 0.05)]


# -- verdicts that are not decisions --------------------------------------------------------------------


def test_equivalence_is_a_test_inside_the_error_budget():
    d = {s: 0.003 + 0.001 * ((s % 3) - 1) for s in range(6)}  # tight, well inside ±0.01
    base = {s: 1.9 + 0.01 * s for s in range(6)}
    (c,) = judge({"a": {s: base[s] + d[s] for s in d}, "b": base}, [("a", "b")], LOSS, Design(margin=0.01))
    assert c.verdict == "equivalent" and c.p_equivalent_adjusted < 0.05
    assert "TOST adjusted p" in c.sentence() and "detectable" in c.sentence()  # Δ ≠ 0 is significant, yet small
    (c,) = judge({"a": {s: base[s] + d[s] for s in d}, "b": base}, [("a", "b")], LOSS, Design(margin=0.0))
    assert c.verdict == "worse" and math.isnan(c.p_equivalent)  # margin 0: never equivalent


def test_a_saturated_task_says_so_instead_of_equivalent():
    accuracy = MetricSpec(name="val_accuracy")
    full = {s: 1.0 for s in range(4)}
    (c,) = judge({"gqa": dict(full), "mha": dict(full)}, [("gqa", "mha")], accuracy, Design(bound=0.995))
    assert c.verdict == "saturated" and "cannot tell them apart" in c.sentence() and "no evidence" in c.sentence()
    assert pending([c]) == set()  # more seeds would not help
    nearly = {**full, 3: 0.31}  # one seed that did not learn: not saturated, and testable
    (c,) = judge({"gqa": nearly, "mha": full}, [("gqa", "mha")], accuracy, Design(bound=0.995))
    assert c.verdict == "inconclusive" and c.needs_seeds
    floor = MetricSpec(name="val_loss")  # a loss at the floor the study states
    (c,) = judge({"a": {0: 0.101, 1: 0.1}, "b": {0: 0.1, 1: 0.1}}, [("a", "b")], floor, Design(bound=0.11))
    assert c.verdict == "saturated"


def test_failed_and_diverged_seeds_count_against_the_comparison():
    values = {"a": {0: 1.5, 1: 1.52}, "b": {0: 2.0, 1: 2.03, 2: 2.01, 3: 1.99}}
    (c,) = judge(values, [("a", "b")], LOSS, Design(), problems={"a": "2 of 4 seeds of a diverged"})
    assert c.verdict == "inconclusive" and "2 of 4 seeds of a diverged" in c.sentence() and not c.needs_seeds
    assert math.isnan(c.p_adjusted)


def test_a_verdict_reached_at_an_earlier_look_states_that_looks_numbers_and_the_later_seeds():
    # adaptive 3..6: three seeds agree (Δ ≈ +0.033); seeds 3..5, trained later (for other comparisons),
    # hold one where the reference failed to learn: over all six the CI includes 0
    accuracy = MetricSpec(name="val_accuracy")
    reference = {0: 0.780, 1: 0.784, 2: 0.752, 3: 0.354, 4: 0.786, 5: 0.752}
    variant = {0: 0.812, 1: 0.814, 2: 0.790, 3: 0.764, 4: 0.896, 5: 0.758}
    (c,) = judge({"frozen": variant, "linear": reference}, [("frozen", "linear")], accuracy,
                 Design(margin=0.0, min_seeds=3, max_seeds=6))
    assert c.verdict == "better" and c.n == 6 and c.ci_low < 0  # all six seeds alone would not say so
    first = paired_t(np.array([variant[s] - reference[s] for s in range(3)]))
    assert c.decided_at == {"n": 3, "delta": pytest.approx(first.delta), "ci_low": pytest.approx(first.ci_low),
                            "ci_high": pytest.approx(first.ci_high)}
    sentence = c.sentence()
    assert f"by {first.delta:.3g} accuracy" in sentence and "over the first 3 seeds, the look that decided it" in sentence
    assert "over all 6 seeds Δ +0.104" in sentence
    from bench.report.figures import forest  # the report's picture draws the look that decided it, too

    assert "frozen − linear (its 3-seed look)" in str(forest([c], "val_accuracy", 0.0, True))
    from bench.formatting import significant
    from bench.report import _decided  # and its verdict table's row says which numbers are which

    low, high = (significant(v, 3, sign=True) for v in (first.ci_low, first.ci_high))
    assert _decided(c) == (f"decided at its 3-seed look: Δ {significant(first.delta, 3, sign=True)}, 95% CI {low} to "
                           f"{high}; this row is all 6 seeds")
    (fixed,) = judge({"frozen": variant, "linear": reference}, [("frozen", "linear")], accuracy, Design(margin=0.0))
    assert fixed.decided_at is None and fixed.verdict == "inconclusive"  # one look, at all six seeds


def test_censored_values_give_no_equivalence_and_bound_the_difference():
    steps = MetricSpec(name="tokens_to_target", target=1.0)
    budget = {s: 1000.0 for s in range(6)}  # a never reached the target: its values are lower bounds
    close = {s: 990.0 + 2 * s for s in range(6)}  # b reached it just before the end
    (c,) = judge({"a": budget, "b": close}, [("a", "b")], steps, Design(margin=50), censored={"a": set(range(6))})
    assert c.verdict != "equivalent" and math.isnan(c.p_equivalent) and c.censored == 6
    assert c.verdict == "worse" and "by at least 5" in c.sentence() and "never reached the target" in c.sentence()
    noisy = {s: 990.0 + 8 * (-1) ** s * s for s in range(6)}
    (c,) = judge({"a": budget, "b": noisy}, [("a", "b")], steps, Design(margin=50), censored={"a": set(range(6))})
    assert c.verdict == "inconclusive" and "no equivalence is claimed from censored values" in c.sentence()


# -- A/A calibration ------------------------------------------------------------------------------------

NOISE = {  # paired-difference shapes of the study metrics, each scaled to sd 1
    "normal (final loss, online loss)": lambda rng, size: rng.normal(0, 1, size),
    "heavy-tailed (a seed that trains badly)": lambda rng, size: rng.standard_t(3, size) / math.sqrt(3),
    "discrete (accuracy on 64 answers)": lambda rng, size: (rng.binomial(64, 0.7, size) - rng.binomial(64, 0.7, size)) / 5.2,
}


def run_study(rng, design: Design, delta: float, noise, seeds: int, comparisons: int = 1, censor_at: float | None = None):
    """One study as the runner runs it: every variant starts with min seeds (fixed: all); with adaptive
    seeds, the variants of comparisons still open get one more seed at a time, up to max."""
    seed_effect = 10.0 + 3 * rng.normal(0, 1, seeds)  # shared by every variant
    names = [f"v{i}" for i in range(comparisons)]
    shifts = {"base": 0.0, **{v: delta[i] if isinstance(delta, list) else delta for i, v in enumerate(names)}}
    full = {v: seed_effect + shift + noise(rng, seeds) / math.sqrt(2) for v, shift in shifts.items()}  # Δ's sd: 1
    censored = {}
    if censor_at is not None:  # tokens to target: a run that never reaches it reports its budget
        censored = {v: {s for s in range(seeds) if x[s] >= censor_at} for v, x in full.items()}
        full = {v: np.minimum(x, censor_at) for v, x in full.items()}
    counts = dict.fromkeys(full, design.min_seeds or seeds)
    metric = MetricSpec(name="tokens_to_target", target=1.0) if censor_at is not None else LOSS
    while True:
        values = {v: {s: float(full[v][s]) for s in range(counts[v])} for v in full}
        results = judge(values, [(v, "base") for v in names], metric, design, censored=censored)
        more = pending(results)
        if not design.adaptive or not more or counts["base"] >= design.max_seeds:
            return results, sum(counts.values())
        for v in more:
            counts[v] += 1


def false_rates(design: Design, studies: int, seed: int, noise=NOISE["normal (final loss, online loss)"],
                seeds: int = 8, comparisons: int = 1, delta=0.0, censor_at=None) -> tuple[Counter, float]:
    rng = np.random.default_rng(seed)
    verdicts, any_false, trained = Counter(), 0, []
    for _ in range(studies):
        results, n = run_study(rng, design, delta, noise, seeds, comparisons, censor_at)
        verdicts.update(c.verdict for c in results)
        trained.append(n)
        wrong = ("better", "worse") if delta == 0 else ("equivalent",)
        any_false += any(c.verdict in wrong for c in results)
    return verdicts, any_false / studies


@pytest.mark.parametrize("test", ["t", "permutation"])
def test_no_difference_gives_at_most_alpha_false_better_or_worse_at_every_seed_count(test):
    for seeds in range(2, 9):  # margin 0: nothing stops a comparison but a better/worse verdict
        _, rate = false_rates(Design(alpha=ALPHA, margin=0.0, paired_test=test), 2500, seeds, seeds=seeds)
        assert rate <= ALPHA + 0.01, (test, seeds, rate)
    _, rate = false_rates(Design(alpha=ALPHA, margin=0.0, paired_test=test, min_seeds=2, max_seeds=8), 1000, 11)
    assert rate <= ALPHA + 0.01, (test, "adaptive", rate)


@pytest.mark.parametrize("test", ["t", "permutation"])
def test_a_difference_of_exactly_the_margin_is_called_equivalent_at_most_alpha_of_the_time(test):
    margin = 1.0  # the noise's sd: equivalence is reachable at 8 seeds
    for seeds in range(2, 9):
        _, rate = false_rates(Design(alpha=ALPHA, margin=margin, paired_test=test), 2500, 20 + seeds, seeds=seeds,
                              delta=margin)
        assert rate <= ALPHA + 0.01, (test, seeds, rate)
    _, rate = false_rates(Design(alpha=ALPHA, margin=margin, paired_test=test, min_seeds=2, max_seeds=8), 1000, 31,
                          delta=margin)
    assert rate <= ALPHA + 0.01, (test, "adaptive", rate)


def test_the_calibration_would_catch_equivalence_decided_outside_the_budget(monkeypatch):
    # the old rule: the 95% CI inside ±margin, at every look: ~2.5% per look, compounded over the looks
    import bench.analysis as analysis

    real = analysis.compare

    def per_look_ci(variant, reference, design, equivalence=True):
        test, p, p_eq, level = real(variant, reference, design, equivalence)
        shared = sorted(set(variant) & set(reference))
        looks = [paired_t([variant[s] - reference[s] for s in shared[:k]], design.margin) for k in range(2, len(shared) + 1)]
        inside = any(-design.margin < t.ci_low and t.ci_high < design.margin for t in looks if not t.untestable)
        return test, p, (0.0 if inside else 1.0, None), level

    monkeypatch.setattr(analysis, "compare", per_look_ci)
    _, rate = false_rates(Design(alpha=ALPHA, margin=1.0, min_seeds=2, max_seeds=8), 600, 31, delta=1.0)
    assert rate > ALPHA + 0.01


def test_four_comparisons_share_one_error_budget_for_every_kind_of_false_verdict():
    # two with no difference (a false verdict: better/worse), two at the margin (a false verdict: equivalent)
    design = Design(alpha=ALPHA, margin=1.0, min_seeds=2, max_seeds=8)
    rng = np.random.default_rng(41)
    false = 0
    studies = 400
    for _ in range(studies):
        results, _ = run_study(rng, design, [0.0, 0.0, 1.0, -1.0], NOISE["normal (final loss, online loss)"], 8, 4)
        by = {c.variant: c.verdict for c in results}
        false += by["v0"] in ("better", "worse") or by["v1"] in ("better", "worse") or "equivalent" in (by["v2"], by["v3"])
    assert false / studies <= ALPHA + 0.01


@pytest.mark.parametrize("shape", list(NOISE)[1:])
def test_each_metrics_noise_shape_passes_the_aa_calibration(shape):
    for test in ("t", "permutation"):
        _, rate = false_rates(Design(alpha=ALPHA, margin=0.0, paired_test=test), 2000, 7, NOISE[shape], seeds=4)
        assert rate <= ALPHA + 0.01, (shape, test, rate)


def test_censored_tokens_to_target_pass_the_aa_calibration():
    lognormal = lambda rng, size: rng.lognormal(0, 0.3, size)  # noqa: E731 - skewed times to a target
    for test in ("t", "permutation"):  # about a third of the runs never reach the target
        verdicts, rate = false_rates(Design(alpha=ALPHA, margin=0.0, paired_test=test), 2000, 8, lognormal, seeds=6,
                                     censor_at=11.5)
        assert verdicts["inconclusive"] > 0
        assert rate <= ALPHA + 0.01, (test, rate)


def test_a_true_difference_of_three_noise_sds_is_found_nine_times_in_ten():
    design = Design(alpha=ALPHA, margin=0.5, min_seeds=2, max_seeds=8)
    verdicts, _ = false_rates(design, 600, 2, delta=3.0)
    assert verdicts["worse"] / 600 >= 0.9 and verdicts["better"] == 0
    # and an A/A study with a margin mostly ends early, as equivalent
    rng = np.random.default_rng(3)
    trained, ends = [], Counter()
    for _ in range(200):
        results, n = run_study(rng, Design(alpha=ALPHA, margin=3.0, min_seeds=2, max_seeds=8), 0.0,
                               NOISE["normal (final loss, online loss)"], 8)
        trained.append(n)
        ends.update(c.verdict for c in results)
    assert ends["equivalent"] / 200 > 0.9 and ends["better"] + ends["worse"] == 0 and np.mean(trained) < 16


def test_a_look_with_zero_variance_does_not_decide_the_later_looks():
    # two seeds that moved by exactly the same amount, then a third that did not: the first look has no
    # p-value (before, p = 0 there made the comparison significant at every later look)
    design = Design(alpha=ALPHA, margin=0.0, min_seeds=2, max_seeds=8)
    reference = {0: 1.0, 1: 1.0, 2: 1.0}
    (c,) = judge({"a": {0: 1.25, 1: 1.25, 2: 0.9}, "b": reference}, [("a", "b")], LOSS, design)
    assert c.verdict == "inconclusive" and c.p_sequential > 0.5
