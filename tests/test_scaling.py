"""Scaling-law fits: Chinchilla Approaches 2 and 3, compute laws, multipliers."""

from __future__ import annotations

import numpy as np
import pytest

from bench import scaling

CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022
EPOCH = dict(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)  # Besiroglu et al. 2024


def surface(p, n, d):
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def grid():
    n = np.repeat([1e7, 3e7, 1e8, 3e8, 1e9], 5)
    d = np.tile([2e8, 6e8, 2e9, 6e9, 2e10], 5)
    return n, d


@pytest.mark.parametrize("truth", [CHINCHILLA, EPOCH], ids=["hoffmann", "epoch"])
def test_noise_free_data_recover_the_parameters_within_1e_4(truth):
    n, d = grid()
    fit = scaling.fit_parametric(n, d, surface(truth, n, d))
    for name, value in truth.items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-4), name
    assert fit.converged and not fit.start_on_grid_edge and fit.r2_log > 0.999999
    assert fit.exponent_a == pytest.approx(truth["beta"] / (truth["alpha"] + truth["beta"]), rel=1e-4)


def test_with_noise_the_truth_lies_inside_the_95_percent_bootstrap_interval_most_of_the_time():
    n, d = grid()
    inside = {name: 0 for name in CHINCHILLA}
    trials = 8
    for trial in range(trials):
        rng = np.random.default_rng(trial)
        noisy = surface(CHINCHILLA, n, d) * np.exp(rng.normal(0, 0.01, len(n)))
        fit = scaling.fit_parametric(n, d, noisy, n_bootstrap=80, seed=trial)
        for name, value in CHINCHILLA.items():
            low, high = fit.ci[name]
            inside[name] += low <= value <= high
    assert all(count >= 6 for count in inside.values()), inside


def test_the_summed_huber_objective_uses_delta_1e_3():
    n, d = grid()
    loss = surface(CHINCHILLA, n, d)
    fit = scaling.fit_parametric(n, d, loss * np.exp(np.r_[0.5, np.zeros(len(n) - 1)]))  # one wild point
    assert fit.A == pytest.approx(CHINCHILLA["A"], rel=0.05)  # Huber keeps the outlier from dragging the fit
    theta = np.log([CHINCHILLA["A"], CHINCHILLA["B"], CHINCHILLA["E"]]).tolist() + [0.34, 0.28]
    value, _ = scaling._objective(np.array(theta), np.log(n), np.log(d), np.log(loss) + 0.01, 1e-3)
    assert value == pytest.approx(len(n) * 1e-3 * (0.01 - 0.5e-3))  # linear branch, summed


def test_the_closed_form_frontier_equals_brute_force_minimisation():
    fit = scaling.fit_parametric(*grid(), surface(CHINCHILLA, *grid()))
    for compute in (1e19, 1e21, 1e23):
        n = np.geomspace(1e5, 1e13, 400_001)
        losses = fit.loss(n, compute / (6 * n))
        best = n[np.argmin(losses)]
        n_opt, d_opt = fit.optimal(compute)
        assert n_opt == pytest.approx(best, rel=1e-3)
        assert 6 * n_opt * d_opt == pytest.approx(compute)
        assert fit.frontier_loss(compute) == pytest.approx(losses.min(), rel=1e-9)


def make_fit(**p) -> scaling.ParametricFit:
    return scaling.ParametricFit(**p, objective=0.0, gradient_norm=0.0, converged=True, start_on_grid_edge=False,
                                 r2_log=1.0, residuals=np.array([]), n_range=(1e7, 1e9), d_range=(2e8, 2e10))


def test_a_variant_with_scaled_a_and_b_has_a_constant_compute_multiplier():
    base = make_fit(**CHINCHILLA)
    m_n, m_d = 1.3, 1.1
    better = make_fit(**{**CHINCHILLA, "A": CHINCHILLA["A"] * m_n ** -CHINCHILLA["alpha"],
                         "B": CHINCHILLA["B"] * m_d ** -CHINCHILLA["beta"]})
    for compute in (1e18, 1e21, 1e24):
        assert scaling.compute_multiplier(base, better, float(base.frontier_loss(compute))) == pytest.approx(m_n * m_d, rel=1e-6)
    assert m_n * m_d == pytest.approx(1.43)


def test_a_variant_with_another_beta_has_a_multiplier_that_changes_with_scale():
    base = make_fit(**CHINCHILLA)
    steeper = make_fit(**{**CHINCHILLA, "beta": 0.30})
    small, large = (scaling.multiplier_at(base, steeper, c).multiplier for c in (1e18, 1e24))
    assert abs(small - large) / small > 0.05
    assert scaling.multiplier_at(base, steeper, 1e24).extrapolated
    assert not scaling.multiplier_at(base, steeper, 6 * 1e8 * 2e9).extrapolated


def test_a_variant_that_never_reaches_the_loss_has_multiplier_zero():
    base = make_fit(**CHINCHILLA)
    flat = make_fit(**{**CHINCHILLA, "alpha": 0.01, "beta": 0.01})  # its frontier barely falls with compute
    assert scaling.multiplier_at(base, flat, 1e21).multiplier == 0.0


def test_the_multipliers_bootstrap_interval_covers_the_true_multiplier():
    n, d = grid()
    rng = np.random.default_rng(0)
    better = {**CHINCHILLA, "A": CHINCHILLA["A"] * 1.3 ** -CHINCHILLA["alpha"], "B": CHINCHILLA["B"] * 1.1 ** -CHINCHILLA["beta"]}
    fits = [scaling.fit_parametric(n, d, surface(p, n, d) * np.exp(rng.normal(0, 0.002, len(n))), n_bootstrap=40, seed=i)
            for i, p in enumerate((CHINCHILLA, better))]
    estimate = scaling.multiplier_at(*fits, 1e21)
    low, high = estimate.ci
    assert low <= 1.43 <= high and low <= estimate.multiplier <= high and high - low < 0.5


def test_approach_2_on_a_centred_isoflop_grid_recovers_the_exponent():
    truth = make_fit(**CHINCHILLA)
    n, d, losses, budgets = [], [], [], []
    for compute in (1e18, 1e19, 1e20, 1e21, 1e22):
        centre, _ = truth.optimal(compute)
        sizes = centre * np.geomspace(1 / 4, 4, 9)  # centred on the optimum
        n += list(sizes)
        d += list(compute / (6 * sizes))
        losses += list(truth.loss(sizes, compute / (6 * sizes)))
        budgets += [compute] * 9
    fit = scaling.fit_isoflop(n, d, losses, budgets)
    assert fit.exponent_a == pytest.approx(truth.exponent_a, abs=5e-3)
    assert fit.exponent_b == pytest.approx(truth.exponent_b, abs=5e-3)
    assert fit.r2_log > 0.9999 and len(fit.parabola_r2) == 5 and min(fit.parabola_r2) > 0.99


def test_the_compute_power_law_recovers_its_parameters():
    c = np.geomspace(1e15, 1e21, 12)
    law = scaling.fit_compute_law(c, 1.7 + 1e3 * c**-0.15)
    assert (law.E, law.gamma) == (pytest.approx(1.7, rel=1e-3), pytest.approx(0.15, rel=1e-3))
    assert law.K == pytest.approx(1e3, rel=1e-2) and law.r2_log > 0.9999
    assert np.abs(law.residuals).max() < 1e-4 and law.compute_range == (pytest.approx(1e15), pytest.approx(1e21))
    assert law.is_extrapolation(1e23) and not law.is_extrapolation(1e18)


def test_fits_warn_when_the_data_cannot_constrain_a_parameter():
    n = np.array([1e8] * 5)
    d = np.array([1e9, 2e9, 4e9, 8e9, 16e9])
    fit = scaling.fit_parametric(n, d, surface(CHINCHILLA, n, d))
    assert any("α and A are not constrained" in w for w in fit.warnings)
    assert fit.is_extrapolation(n=1e10)


def test_a_law_without_an_irreducible_loss_is_flagged():
    n, d = grid()
    fit = scaling.fit_parametric(n, d, 406.4 / n**0.34 + 410.7 / d**0.28, n_bootstrap=10)  # E = 0
    assert fit.E < 1e-3 and any("do not identify an irreducible loss" in w for w in fit.warnings)
    clean = scaling.fit_parametric(n, d, surface(CHINCHILLA, n, d), n_bootstrap=10)
    assert not clean.warnings


def test_convergence_is_judged_by_the_gradient_not_the_optimisers_flag(monkeypatch):
    def stops_at_once(fun, x0, args, **kwargs):  # claims success without moving
        value, _ = fun(x0, *args)
        return scaling.optimize.OptimizeResult(x=np.asarray(x0) + 0.05, fun=value, success=True)

    monkeypatch.setattr(scaling.optimize, "minimize", stops_at_once)
    n, d = grid()
    fit = scaling.fit_parametric(n, d, surface(CHINCHILLA, n, d))
    assert not fit.converged and any("did not converge" in w for w in fit.warnings)


# -- compute as the runs spent it: C = (training FLOPs per token) × D ------------------------------------

TOKENS_PER_STEP = 16 * 128  # batch × seq_len of a small CPU study


def flops_per_token(n):
    """6N plus what 6N leaves out (attention's scores, ...): 10–35% more at these sizes, like real models."""
    return 6 * n + 450 * np.sqrt(n)


def true_optimum(compute: float) -> float:
    """N minimising the CHINCHILLA loss at C = F(N)·D, by brute force."""
    n = np.geomspace(1e3, 1e8, 400_001)
    return float(n[np.argmin(surface(CHINCHILLA, n, compute / flops_per_token(n)))])


def flops_budgeted_sweep(budgets=(2.5e11, 5e11, 1e12)):
    """Seven sizes around the optimum per train.flops budget; each run's steps rounded up, as budget_steps does."""
    n, d, planned = [], [], []
    for budget in budgets:
        for size in true_optimum(budget) * np.geomspace(1 / 4, 4, 7):
            n.append(size)
            d.append(np.ceil(budget / (flops_per_token(size) * TOKENS_PER_STEP)) * TOKENS_PER_STEP)
            planned.append(budget)
    n, d = np.array(n), np.array(d)
    return n, d, surface(CHINCHILLA, n, d), np.array(planned)


def test_isoflop_runs_are_grouped_by_their_planned_budget_not_by_the_compute_they_spent():
    n, d, loss, planned = flops_budgeted_sweep()
    spent = flops_per_token(n) * d
    assert len({float(f"{c:.3g}") for c in spent}) > 3 and len({float(f"{c:.3g}") for c in 6 * n * d}) > 3
    keys = scaling.budget_keys(spent)  # without the plan: compute to 3 digits, split by the rounding of steps
    assert all(len(set(keys[planned == b])) > 1 for b in (2.5e11, 5e11, 1e12))
    assert scaling.budget_keys(spent, planned).tolist() == planned.tolist()
    fit = scaling.fit_isoflop(n, d, loss, compute=spent, budget=planned)
    assert fit.budgets.tolist() == [2.5e11, 5e11, 1e12] and fit.inside == [True] * 3 and not fit.skipped
    for budget, n_opt in zip(fit.budgets, fit.n_opt):
        assert n_opt == pytest.approx(true_optimum(budget), rel=0.03)
    truth = np.polyfit(np.log(fit.budgets), np.log([true_optimum(c) for c in fit.budgets]), 1)[0]
    assert fit.exponent_a == pytest.approx(truth, abs=0.01)
    k, p, _ = scaling.fit_flops_per_token(n, spent / d)
    assert fit.d_opt == pytest.approx(fit.budgets / (k * fit.n_opt**p)) and fit.exponent_b == pytest.approx(1 - p * fit.exponent_a)
    # runs without a planned FLOPs budget fall back to their compute, to 3 significant digits
    mixed = np.where(planned == 1e12, np.nan, planned)
    fallback = scaling.fit_isoflop(n, d, loss, compute=spent, budget=mixed)
    assert fallback.budgets[:2].tolist() == [2.5e11, 5e11]
    assert set(fallback.budgets[2:]) <= set(scaling.budget_keys(spent[planned == 1e12]))


def test_flops_per_token_are_modelled_as_a_power_law_in_n():
    n = np.geomspace(1e4, 1e6, 5)
    assert scaling.fit_flops_per_token(n, 7 * n**0.9) == (pytest.approx(7), pytest.approx(0.9), pytest.approx(0, abs=1e-12))
    k, p, miss = scaling.fit_flops_per_token(n, 6 * n)
    assert (k, p, miss) == (pytest.approx(6), pytest.approx(1), pytest.approx(0, abs=1e-12))
    n = flops_budgeted_sweep()[0]  # 23k–660k parameters: within 5% of a power law
    k, p, miss = scaling.fit_flops_per_token(n, flops_per_token(n))
    assert p < 1 and 0 < miss < scaling.FLOPS_LAW_TOLERANCE


def test_the_frontier_under_measured_flops_per_token_equals_brute_force_minimisation():
    fit = make_fit(**CHINCHILLA, flops_k=21.7, flops_p=0.908)  # F(N) = 21.7·N^0.908, not 6N
    assert fit.exponent_a == pytest.approx(0.28 / (0.34 + 0.908 * 0.28)) and fit.exponent_b == pytest.approx(1 - 0.908 * fit.exponent_a)
    for compute in (1e11, 1e12, 1e14):
        n = np.geomspace(1e2, 1e9, 400_001)
        losses = fit.loss(n, compute / fit.flops_per_token(n))
        n_opt, d_opt = fit.optimal(compute)
        assert n_opt == pytest.approx(n[np.argmin(losses)], rel=1e-3)
        assert fit.compute(n_opt, d_opt) == pytest.approx(compute)
        assert fit.frontier_loss(compute) == pytest.approx(losses.min(), rel=1e-9)
    # Approach 3 takes F from the runs: the parameters of L(N, D) do not change, the frontier does
    n, d, loss, _ = flops_budgeted_sweep()
    plain, measured = (scaling.fit_parametric(n, d, loss, flops_per_token=f) for f in (None, flops_per_token(n)))
    assert (plain.flops_k, plain.flops_p) == (6.0, 1.0) and measured.A == pytest.approx(plain.A, rel=1e-6)
    assert (measured.flops_k, measured.flops_p) == scaling.fit_flops_per_token(n, flops_per_token(n))[:2]
    n_opt, d_opt = measured.optimal(1e12)
    assert n_opt == pytest.approx(true_optimum(1e12), rel=0.05) and measured.compute(n_opt, d_opt) == pytest.approx(1e12)
    assert measured.compute_for_loss(float(measured.frontier_loss(1e12))) == pytest.approx(1e12, rel=1e-6)
    assert not measured.warnings


def test_a_variant_costing_twice_the_flops_per_token_for_the_same_loss_has_multiplier_one_half():
    n, d, loss, _ = flops_budgeted_sweep()
    base = scaling.fit_parametric(n, d, loss, flops_per_token=flops_per_token(n), n_bootstrap=5)
    costly = scaling.fit_parametric(n, d, loss, flops_per_token=2 * flops_per_token(n), n_bootstrap=5)
    estimate = scaling.multiplier_at(base, costly, 1e12)
    assert estimate.multiplier == pytest.approx(0.5, rel=1e-6) and estimate.ci == (pytest.approx(0.5), pytest.approx(0.5))
