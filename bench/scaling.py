"""Scaling-law fits: Chinchilla's Approach 3 and Approach 2, a compute power law, compute multipliers.

Compute is what a run spent: C = F·D, with F the training FLOPs per token (forward + backward, every
matmul counted: attention's scores and the LM head too) and D the tokens trained; N is the parameters
a token uses (MoE: the active ones). Chinchilla's C = 6ND is the special case F = 6N. For the
compute-optimal frontier F is needed at untrained sizes, so it is modelled as a power law in N,
F(N) = k·N^p, fitted to the runs (k = 6, p = 1 without recorded FLOPs): the frontier keeps its
closed form, N_opt = G·(C/k)^a with a = β/(α + pβ).

Approach 3 (Hoffmann et al. 2022; Besiroglu et al. 2024): L(N, D) = E + A/N^α + B/D^β, fitted in
log space by minimising Σ Huber_δ(LSE(a − α·log N, b − β·log D, e) − log L) with δ = 1e-3 and
A = e^a, B = e^b, E = e^e; L-BFGS from every point of a grid (α, β ∈ {0, 0.5, …, 2}; e ∈ {−1, −0.5,
…, 1}; a, b ∈ {0, 5, …, 25}), the best kept. The Huber terms are summed — an average stops L-BFGS
early, which made the original intervals too narrow. Convergence is checked, not assumed: the
gradient at the optimum, and whether the best start sat on the edge of the grid.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

GRID = {
    "a": np.arange(0, 30, 5.0),
    "b": np.arange(0, 30, 5.0),
    "e": np.arange(-1, 1.5, 0.5),
    "alpha": np.arange(0, 2.5, 0.5),
    "beta": np.arange(0, 2.5, 0.5),
}
PARAMS = ("E", "A", "B", "alpha", "beta")


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss and its derivative."""
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    grad = np.where(small, r, delta * np.sign(r))
    return loss, grad


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """Summed Huber loss of log L against LSE(a − α log N, b − β log D, e), with its gradient."""
    loss, grad = _objective_batch(np.asarray(theta, dtype=float)[None], log_n, log_d, log_l, delta)
    return loss[0], grad[0]


@dataclass
class ParametricFit:
    """L(N, D) = E + A/N^α + B/D^β, with diagnostics and (optionally) bootstrap intervals."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    gradient_norm: float
    converged: bool
    start_on_grid_edge: bool
    r2_log: float  # R² of log L
    residuals: np.ndarray = field(repr=False)
    n_range: tuple[float, float] = (0.0, 0.0)
    d_range: tuple[float, float] = (0.0, 0.0)
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    bootstrap: list[dict[str, float]] = field(default_factory=list, repr=False)
    warnings: list[str] = field(default_factory=list)
    flops_k: float = 6.0  # the training FLOPs per token F(N) = k·N^p behind the frontier (6N: C = 6ND)
    flops_p: float = 1.0

    @property
    def params(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in PARAMS}

    def flops_per_token(self, n):
        """F(N) = k·N^p: the training FLOPs per token of a model with N (active) parameters."""
        return self.flops_k * np.power(n, self.flops_p)

    def compute(self, n, d):
        """C = F(N)·D."""
        return self.flops_per_token(n) * np.asarray(d, dtype=float)

    def loss(self, n, d):
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    # -- the compute-optimal frontier under C = k·N^p·D (Chinchilla: k = 6, p = 1) ------------------

    @property
    def exponent_a(self) -> float:
        """N_opt ∝ C^a with a = β/(α+pβ) (β/(α+β) under C = 6ND)."""
        return self.beta / (self.alpha + self.flops_p * self.beta)

    @property
    def exponent_b(self) -> float:
        """D_opt ∝ C^b with b = α/(α+pβ) = 1 − p·a."""
        return self.alpha / (self.alpha + self.flops_p * self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.flops_p * self.beta * self.B)) ** (1 / (self.alpha + self.flops_p * self.beta))

    def optimal(self, compute):
        """(N_opt, D_opt) = (G·(C/k)^a, G^−p·(C/k)^b): minimises L(N, D) subject to k·N^p·D = C."""
        c = np.asarray(compute, dtype=float) / self.flops_k
        return self.G * c**self.exponent_a, c**self.exponent_b / self.G**self.flops_p

    def frontier_loss(self, compute):
        n, d = self.optimal(compute)
        return self.loss(n, d)

    def compute_for_loss(self, loss: float) -> float:
        """The compute C at which the frontier reaches `loss` (inf at or below E)."""
        if loss <= self.E:
            return math.inf
        f = lambda log_c: float(self.frontier_loss(math.exp(log_c))) - loss  # noqa: E731
        lo, hi = 0.0, 200.0
        if f(lo) < 0:
            return math.exp(lo)
        if f(hi) > 0:  # not reached below e^200 FLOPs: as good as never
            return math.inf
        return math.exp(optimize.brentq(f, lo, hi, xtol=1e-12))

    def is_extrapolation(self, n=None, d=None) -> bool:
        outside = lambda x, r: x is not None and not (r[0] * 0.999 <= x <= r[1] * 1.001)  # noqa: E731
        return outside(n, self.n_range) or outside(d, self.d_range)


def _objective_batch(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """The objective of K parameter vectors (a, b, e, α, β) at once: theta (K, 5) → losses (K,), gradients (K, 5)."""
    a, b, e, alpha, beta = (theta[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(theta), len(log_n)))])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    softmax = weights / total
    loss, dloss = _huber(top + np.log(total) - log_l, delta)
    grad = np.stack([
        (dloss * softmax[0]).sum(1), (dloss * softmax[1]).sum(1), (dloss * softmax[2]).sum(1),
        -(dloss * softmax[0] * log_n).sum(1), -(dloss * softmax[1] * log_d).sum(1),
    ], axis=1)
    return loss.sum(1), grad


def batched_lbfgs(fun, x0: np.ndarray, max_iter: int = 300, memory: int = 10, gtol: float = 1e-8,
                  ftol: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Independent L-BFGS runs from every row of x0, advanced together (each with its own history
    and backtracking Armijo line search): the grid search of Approach 3 at numpy speed."""
    x = x0.astype(float).copy()
    f, g = fun(x)
    k, dim = x.shape
    S, Y, rho = np.zeros((memory, k, dim)), np.zeros((memory, k, dim)), np.zeros((memory, k))
    active = np.ones(k, dtype=bool)
    for it in range(max_iter):
        # two-loop recursion over the stored pairs (rho = 0 marks an empty or skipped pair)
        q = g.copy()
        alphas = np.zeros((memory, k))
        order = [(it - 1 - j) % memory for j in range(min(it, memory))]
        for i in order:
            alphas[i] = rho[i] * (S[i] * q).sum(1)
            q -= alphas[i][:, None] * Y[i]
        if order:
            last = order[0]
            yy = (Y[last] ** 2).sum(1)
            gamma = np.where((rho[last] > 0) & (yy > 0), (S[last] * Y[last]).sum(1) / np.where(yy > 0, yy, 1), 1.0)
        else:
            gamma = np.full(k, 1e-3)  # a cautious first step
        r = gamma[:, None] * q
        for i in reversed(order):
            r += S[i] * (alphas[i] - rho[i] * (Y[i] * r).sum(1))[:, None]
        direction = -r
        slope = (g * direction).sum(1)
        uphill = slope >= 0
        direction[uphill], slope[uphill] = -g[uphill], -(g[uphill] ** 2).sum(1)
        # backtracking line search, per run, evaluating only the runs still searching
        step = np.ones(k)
        accepted = ~active
        x_new, f_new, g_new = x.copy(), f.copy(), g.copy()
        for _ in range(40):
            searching = np.flatnonzero(~accepted)
            if not len(searching):
                break
            trial = x[searching] + step[searching, None] * direction[searching]
            f_trial, g_trial = fun(trial)
            ok = np.isfinite(f_trial) & (f_trial <= f[searching] + 1e-4 * step[searching] * slope[searching])
            hit = searching[ok]
            x_new[hit], f_new[hit], g_new[hit] = trial[ok], f_trial[ok], g_trial[ok]
            accepted[hit] = True
            step[searching[~ok]] *= 0.5
        moved = accepted & active
        s, y = x_new - x, g_new - g
        sy = (s * y).sum(1)
        slot = it % memory
        keep = moved & (sy > 1e-18)
        S[slot], Y[slot] = np.where(keep[:, None], s, 0), np.where(keep[:, None], y, 0)
        rho[slot] = np.where(keep, 1 / np.where(keep, sy, 1), 0)
        done = active & (~moved | (np.abs(g_new).max(1) < gtol) |
                         (np.abs(f - f_new) <= ftol * np.maximum(1.0, np.maximum(np.abs(f), np.abs(f_new)))))
        x, f, g = np.where(moved[:, None], x_new, x), np.where(moved, f_new, f), np.where(moved[:, None], g_new, g)
        active &= ~done
        if not active.any():
            break
    return x, f


def _fit_once(log_n, log_d, log_l, delta, starts: np.ndarray):
    """L-BFGS from every start (batched), then the best polished with scipy's L-BFGS-B."""
    fun = lambda theta: _objective_batch(theta, log_n, log_d, log_l, delta)  # noqa: E731
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            x, f = batched_lbfgs(fun, starts)
    f = np.where(np.isfinite(f), f, np.inf)
    best = int(np.argmin(f))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = optimize.minimize(_objective, x[best], args=(log_n, log_d, log_l, delta), jac=True,
                                   method="L-BFGS-B", options={"maxiter": 2000, "gtol": 1e-14, "ftol": 1e-16})
    # the start that found the optimum: prefer an interior one when several tie
    tied = np.flatnonzero(f <= f[best] + 1e-9 * max(1.0, abs(f[best])))
    interior = [i for i in tied if not _on_edge(starts[i])]
    basins = x[np.argsort(f)[:16]]  # where the best runs ended: starts for bootstrap refits
    return result, starts[interior[0] if interior else best], basins


def _grid_starts() -> np.ndarray:
    return np.array(list(itertools.product(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"])))


GRID_NAMES = ("a", "b", "e", "alpha", "beta")
CONVERGED_GRADIENT = 1e-5  # gradient norm of the summed Huber objective at an accepted optimum


def _on_edge(start: np.ndarray) -> bool:
    return any(value in (GRID[n][0], GRID[n][-1]) for n, value in zip(GRID_NAMES, start))


def _outside_grid(theta: np.ndarray) -> list[str]:
    """The parameters whose fitted value lies beyond the initialisation grid (by more than one grid step)."""
    out = []
    for name, value in zip(GRID_NAMES, theta):
        grid = GRID[name]
        step = grid[1] - grid[0]
        if value < grid[0] - step or value > grid[-1] + step:
            out.append(name)
    return out


FLOPS_LAW_TOLERANCE = 0.05  # a fit warns when F(N) = k·N^p misses a run's FLOPs per token by more


def fit_flops_per_token(n_params, flops_per_token) -> tuple[float, float, float]:
    """F(N) = k·N^p through the runs' (N, training FLOPs per token), least squares in log space.
    Returns (k, p, the largest relative error at a run); one model size: p = 1."""
    n, f = np.asarray(n_params, dtype=float), np.asarray(flops_per_token, dtype=float)
    if len(np.unique(n)) < 2:
        p, k = 1.0, float(np.exp(np.mean(np.log(f / n))))
    else:
        p, log_k = np.polyfit(np.log(n), np.log(f), 1)
        p, k = float(p), float(np.exp(log_k))
    return k, p, float(np.max(np.abs(k * n**p / f - 1)))


def fit_parametric(n_params, n_tokens, loss, huber_delta: float = 1e-3, n_bootstrap: int = 0,
                   seed: int = 0, confidence: float = 0.95, flops_per_token=None) -> ParametricFit:
    """Chinchilla Approach 3. n_bootstrap > 0 adds percentile CIs from refits on resampled points.
    flops_per_token (per run; default 6N) sets the frontier's compute, C = F(N)·D with F = k·N^p
    fitted to them (``fit_flops_per_token``); L(N, D) itself does not depend on it."""
    n, d, l_ = (np.asarray(x, dtype=float) for x in (n_params, n_tokens, loss))
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(l_)
    result, start, basins = _fit_once(log_n, log_d, log_l, huber_delta, _grid_starts())
    a, b, e, alpha, beta = result.x
    _, grad = _objective(result.x, log_n, log_d, log_l, huber_delta)
    predicted = np.logaddexp.reduce(np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)]), axis=0)
    residuals = log_l - predicted
    total = ((log_l - log_l.mean()) ** 2).sum()
    fit = ParametricFit(
        E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, objective=float(result.fun),
        # the optimiser's success flag alone is not trusted: the gradient must have vanished
        gradient_norm=float(np.linalg.norm(grad)), converged=bool(np.linalg.norm(grad) < CONVERGED_GRADIENT),
        start_on_grid_edge=_on_edge(start), r2_log=float(1 - (residuals**2).sum() / total) if total > 0 else float("nan"),
        residuals=residuals, n_range=(n.min(), n.max()), d_range=(d.min(), d.max()),
    )
    if flops_per_token is not None:
        fit.flops_k, fit.flops_p, miss = fit_flops_per_token(n, flops_per_token)
        if miss > FLOPS_LAW_TOLERANCE:
            fit.warnings.append(f"the FLOPs per token depart from k·N^p by up to {100 * miss:.0f}% at a run: "
                                "the frontier's compute is approximate")
    if not fit.converged:
        fit.warnings.append(f"L-BFGS did not converge (gradient norm {fit.gradient_norm:.2g})")
    if fit.start_on_grid_edge:
        fit.warnings.append("the best start lies on the edge of the initialisation grid: widen the grid")
    outside = _outside_grid(result.x)
    if "e" in outside and e < GRID["e"][0]:
        fit.warnings.append(f"E was driven to {fit.E:.2g}: these points do not identify an irreducible loss, "
                            "so A, B, α and β describe a local power law only")
    elif outside:
        fit.warnings.append(f"{', '.join(outside)} ended far outside the initialisation grid: check the fit")
    if len(np.unique(n)) < 3:
        fit.warnings.append("fewer than 3 model sizes: α and A are not constrained")
    if len(np.unique(d)) < 3:
        fit.warnings.append("fewer than 3 token budgets: β and B are not constrained")
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        # each refit starts from the full fit and the 16 best basins the grid search found
        near = np.vstack([result.x, basins])
        for _ in range(n_bootstrap):
            idx = rng.integers(0, len(n), len(n))
            r, _, _ = _fit_once(log_n[idx], log_d[idx], log_l[idx], huber_delta, near)
            fit.bootstrap.append(dict(zip(PARAMS, (math.exp(r.x[2]), math.exp(r.x[0]), math.exp(r.x[1]), r.x[3], r.x[4]))))
        tail = 100 * (1 - confidence) / 2
        for p in PARAMS:
            values = [s[p] for s in fit.bootstrap]
            fit.ci[p] = (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
            low, high = fit.ci[p]
            # exponents: a CI wider than 1; scales (E, A, B): wider than a factor of 100
            loose = high - low > 1.0 if p in ("alpha", "beta") else high > 100 * max(low, 1e-300)
            if loose:
                fit.warnings.append(f"{p} is poorly constrained by these points (95% CI {low:.3g}–{high:.3g})")
    return fit


def bootstrap_fits(fit: ParametricFit) -> list[ParametricFit]:
    """The bootstrap refits as fit objects (for intervals on derived quantities)."""
    return [ParametricFit(**s, objective=float("nan"), gradient_norm=float("nan"), converged=True,
                          start_on_grid_edge=False, r2_log=float("nan"), residuals=np.array([]),
                          flops_k=fit.flops_k, flops_p=fit.flops_p)
            for s in fit.bootstrap]


# -- Approach 2: IsoFLOP parabolas -----------------------------------------------------------------


@dataclass
class IsoFlopFit:
    budgets: np.ndarray  # compute of each IsoFLOP curve: its planned budget, or its runs' compute to 3 digits
    n_opt: np.ndarray  # the parabola's minimum per budget
    d_opt: np.ndarray
    exponent_a: float  # N_opt ∝ C^a
    exponent_b: float  # D_opt ∝ C^b
    r2_log: float = float("nan")  # of the straight line log N_opt against log C
    parabolas: list[np.ndarray] = field(repr=False, default_factory=list)  # loss = p(log N) per budget
    parabola_r2: list[float] = field(default_factory=list)  # each parabola's R² against its points
    inside: list[bool] = field(default_factory=list)  # whether N_opt lies within the budget's trained sizes
    skipped: dict[float, str] = field(default_factory=dict)  # budget → why it has no parabola


def budget_keys(compute, budget=None) -> np.ndarray:
    """The IsoFLOP curve of each run: its planned budget (the spec's train.flops) where it has one —
    the compute it spent differs by the rounding of its steps — else its compute to 3 significant digits."""
    c = np.asarray(compute, dtype=float)
    planned = np.full(len(c), np.nan) if budget is None else np.asarray(budget, dtype=float)
    return np.array([float(f"{b:.6g}") if np.isfinite(b) else float(f"{x:.3g}") for b, x in zip(planned, c)])


def fit_isoflop(n_params, n_tokens, loss, compute=None, budget=None) -> IsoFlopFit:
    """Chinchilla Approach 2: for each compute budget, a parabola of loss against log N; then a
    straight line through (log C, log N_opt). Compute is per run (default 6ND); runs are grouped by
    ``budget_keys`` (their planned budget, else their compute to 3 significant digits). D_opt = C/F(N_opt)
    with F = k·N^p the runs' FLOPs per token (C/D), so b = 1 − p·a (1 − a under C = 6ND)."""
    n, d, l_ = (np.asarray(x, dtype=float) for x in (n_params, n_tokens, loss))
    c = np.asarray(compute, dtype=float) if compute is not None else 6 * n * d
    keys = budget_keys(c, budget)
    budgets, n_opt, parabolas, parabola_r2, inside, skipped = [], [], [], [], [], {}
    for key in np.unique(keys):
        mask = keys == key
        if len(np.unique(n[mask])) < 3:
            skipped[float(key)] = f"{len(np.unique(n[mask]))} model sizes"
            continue
        coeffs = np.polyfit(np.log(n[mask]), l_[mask], 2)
        if coeffs[0] <= 0:
            skipped[float(key)] = "no minimum: loss does not turn up with size"
            continue  # no minimum inside: the grid is not centred on the optimum
        budgets.append(key)
        n_opt.append(math.exp(-coeffs[1] / (2 * coeffs[0])))
        inside.append(bool(n[mask].min() <= n_opt[-1] <= n[mask].max()))
        parabolas.append(coeffs)
        spread = ((l_[mask] - l_[mask].mean()) ** 2).sum()
        misfit = ((l_[mask] - np.polyval(coeffs, np.log(n[mask]))) ** 2).sum()
        parabola_r2.append(float(1 - misfit / spread) if spread > 0 else float("nan"))
    if len(budgets) < 2:
        raise ValueError("Approach 2 needs at least two compute budgets with three or more sizes each")
    budgets, n_opt = np.array(budgets), np.array(n_opt)
    k, p, _ = fit_flops_per_token(n, c / d)
    d_opt = budgets / (k * n_opt**p)
    line = stats.linregress(np.log(budgets), np.log(n_opt))
    r2 = float(line.rvalue**2) if len(budgets) > 2 else float("nan")  # two points always fit a line
    # D_opt = C / (k·N_opt^p), so b = 1 − p·a exactly
    return IsoFlopFit(budgets, n_opt, d_opt, float(line.slope), 1 - p * float(line.slope), r2, parabolas, parabola_r2,
                      inside, skipped)


# -- a power law in compute on the frontier ------------------------------------------------------------


@dataclass
class ComputeLaw:
    """L(C) = E + K·C^−γ."""

    E: float
    K: float
    gamma: float
    r2_log: float
    compute_range: tuple[float, float] = (0.0, math.inf)  # of the points it was fitted to
    residuals: np.ndarray = field(default_factory=lambda: np.array([]), repr=False)  # log space

    def loss(self, compute):
        return self.E + self.K * np.power(compute, -self.gamma)

    def is_extrapolation(self, compute: float) -> bool:
        return not (self.compute_range[0] * 0.999 <= compute <= self.compute_range[1] * 1.001)


def fit_compute_law(compute, loss) -> ComputeLaw:
    """Fit L(C) = E + K·C^−γ (in log space, E bounded below the smallest loss)."""
    c, l_ = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    scale = np.median(c)

    def model(log_c, e, log_k, gamma):
        return np.log(e + np.exp(log_k) * np.exp(-gamma * (log_c - math.log(scale))))

    params, _ = optimize.curve_fit(model, np.log(c), np.log(l_), p0=[0.5 * l_.min(), math.log(l_.max() - 0.5 * l_.min()), 0.3],
                                   bounds=([0, -50, 0], [l_.min(), 50, 5]), maxfev=20000)
    e, log_k, gamma = params
    residuals = np.log(l_) - model(np.log(c), *params)
    total = ((np.log(l_) - np.log(l_).mean()) ** 2).sum()
    return ComputeLaw(float(e), float(math.exp(log_k) * scale**gamma), float(gamma),
                      float(1 - (residuals**2).sum() / total) if total > 0 else float("nan"),
                      (float(c.min()), float(c.max())), residuals)


# -- compute multipliers ----------------------------------------------------------------------


def compute_multiplier(baseline: ParametricFit, variant: ParametricFit, loss: float) -> float:
    """C_baseline(L) / C_variant(L): how much more compute the baseline needs for the variant's loss."""
    return baseline.compute_for_loss(loss) / variant.compute_for_loss(loss)


@dataclass
class MultiplierEstimate:
    compute: float  # the compute at which it is stated
    loss: float  # the baseline's frontier loss there
    multiplier: float
    ci: tuple[float, float] | None
    extrapolated: bool


def multiplier_at(baseline: ParametricFit, variant: ParametricFit, compute: float,
                  confidence: float = 0.95) -> MultiplierEstimate:
    """The multiplier at the loss the baseline reaches with `compute`, with a bootstrap CI when both
    fits carry bootstrap refits (paired by index)."""
    loss = float(baseline.frontier_loss(compute))
    value = compute_multiplier(baseline, variant, loss)
    ci = None
    if baseline.bootstrap and variant.bootstrap:
        samples = []
        for b, v in zip(bootstrap_fits(baseline), bootstrap_fits(variant)):
            target = float(b.frontier_loss(compute))
            with np.errstate(all="ignore"):
                try:
                    samples.append(compute_multiplier(b, v, target))
                except (ValueError, OverflowError, ZeroDivisionError):
                    continue
        finite = [s for s in samples if np.isfinite(s)]
        if finite:
            tail = 100 * (1 - confidence) / 2
            ci = (float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail)))
    n, d = baseline.optimal(compute)
    return MultiplierEstimate(compute, loss, value, ci, baseline.is_extrapolation(float(n), float(d)))
