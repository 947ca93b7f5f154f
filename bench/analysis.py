"""Statistics over a study's runs: per-variant summaries, and a verdict for every comparison.

A comparison is a variant against its reference (the baseline, or the variant ``compare:`` names) on
the study's quality metric: validation loss, or accuracy for tasks. Bits per byte rescale the loss on
the same val set, so they are shown, not tested again. Runs with the same seed see the same batches
and, wherever parameter names and shapes agree, start from the same weights, so a comparison tests
the per-seed differences (a paired t-test, or a paired bootstrap); Welch's test is used only where the
seeds do not pair up. Each comparison ends in one of four verdicts:

- ``better`` / ``worse``: the difference is significant at α after Holm's correction across the
  study's comparisons (and, with adaptive seeds, after the α spent at earlier looks);
- ``equivalent``: the whole 95% CI of the difference lies inside ±margin — a TOST-style equivalence
  decision; a difference smaller than the margin is called equivalent even where it is detectable;
- ``inconclusive``: neither, reported with the smallest difference these seeds could have detected
  at 80% power (the MDE).

Adaptive seeds (``seeds: {min, max}``) look at the data after min seeds and after every added seed.
The look with n seeds may spend α·(f(n/max) − f((n−1)/max)) of the error rate, with f the Pocock-type
spending function of Lan & DeMets (1983), f(t) = ln(1 + (e − 1)·t). A comparison's sequential p-value
is the smallest p_k·α/α_k over its looks so far; by the union bound the chance that it ever falls below
α under no true difference is at most α, whatever the stopping rule did, and Holm's correction over
these p-values keeps the study's rate of false better/worse verdicts at α.

Narang et al. (2021) recommend this kind of comparison for architecture modifications: several
seeds, mean ± sd, fixed hyperparameters.

The scaling-law summary (``scaling_summary``, ``scaling_per_machine``) fits the laws of
``bench.scaling`` to a study's finished training runs where it spans enough model sizes and token
budgets; the report only formats it.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy import optimize, special, stats

from bench import scaling
from bench.formatting import p_value, significant

QUALITY = ("val_loss", "val_accuracy", "val_bpb")
HIGHER_IS_BETTER = {"val_accuracy"}
UNITS = {"val_loss": "nats", "val_accuracy": "accuracy", "val_bpb": "bits per byte"}
VERDICTS = ("better", "worse", "equivalent", "inconclusive")
CONFIDENCE = 0.95  # of the reported intervals
POWER = 0.8  # of the minimum detectable effect
BOOTSTRAP_SAMPLES = 10_000


# -- the design: how seeds were chosen and verdicts are made ------------------------------------------


def pocock_spending(t: float) -> float:
    """Share of α spent by information fraction t (Lan–DeMets' Pocock-type function)."""
    return math.log(1 + (math.e - 1) * min(max(t, 0.0), 1.0))


@dataclass(frozen=True)
class Design:
    """The study's decision rule: error rate, equivalence margin, test, and adaptive seeds."""

    alpha: float = 0.05
    margin: float = 0.01
    paired_test: str = "t"  # "t" or "bootstrap"
    min_seeds: int | None = None  # adaptive seeds: the first look
    max_seeds: int | None = None  # ... and the last

    @classmethod
    def from_spec(cls, spec: dict) -> Design:
        """The design a spec (its stored JSON form) asks for."""
        seeds = spec.get("seeds")
        adaptive = isinstance(seeds, dict)
        return cls(alpha=spec.get("alpha", cls.alpha), margin=spec.get("margin", cls.margin),
                   paired_test=spec.get("paired_test", cls.paired_test),
                   min_seeds=seeds["min"] if adaptive else None, max_seeds=seeds["max"] if adaptive else None)

    @property
    def adaptive(self) -> bool:
        return self.max_seeds is not None and self.max_seeds > (self.min_seeds or 0)

    def looks(self, n: int) -> list[tuple[int, float]]:
        """(seeds, nominal α) of every look a comparison with n paired seeds has had: one look at the
        full α for fixed seeds; with adaptive seeds one per seed count from min, the last taking any
        seeds beyond max."""
        if not self.adaptive:
            return [(n, self.alpha)]
        out, spent = [], 0.0
        for k in range(self.min_seeds, min(max(n, self.min_seeds), self.max_seeds) + 1):
            level = self.alpha * pocock_spending(k / self.max_seeds) - spent
            spent += level
            out.append((k, level))
        last, level = out[-1]
        out[-1] = (max(n, last) if last == self.max_seeds else min(n, last), level)
        return out

    def describe(self) -> str:
        rule = (f"adaptive seeds from {self.min_seeds} to {self.max_seeds}, α spent over the looks (Pocock-type "
                "spending, weighted Bonferroni)" if self.adaptive else "fixed seeds")
        return f"α = {self.alpha:g}, Holm across comparisons, equivalence margin ±{self.margin:g}, {rule}"


# -- per-variant summaries ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeanCI:
    n: int
    mean: float
    sd: float
    low: float
    high: float


def _clean(values) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)


def mean_ci(values, confidence: float = CONFIDENCE) -> MeanCI:
    """Mean, sample sd and the t-based confidence interval of the mean."""
    x = _clean(values)
    n = len(x)
    if n == 0:
        return MeanCI(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return MeanCI(1, mean, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n))
    return MeanCI(n, mean, sd, mean - half, mean + half)


def pareto_front(costs: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Points no other point beats on both cost and loss (lower is better for both)."""
    costs, losses = np.asarray(costs, dtype=float), np.asarray(losses, dtype=float)
    front = np.ones(len(costs), dtype=bool)
    for i in range(len(costs)):
        dominated = (costs <= costs[i]) & (losses <= losses[i]) & ((costs < costs[i]) | (losses < losses[i]))
        front[i] = not dominated.any()
    return front


def point_key(sweep) -> str:
    return json.dumps(sweep, sort_keys=True, default=str)


def eval_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that enter verdicts: not the tuning runs (which chose each variant's setting)."""
    return runs[runs["role"] != "tune"] if "role" in runs else runs


def eligible_points(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, point): finished runs, failures, and whether the point may be chosen — a point
    where any seed diverged or failed is not (it counts against the point, not only its variant)."""
    frame = runs.assign(point=runs["sweep"].map(point_key))
    stats = frame.groupby(["variant", "point"])["status"].agg(
        finished=lambda s: int((s == "finished").sum()), diverged=lambda s: int((s == "diverged").sum()),
        failed=lambda s: int((s == "failed").sum())).reset_index()
    stats["eligible"] = (stats["finished"] > 0) & (stats["diverged"] == 0) & (stats["failed"] == 0)
    return stats


def best_of_sweep(runs: pd.DataFrame) -> pd.DataFrame:
    """Per variant, the runs of the point with the lowest mean val loss. With several points, only a
    point where no seed diverged or failed is eligible; a single point is kept whatever happened."""
    done = runs[runs["status"] == "finished"].copy()
    if done.empty:
        return done
    done["point"] = done["sweep"].map(point_key)
    points = eligible_points(runs)
    several = points.groupby("variant")["point"].transform("size") > 1
    allowed = points[points["eligible"] | ~several][["variant", "point"]]
    done = done.merge(allowed, on=["variant", "point"])
    if done.empty:
        return done
    means = done.groupby(["variant", "point"])["val_loss"].mean().reset_index()
    best = means.loc[means.groupby("variant")["val_loss"].idxmin(), ["variant", "point"]]
    return done.merge(best, on=["variant", "point"])


def choose_tuned(runs: pd.DataFrame) -> tuple[dict[str, dict], dict[str, str]]:
    """Each variant's tune point, chosen on its tuning runs alone: among points where every tuning
    seed finished (none diverged or failed), the best mean of the study's quality metric (accuracy for
    tasks, else val loss; ties: lower val loss). Returns (variant -> point, variant -> why none was)."""
    tuning = runs[runs["role"] == "tune"] if "role" in runs else runs.iloc[:0]
    chosen, none = {}, {}
    metric = quality_metric(tuning) if not tuning.empty else "val_loss"
    sign = -1.0 if metric in HIGHER_IS_BETTER else 1.0
    points = eligible_points(tuning) if not tuning.empty else pd.DataFrame()
    for variant, group in tuning.groupby("variant", sort=False):
        ok = set(points[(points["variant"] == variant) & points["eligible"]]["point"])
        done = group[(group["status"] == "finished") & group["sweep"].map(point_key).isin(ok)]
        if done.empty:
            none[variant] = f"every tuning point of '{variant}' had a diverged or failed seed"
            continue
        score = done.assign(point=done["sweep"].map(point_key), score=sign * done[metric]).groupby("point")[
            ["score", "val_loss"]].mean().sort_values(["score", "val_loss"])
        chosen[variant] = json.loads(score.index[0])
    return chosen, none


def grid_edges(grid: dict[str, list], point: dict) -> list[str]:
    """The tuned keys whose chosen value is the smallest or largest of a numeric grid of three or more
    values: the optimum was not bracketed and may lie beyond the grid (with two values every choice is
    an edge, and nothing is said)."""
    edges = []
    for key, values in grid.items():
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(numbers) < 3 or len(numbers) != len(values) or key not in point:
            continue
        if point[key] in (min(numbers), max(numbers)):
            side = "largest" if point[key] == max(numbers) else "smallest"
            edges.append(f"{key}={point[key]} is the {side} value tried: the best may lie beyond {values}")
    return edges


def quality_metric(runs: pd.DataFrame) -> str:
    """The metric a study's verdicts test: accuracy for tasks (runs that record it), else val loss."""
    done = runs[runs["status"] == "finished"]
    return "val_accuracy" if "val_accuracy" in done and done["val_accuracy"].notna().any() else "val_loss"


def variant_summary(runs: pd.DataFrame, baseline: str, compare: dict[str, str | None] | None = None) -> pd.DataFrame:
    """One row per variant (baseline first, then by mean val loss): per quality metric the mean, sd and
    95% CI over seeds; its reference; params, FLOPs, tokens/s, memory; how many runs failed or diverged."""
    compare = compare or {}
    chosen = best_of_sweep(runs)
    rows = []
    for variant, group in chosen.groupby("variant", sort=False):
        row = {"variant": variant, "n": len(group), "sweep": group["sweep"].iloc[0]}
        for metric in QUALITY:
            ci = mean_ci(group[metric].tolist() if metric in group else [])
            row.update({f"{metric}_mean": ci.mean, f"{metric}_sd": ci.sd, f"{metric}_ci_low": ci.low,
                        f"{metric}_ci_high": ci.high})
        for column in ("params", "active_params", "flops_per_token", "tokens_per_s", "peak_memory_bytes", "mfu",
                       "kv_cache_bytes_per_token"):
            row[column] = group[column].median() if column in group else float("nan")
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    # failures count at the point each variant is judged at (the others are in its sensitivity curve)
    points = eligible_points(runs).set_index(["variant", "point"])
    for status in ("failed", "diverged"):
        table[status] = [int(points[status].get((v, point_key(sweep)), 0)) for v, sweep in zip(table["variant"], table["sweep"])]
    # "" for the baseline and for variants that are references of their own (compare: {v: null})
    table["reference"] = [compare.get(v, baseline) or "" if v != baseline else "" for v in table["variant"]]
    others = table[table["variant"] != baseline].sort_values("val_loss_mean")["variant"].tolist()
    order = [v for v in [baseline, *others] if v in set(table["variant"])]
    return table.set_index("variant").reindex(order).reset_index()


# -- tests --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Test:
    """One test of variant − reference: the mean difference, its CI, p and what it could detect."""

    test: str  # "paired t", "paired bootstrap" or "welch"
    n: int  # pairs, or the variant's seeds (Welch)
    delta: float
    ci_low: float
    ci_high: float
    p: float
    sd: float  # of the paired differences; Welch: of the variant's values
    se: float
    df: float


def _two_sided_t(t: float, df: float) -> float:
    return float(2 * stats.t.sf(abs(t), df))


def paired_t(differences, confidence: float = CONFIDENCE) -> Test:
    """Paired t-test of the per-seed differences (variant − reference) against zero."""
    d = _clean(differences)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return Test("paired t", n, mean, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    if se == 0:  # every seed moved by exactly the same amount (e.g. accuracy 1.0 on both)
        return Test("paired t", n, mean, mean, mean, 1.0 if mean == 0 else 0.0, 0.0, 0.0, n - 1)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * se
    return Test("paired t", n, mean, mean - half, mean + half, _two_sided_t(mean / se, n - 1), sd, se, n - 1)


def paired_bootstrap(differences, confidence: float = CONFIDENCE, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0) -> Test:
    """Paired bootstrap of the mean difference: percentile CI; p from the differences shifted to a
    zero mean (the null), two-sided. Needs many seeds to be trusted; the t-test is the default."""
    d = _clean(differences)
    n = len(d)
    t = paired_t(d, confidence)
    if n < 2 or t.se == 0:
        return Test("paired bootstrap", *[getattr(t, f) for f in ("n", "delta", "ci_low", "ci_high", "p", "sd", "se", "df")])
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(samples, n))
    means = d[index].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    null = (d - d.mean())[index].mean(axis=1)
    p = float((np.abs(null) >= abs(d.mean())).mean())
    return Test("paired bootstrap", n, t.delta, float(low), float(high), max(p, 1 / samples), t.sd, t.se, t.df)


def welch(variant, reference, confidence: float = CONFIDENCE) -> Test:
    """Welch's unequal-variance t-test of variant − reference, for seeds that do not pair up."""
    a, b = _clean(variant), _clean(reference)
    delta = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2:
        return Test("welch", len(a), delta, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Test("welch", len(a), delta, delta, delta, 1.0 if delta == 0 else 0.0, 0.0, 0.0, len(a) + len(b) - 2)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch–Satterthwaite
    half = float(stats.t.ppf((1 + confidence) / 2, df)) * se
    return Test("welch", len(a), delta, delta - half, delta + half, _two_sided_t(delta / se, df),
                float(a.std(ddof=1)), se, float(df))


# Gauss–Legendre nodes on (0, 1): the quantiles of the variance estimate to average power over
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(200)
_NODES, _WEIGHTS = (_NODES + 1) / 2, _WEIGHTS / 2


@functools.lru_cache(maxsize=64)
def _spread(df: float) -> np.ndarray:
    """s = sqrt(χ²_df / df) at the quadrature nodes: the spread of an estimated standard error."""
    return np.sqrt(stats.chi2.ppf(_NODES, df) / df)


def t_test_power(noncentrality: float, df: float, level: float, critical: float | None = None) -> float:
    """Power of a two-sided t-test at `level` when the true difference is `noncentrality` standard
    errors: E over the variance estimate of P(|Z + δ| > c·s), s² ~ χ²_df / df. (scipy's noncentral t
    returns NaN in places for df = 1, the two-seed case.)"""
    critical = stats.t.ppf(1 - level / 2, df) if critical is None else critical
    s = _spread(float(df))
    inside = special.ndtr(noncentrality - critical * s) + special.ndtr(-critical * s - noncentrality)
    return float(np.dot(_WEIGHTS, inside))


def minimum_detectable(se: float, df: float, level: float, power: float = POWER) -> float:
    """The smallest |difference| a two-sided t-test at `level` detects with `power`, given the standard
    error and degrees of freedom of its estimate."""
    if not (se > 0 and df > 0 and 0 < level < 1):
        return math.nan
    critical = float(stats.t.ppf(1 - level / 2, df))

    def shortfall(noncentrality: float) -> float:
        return t_test_power(noncentrality, df, level, critical) - power

    high = critical + 4.0
    while shortfall(high) < 0:
        high *= 2
    return float(optimize.brentq(shortfall, 0.0, high, xtol=1e-8)) * se


def holm(p_values) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order; NaN (no test) stays NaN and is not
    counted among the comparisons."""
    p = np.asarray(p_values, dtype=float)
    tested = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(len(p), math.nan)
    m = len(tested)
    running = 0.0
    for rank, i in enumerate(tested[np.argsort(p[tested], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def verdict_of(delta: float, ci_low: float, ci_high: float, p_adjusted: float, alpha: float, margin: float,
               higher_is_better: bool) -> str:
    """better / worse / equivalent / inconclusive, from the adjusted p and the CI of the difference
    (variant − reference)."""
    if not math.isnan(ci_low) and -margin < ci_low and ci_high < margin:
        return "equivalent"
    if not math.isnan(p_adjusted) and p_adjusted < alpha and delta != 0:
        return "better" if (delta > 0) == higher_is_better else "worse"
    return "inconclusive"


# -- comparisons --------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """A variant against its reference on the study's quality metric, and the verdict in words."""

    variant: str
    reference: str
    metric: str
    n: int
    delta: float
    ci_low: float
    ci_high: float
    p: float  # the test's own p-value at the current seeds
    p_adjusted: float  # after the looks (adaptive seeds) and Holm across the study's comparisons
    test: str
    verdict: str
    margin: float
    mde: float  # the smallest |difference| these seeds could detect at 80% power
    sd: float
    seeds: list[int] = field(default_factory=list)
    n_reference: int = 0
    p_sequential: float = math.nan  # after the looks, before Holm
    higher_is_better: bool = False
    machine: str | None = None
    note: str = ""
    tuned: dict = field(default_factory=dict)  # variant and reference -> the tuned values they ran at

    @property
    def unit(self) -> str:
        return UNITS.get(self.metric, "")

    def sentence(self) -> str:
        """The verdict in one sentence, with the numbers behind it (and the tuned settings)."""
        tuned = self.tuned_sentence()
        return self.verdict_sentence() + (f" {tuned}" if tuned else "")

    def tuned_sentence(self) -> str:
        """The settings each side ran at, where the study tuned them ("" otherwise)."""
        at = "; ".join(f"{name} at " + ", ".join(f"{k}={v}" for k, v in point.items())
                       for name, point in self.tuned.items() if point)
        return f"Each at its setting tuned on held-out seeds: {at}." if at else ""

    def verdict_sentence(self) -> str:
        """The verdict with the numbers behind it: difference, CI, test, seeds, adjusted p."""
        unit = f" {self.unit}" if self.unit else ""
        over = (f"{self.test} over {self.n} seeds" if self.test != "welch"
                else f"Welch over {self.n} and {self.n_reference} seeds")
        ci = f"95% CI {significant(self.ci_low, sign=True)} to {significant(self.ci_high, sign=True)}"
        if self.verdict in ("better", "worse"):
            return (f"{self.variant} is {self.verdict} than {self.reference} by {significant(abs(self.delta))}{unit} "
                    f"({ci}, {over}, Holm-adjusted p {p_value(self.p_adjusted)}).")
        if self.verdict == "equivalent":
            return (f"{self.variant} is equivalent to {self.reference} within ±{self.margin:g}{unit} "
                    f"(Δ {significant(self.delta, sign=True)}, {ci}, {over}).")
        if self.note:
            return f"{self.variant} vs {self.reference} is inconclusive: {self.note}."
        return (f"{self.variant} vs {self.reference} is inconclusive: Δ {significant(self.delta, sign=True)}{unit} "
                f"({ci}, {over}, Holm-adjusted p {p_value(self.p_adjusted)}); these seeds could detect a difference of "
                f"±{significant(self.mde)} or more (80% power), and equivalence needs the CI inside ±{self.margin:g}.")

    def to_dict(self) -> dict:
        return {k: v if k == "tuned" else _json_number(v) for k, v in asdict(self).items()}


def _json_number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass
class Noise:
    """The study's noise floor: how much the baseline moves across seeds, and paired differences."""

    baseline_sd: float
    baseline_n: int
    paired_sd: float  # pooled over the paired comparisons, weighted by degrees of freedom
    paired_df: int

    def sentence(self, metric: str) -> str:
        if self.baseline_n < 2:
            return "Noise floor: unknown until the baseline has two seeds."
        text = f"Noise floor: the baseline's {metric} varies across seeds with sd {significant(self.baseline_sd)} (n = {self.baseline_n})"
        if self.paired_df:
            text += f"; paired differences between variants vary with sd {significant(self.paired_sd)} (pooled, {self.paired_df} df)"
        return text + "."


@dataclass
class StudySummary:
    """Everything the CLI table, the HTML summary and ``--json`` say about one study on one machine."""

    study: str
    metric: str
    design: Design
    noise: Noise
    comparisons: list[Comparison]
    variants: pd.DataFrame
    machine: str | None = None

    @property
    def higher_is_better(self) -> bool:
        return self.metric in HIGHER_IS_BETTER

    def pending(self) -> set[str]:
        """Variants (with their references) in comparisons that are still inconclusive."""
        return pending(self.comparisons)

    def to_dict(self) -> dict:
        return {"study": self.study, "machine": self.machine, "metric": self.metric,
                "alpha": self.design.alpha, "margin": self.design.margin, "design": self.design.describe(),
                "noise": {"baseline_sd": _json_number(self.noise.baseline_sd), "baseline_n": self.noise.baseline_n,
                          "paired_sd": _json_number(self.noise.paired_sd), "paired_df": self.noise.paired_df},
                "comparisons": [c.to_dict() for c in self.comparisons]}


def _per_seed(group: pd.DataFrame, metric: str) -> dict[int, float]:
    values = group.dropna(subset=[metric]) if metric in group else group.iloc[:0]
    return {int(s): float(v) for s, v in zip(values["seed"], values[metric])}


def compare(variant: dict[int, float], reference: dict[int, float], design: Design) -> tuple[Test, float, float]:
    """Test one comparison from per-seed values: paired where the seeds pair up (at least two shared
    seeds), else Welch. Returns the test at all seeds, the sequential p (after the looks) and the MDE."""
    shared = sorted(set(variant) & set(reference))
    if len(shared) >= 2:
        differences = np.array([variant[s] - reference[s] for s in shared])
        run = paired_bootstrap if design.paired_test == "bootstrap" else paired_t
        looks = design.looks(len(shared))
        p_sequential = min(min(1.0, run(differences[:k]).p * design.alpha / level) for k, level in looks)
        test = run(differences)
    else:  # seeds that don't pair up: every look's α was spent on what is here now
        test = welch(list(variant.values()), list(reference.values()))
        looks = design.looks(test.n)
        p_sequential = test.p if math.isnan(test.p) else min(1.0, test.p * design.alpha / looks[-1][1])
    return test, p_sequential, minimum_detectable(test.se, test.df, looks[-1][1])


def judge(values: dict[str, dict[int, float]], pairs: list[tuple[str, str]], metric: str, design: Design,
          machine: str | None = None) -> list[Comparison]:
    """The comparisons (variant, reference) of one study from per-seed values of its metric: each
    tested, Holm-adjusted across the study, and given its verdict; sorted by verdict, then |Δ|."""
    higher = metric in HIGHER_IS_BETTER
    comparisons = []
    for variant, reference in pairs:
        mine, theirs = values.get(variant, {}), values.get(reference, {})
        test, p_sequential, mde = compare(mine, theirs, design)
        shared = sorted(set(mine) & set(theirs))
        note = ""
        if math.isnan(test.p):
            note = f"{len(shared) if len(shared) else min(len(mine), len(theirs))} seed(s) to compare; a test needs two"
        comparisons.append(Comparison(
            variant=variant, reference=reference, metric=metric, n=test.n, delta=test.delta, ci_low=test.ci_low,
            ci_high=test.ci_high, p=test.p, p_adjusted=math.nan, test=test.test, verdict="inconclusive",
            margin=design.margin, mde=mde, sd=test.sd, seeds=shared or sorted(mine), n_reference=len(theirs),
            p_sequential=p_sequential, higher_is_better=higher, machine=machine, note=note))
    for c, adjusted in zip(comparisons, holm([c.p_sequential for c in comparisons])):
        c.p_adjusted = adjusted
        c.verdict = verdict_of(c.delta, c.ci_low, c.ci_high, adjusted, design.alpha, design.margin, higher)
    order = {v: i for i, v in enumerate(VERDICTS)}
    comparisons.sort(key=lambda c: (order[c.verdict], -abs(c.delta) if not math.isnan(c.delta) else 0))
    return comparisons


def pending(comparisons: list[Comparison]) -> set[str]:
    """What adaptive seeds train next: the variants, with their references, of every comparison that
    is still inconclusive."""
    return {name for c in comparisons if c.verdict == "inconclusive" for name in (c.variant, c.reference)}


def noise_floor(values: dict[str, dict[int, float]], baseline: str, comparisons: list[Comparison]) -> Noise:
    """The baseline's seed-to-seed sd, and the sd of paired differences pooled over the comparisons."""
    paired = [c for c in comparisons if c.test != "welch" and c.n >= 2 and not math.isnan(c.sd)]
    df = sum(c.n - 1 for c in paired)
    pooled = math.sqrt(sum((c.n - 1) * c.sd**2 for c in paired) / df) if df else math.nan
    base = list(values.get(baseline, {}).values())
    return Noise(float(np.std(base, ddof=1)) if len(base) >= 2 else math.nan, len(base), pooled, df)


def _same_data(runs: pd.DataFrame, variant: str, reference: str) -> bool:
    """Whether two variants' runs were scored on the same data (the data settings of their configs): a
    loss on another task is no reference (the planner refuses such specs; this guards older stores)."""
    if "config" not in runs:
        return True
    data = {v: {json.dumps(c.get("data"), sort_keys=True, default=str) for c in runs.loc[runs["variant"] == v, "config"]
                if isinstance(c, dict)} for v in (variant, reference)}
    return not (data[variant] and data[reference]) or data[variant] == data[reference]


def _post_training(runs: pd.DataFrame) -> bool:
    """Whether these runs are post-training quantized copies of float checkpoints (not trained)."""
    return "kind" in runs and not runs.empty and bool((runs["kind"] == "quantize").all())


def summarise(runs: pd.DataFrame, spec: dict, machine: str | None = None) -> StudySummary:
    """The verdicts of a study (its spec, as stored) from its runs on one machine: each variant at its
    chosen sweep point against its reference."""
    design = Design.from_spec(spec)
    baseline = spec.get("baseline") or next(iter(spec.get("variants", {})), "")
    references = spec.get("compare") or {}
    runs = eval_runs(runs)
    table = variant_summary(runs, baseline, references)
    metric = quality_metric(runs)
    chosen = best_of_sweep(runs)
    values = {v: _per_seed(g, metric) for v, g in chosen.groupby("variant")}
    pairs = []
    for v in table["variant"] if not table.empty else []:
        runs_of = chosen[chosen["variant"] == v]
        if _post_training(runs_of) and f"{metric}_float" in runs_of:
            # post-training quantization: against its own float checkpoint, evaluated the same way, and
            # against another post-training method the spec names (the same checkpoint per seed)
            values[f"{v} (float)"] = _per_seed(runs_of, f"{metric}_float")
            pairs.append((v, f"{v} (float)"))
            if (ref := references.get(v)) in values and _post_training(chosen[chosen["variant"] == ref]):
                pairs.append((v, ref))
        elif v != baseline and (ref := references.get(v, baseline)) in values and _same_data(chosen, v, ref):
            pairs.append((v, ref))
    comparisons = judge(values, pairs, metric, design, machine)
    if spec.get("tune"):  # the values each side was trained at, chosen on the tuning seeds
        at = dict(zip(table["variant"], table["sweep"]))
        for c in comparisons:
            c.tuned = {c.variant: at.get(c.variant) or {}, c.reference: at.get(c.reference) or {}}
    return StudySummary(spec.get("name", ""), metric, design, noise_floor(values, baseline, comparisons), comparisons,
                        table, machine)


def ladder_climb(runs: pd.DataFrame, ladder: list[str], metric: str) -> pd.DataFrame:
    """A recipe ladder step by step: the paired difference in `metric` from the step before (what the
    step's verdict tests) and the cumulative paired difference from the first step, each per seed
    with its mean and 95% CI (paired t; the cumulative ones are not in the verdicts' Holm family)."""
    chosen = best_of_sweep(eval_runs(runs))
    values = {v: _per_seed(g, metric) for v, g in chosen.groupby("variant")}
    first, before, rows = values.get(ladder[0], {}), values.get(ladder[0], {}), []
    for step in ladder:
        own = values.get(step, {})
        row = {"step": step}
        for label, reference in (("change", before), ("cumulative", first)):
            shared = sorted(set(own) & set(reference))
            test = paired_t([own[s] - reference[s] for s in shared])
            row.update({label: test.delta, f"{label}_low": test.ci_low, f"{label}_high": test.ci_high, f"{label}_n": test.n})
        rows.append(row)
        before = own
    return pd.DataFrame(rows)


# -- scaling laws over a study's runs ---------------------------------------------------------------

SCALING_MIN_SIZES = 3  # a variant is fitted when its runs span at least this many model sizes
SCALING_MIN_BUDGETS = 3  # ... and this many token budgets
SCALING_BOOTSTRAP = 100  # bootstrap refits behind each Approach 3 interval (seeded: the summary is reproducible)
SCALING_EXTRAPOLATION = 100  # without the spec's extrapolate_to, multipliers are also stated at 100× the largest budget
SCALING_TABLES = ("fits", "multipliers", "approach2", "compute_law")  # the per-variant rows of a summary
SCALING_COMPUTE = ("C = training FLOPs per token × tokens (forward + backward, attention and LM head included); "
                   "N = active parameters")


def compute_envelope(compute, loss) -> tuple[np.ndarray, np.ndarray]:
    """The lower envelope of loss against compute: the best loss reached with at most C FLOPs, kept
    only at the points where it falls (sorted by compute). Returns (compute, best loss)."""
    compute, loss = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    order = np.argsort(compute)
    envelope = np.minimum.accumulate(loss[order])  # the best loss at ≤ C
    keep = np.r_[True, envelope[1:] < envelope[:-1]]
    return compute[order][keep], envelope[keep]


def _planned_flops(config) -> float:
    """The FLOPs budget a run was planned with (its config's train.flops), NaN for any other budget."""
    train = config.get("train") if isinstance(config, dict) else None
    flops = train.get("flops") if isinstance(train, dict) else None
    return float(flops) if flops else math.nan


def scaling_points(runs: pd.DataFrame) -> pd.DataFrame:
    """A study's finished training runs as the scaling fits see them, one row each: variant, params (N:
    the parameters a token uses — MoE's active ones; all of them where a store did not record that),
    tokens (D, trained), val_loss, flops_per_token (training FLOPs per token from the run's metrics:
    forward + backward, attention and the LM head included), compute (C = flops_per_token × tokens),
    estimated (no FLOPs recorded: C falls back to 6·N·D) and budget (the train.flops the run was planned
    with, NaN for other budgets: what groups runs into IsoFLOP curves)."""
    done = runs[(runs["status"] == "finished") & (runs["kind"] == "train")]
    column = lambda name: pd.to_numeric(done[name], errors="coerce") if name in done else pd.Series(math.nan, index=done.index)  # noqa: E731
    points = pd.DataFrame({"variant": done["variant"], "params": column("active_params").fillna(column("params")),
                           "tokens": column("tokens"), "val_loss": column("val_loss"),
                           "flops_per_token": column("flops_per_token"),
                           "budget": done["config"].map(_planned_flops) if "config" in done else math.nan},
                          index=done.index).dropna(subset=["val_loss", "params", "tokens"])
    points["estimated"] = points["flops_per_token"].isna()
    points["flops_per_token"] = points["flops_per_token"].fillna(6 * points["params"])
    points["compute"] = points["flops_per_token"] * points["tokens"]
    return points


def scaling_summary(runs: pd.DataFrame, baseline: str, extrapolate_to: float | None = None) -> dict | None:
    """The scaling laws of a study's finished training runs, per variant whose runs span at least 3 model
    sizes and 3 token budgets; None where no variant does. Values are raw numbers (the report formats them).
    Compute is C = training FLOPs per token × tokens and N the active parameters (``scaling_points``);
    6·N·D stands in for runs without recorded FLOPs, and ``compute`` says so:

    - ``points``: the fitted runs (``scaling_points``); ``parametric``: variant → its
      ``scaling.ParametricFit`` (Chinchilla Approach 3, 100 seeded bootstrap refits; its frontier's
      compute is F(N)·D with F = k·N^p fitted to the runs' FLOPs per token);
    - ``compute``: how compute was counted, naming the runs that fell back to 6·N·D; ``estimated``: their number;
    - ``fits``: one row per variant: E, A, B, alpha, beta, their 95% intervals ``E_ci`` … (low, high), the
      frontier exponents a and b, r2 (of log L), max_residual (|log-space residual|), objective, warnings;
    - ``multipliers``: each variant against `baseline` (when it was fitted) at the largest trained compute
      and at `extrapolate_to` (else 100× the largest): where, compute, loss (the baseline's frontier
      loss there), multiplier, ci (low, high) or None, and extrapolated;
    - ``approach2``: IsoFLOP parabolas (Approach 2) per variant, runs grouped by their planned budget
      (train.flops; else by compute to 3 significant digits): a, b, budgets, optima (per budget: budget,
      n_opt, d_opt, inside — whether N_opt lies within the sizes trained there), r2 (of the N_opt line),
      parabola_r2 (the smallest parabola R²) and error — the reason, where the grid has too few budgets;
    - ``compute_law``: L(C) = E + K·C^−γ on each variant's compute envelope, where it has ≥ 3 points: E, K,
      gamma, r2, points, range (the fitted compute range) and max_residual.
    """
    done = scaling_points(runs)
    eligible = [v for v, g in done.groupby("variant")
                if g["params"].nunique() >= SCALING_MIN_SIZES and g["tokens"].nunique() >= SCALING_MIN_BUDGETS]
    if not eligible:
        return None
    points = done[done["variant"].isin(eligible)]
    fits = {}
    for v, g in points.groupby("variant"):
        fits[v] = scaling.fit_parametric(g["params"], g["tokens"], g["val_loss"], n_bootstrap=SCALING_BOOTSTRAP, seed=0,
                                         flops_per_token=g["flops_per_token"])
        if g["estimated"].any():
            fits[v].warnings.append(f"compute is 6·N·D for {int(g['estimated'].sum())} of {len(g)} runs: "
                                    "they recorded no FLOPs per token")
    rows = [{"variant": v, **fit.params, **{f"{k}_ci": fit.ci[k] for k in scaling.PARAMS},
             "a": fit.exponent_a, "b": fit.exponent_b, "r2": fit.r2_log,
             "max_residual": float(np.abs(fit.residuals).max()), "objective": fit.objective, "warnings": fit.warnings}
            for v, fit in fits.items()]
    multipliers = []
    if baseline in fits:
        largest = float(points["compute"].max())
        where = [("largest trained budget", largest),
                 ("the spec's extrapolate_to", extrapolate_to) if extrapolate_to
                 else (f"extrapolated to {SCALING_EXTRAPOLATION}× that", SCALING_EXTRAPOLATION * largest)]
        for v, fit in fits.items():
            if v == baseline:
                continue
            for label, compute in where:
                m = scaling.multiplier_at(fits[baseline], fit, compute)
                multipliers.append({"variant": v, "where": label, "compute": compute, "loss": m.loss,
                                    "multiplier": m.multiplier, "ci": m.ci,
                                    "extrapolated": m.extrapolated or compute > largest})
    approach2, compute_law = [], []
    for v, g in points.groupby("variant"):
        try:
            iso = scaling.fit_isoflop(g["params"], g["tokens"], g["val_loss"], compute=g["compute"], budget=g["budget"])
            approach2.append({"variant": v, "a": iso.exponent_a, "b": iso.exponent_b, "budgets": len(iso.budgets),
                              "optima": [{"budget": float(c), "n_opt": float(n), "d_opt": float(d), "inside": inside}
                                         for c, n, d, inside in zip(iso.budgets, iso.n_opt, iso.d_opt, iso.inside)],
                              "r2": iso.r2_log, "parabola_r2": min(iso.parabola_r2), "error": None})
        except ValueError as e:
            approach2.append({"variant": v, "a": None, "b": None, "budgets": 0, "optima": [], "r2": None,
                              "parabola_r2": None, "error": str(e)})
        compute, best = compute_envelope(g["compute"], g["val_loss"])
        if len(compute) >= 3:
            law = scaling.fit_compute_law(compute, best)
            compute_law.append({"variant": v, "E": law.E, "K": law.K, "gamma": law.gamma, "r2": law.r2_log,
                                "points": len(compute), "range": law.compute_range,
                                "max_residual": float(np.abs(law.residuals).max())})
    estimated = int(points["estimated"].sum())
    return {"points": points, "parametric": fits, "fits": rows, "multipliers": multipliers, "approach2": approach2,
            "compute_law": compute_law, "estimated": estimated,
            "compute": SCALING_COMPUTE + (f"; 6·N·D for {estimated} of {len(points)} runs, which recorded no FLOPs per token"
                                          if estimated else "")}


def scaling_per_machine(runs: pd.DataFrame, baseline: str, extrapolate_to: float | None = None) -> list[dict]:
    """``scaling_summary`` per machine (the ``machine`` column): losses from different hardware (dtype,
    kernels) are not one sample. With several machines each variant is named "variant @ machine" (the
    baseline too); each summary carries its ``machine``. Machines with nothing to fit are left out."""
    machines = list(runs["machine"].unique())
    if len(machines) == 1:
        part = scaling_summary(runs, baseline, extrapolate_to)
        return [{"machine": machines[0], **part}] if part else []
    out = []
    for machine in machines:
        mine = runs[runs["machine"] == machine]
        part = scaling_summary(mine.assign(variant=mine["variant"] + f" @ {machine}"), f"{baseline} @ {machine}",
                               extrapolate_to)
        if part:
            out.append({"machine": machine, **part})
    return out
