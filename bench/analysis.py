"""Statistics over a study's runs: best-of-sweep selection, per-variant means with 95% confidence
intervals, Welch's t-test against the baseline with a verdict in words, and Pareto fronts.

As Narang et al. (2021) recommend for comparing modifications: several seeds, mean ± sd, fixed
hyperparameters (or each variant's best of the same sweep, chosen on val loss and reported as such).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

QUALITY = ("val_loss", "val_accuracy", "val_bpb")
HIGHER_IS_BETTER = {"val_accuracy"}


@dataclass(frozen=True)
class MeanCI:
    n: int
    mean: float
    sd: float
    low: float
    high: float


def mean_ci(values, confidence: float = 0.95) -> MeanCI:
    """Mean, sample sd and the t-based confidence interval of the mean."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        return MeanCI(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return MeanCI(1, mean, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n))
    return MeanCI(n, mean, sd, mean - half, mean + half)


@dataclass(frozen=True)
class Comparison:
    delta: float  # variant mean − baseline mean
    t: float
    p: float
    df: float
    verdict: str  # "better", "worse" or "no significant difference"


def welch(variant, baseline, higher_is_better: bool = False, alpha: float = 0.05) -> Comparison:
    """Welch's unequal-variance t-test of variant against baseline, with the verdict in words."""
    a = np.asarray([v for v in variant if v is not None and not math.isnan(v)], dtype=float)
    b = np.asarray([v for v in baseline if v is not None and not math.isnan(v)], dtype=float)
    delta = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2:
        return Comparison(delta, math.nan, math.nan, math.nan, "too few seeds to test")
    with warnings.catch_warnings():
        # seeds that agree exactly (accuracy 1.0 on every seed) have zero variance; scipy's warning
        # about cancellation in near-identical data does not apply to them
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
    p = float(result.pvalue)
    if math.isnan(p) or p >= alpha:
        verdict = "no significant difference"
    else:
        verdict = "better" if (delta > 0) == higher_is_better else "worse"
    return Comparison(delta, float(result.statistic), p, float(result.df), verdict)  # Welch–Satterthwaite df


def pareto_front(costs: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Points no other point beats on both cost and loss (lower is better for both)."""
    costs, losses = np.asarray(costs, dtype=float), np.asarray(losses, dtype=float)
    front = np.ones(len(costs), dtype=bool)
    for i in range(len(costs)):
        dominated = (costs <= costs[i]) & (losses <= losses[i]) & ((costs < costs[i]) | (losses < losses[i]))
        front[i] = not dominated.any()
    return front


def _point(sweep) -> str:
    return json.dumps(sweep, sort_keys=True, default=str)


def best_of_sweep(runs: pd.DataFrame) -> pd.DataFrame:
    """Per variant, the runs of the sweep point with the lowest mean val loss (chosen on val loss)."""
    done = runs[runs["status"] == "finished"].copy()
    if done.empty:
        return done
    done["point"] = done["sweep"].map(_point)
    means = done.groupby(["variant", "point"])["val_loss"].mean().reset_index()
    best = means.loc[means.groupby("variant")["val_loss"].idxmin(), ["variant", "point"]]
    return done.merge(best, on=["variant", "point"])


def variant_summary(runs: pd.DataFrame, baseline: str, compare: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per variant (baseline first, then by mean val loss): per quality metric the mean, sd and
    95% CI over seeds, the difference from its reference — the baseline, or the variant `compare`
    names for it — with Welch's p-value and verdict; params, FLOPs, tokens/s, memory; how many runs
    failed or diverged."""
    compare = compare or {}
    chosen = best_of_sweep(runs)
    rows, samples = [], {}
    for variant, group in chosen.groupby("variant", sort=False):
        row = {"variant": variant, "n": len(group), "sweep": group["sweep"].iloc[0]}
        for metric in QUALITY:
            values = group[metric].dropna().tolist() if metric in group else []
            samples[(variant, metric)] = values
            ci = mean_ci(values)
            row.update({f"{metric}_mean": ci.mean, f"{metric}_sd": ci.sd, f"{metric}_ci_low": ci.low,
                        f"{metric}_ci_high": ci.high})
        for column in ("params", "active_params", "flops_per_token", "tokens_per_s", "peak_memory_bytes", "mfu"):
            row[column] = group[column].median() if column in group else float("nan")
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    counts = runs.groupby("variant")["status"].value_counts().unstack(fill_value=0)
    for status in ("failed", "diverged"):
        table[status] = table["variant"].map(counts[status] if status in counts else {}).fillna(0).astype(int)
    present = set(table["variant"])
    table["reference"] = [compare.get(v, baseline) if v != baseline else "" for v in table["variant"]]
    for metric in QUALITY:
        tests = [welch(samples[(v, metric)], samples[(ref, metric)], metric in HIGHER_IS_BETTER)
                 if ref in present and samples[(ref, metric)] and samples[(v, metric)] else None
                 for v, ref in zip(table["variant"], table["reference"])]  # the baseline's reference is ""
        table[f"{metric}_delta"] = [t.delta if t else math.nan for t in tests]
        table[f"{metric}_p"] = [t.p if t else math.nan for t in tests]
        table[f"{metric}_verdict"] = [t.verdict if t else "baseline" if v == baseline and samples[(v, metric)] else ""
                                      for v, t in zip(table["variant"], tests)]
    others = table[table["variant"] != baseline].sort_values("val_loss_mean")["variant"].tolist()
    order = [v for v in [baseline, *others] if v in present]
    return table.set_index("variant").reindex(order).reset_index()
