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
