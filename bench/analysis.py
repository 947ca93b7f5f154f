"""Statistics over a study's runs: per-variant summaries, and a verdict for every comparison.

A comparison is a variant against its reference (the baseline, or the variant ``compare:`` names) on
the study's metric (``bench.metrics``: val loss by default, accuracy for tasks, or a learning-speed
metric). Runs with the same seed see the same batches and, wherever parameter names and shapes agree,
start from the same weights, so a comparison tests the per-seed differences (``bench.stats``: a
paired t-test or an exact sign-flip test); Welch's test is used only where the seeds do not pair up.
Each comparison ends in one of five verdicts:

- ``better`` / ``worse``: the difference is significant at α after the looks (adaptive seeds) and
  Holm–Shaffer's correction across the study;
- ``equivalent``: the difference is significantly inside ±margin (TOST), under the same α, looks
  and correction — a difference smaller than the margin is called equivalent even where it is
  detectable (the sentence says so);
- ``saturated``: every seed of both sides sits at the metric's bound (accuracy ≥ 0.995, or a loss
  at or below the floor the study states): the task cannot tell them apart at this budget, which is
  not evidence that they are the same; a learning-speed metric may;
- ``inconclusive``: none of these, with the reason: too few seeds (and the smallest difference they
  could detect at 80% power, after the correction), zero variance, censored values, or seeds that
  failed or diverged — those count against the comparison, never silently dropped.

Adaptive seeds (``seeds: {min, max}``) add a seed to the variants of comparisons that are
inconclusive for want of seeds, and every look spends from the same α (``stats.Design.looks``).

Narang et al. (2021) recommend this kind of comparison for architecture modifications: several
seeds, mean ± sd, fixed hyperparameters.

The scaling-law summary (``scaling_summary``, ``scaling_per_machine``) fits the laws of
``bench.scaling`` to a study's finished training runs where it spans enough model sizes and token
budgets; the report only formats it.

Everything is read off the study's design (``bench.spec.StudyDesign``), never its spec's keys, and
``analyse`` gathers it per machine (``StudyAnalysis``) for the report, the runner and ``--json``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from bench import scaling
from bench.formatting import p_value, significant
from bench.metrics import MetricSpec, Value, metric_of, run_values
from bench.spec import StudyDesign
from bench.stats import CONFIDENCE, Design, Test, finite, holm_shaffer, minimum_detectable, paired, paired_t, welch

QUALITY = ("val_loss", "val_accuracy", "val_bpb")
VERDICTS = ("better", "worse", "equivalent", "inconclusive", "saturated")
FLOAT = " (float)"  # how a plan names a quantized variant's float run: "int8 (float)"
NOT_RUN = "(not run)"  # the machine of runs that have not run yet


# -- per-variant summaries ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeanCI:
    n: int
    mean: float
    sd: float
    low: float
    high: float


def mean_ci(values, confidence: float = CONFIDENCE) -> MeanCI:
    """Mean, sample sd and the t-based confidence interval of the mean."""
    x = finite(values)
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


def choose_tuned(runs: pd.DataFrame, grids: dict[str, dict[str, list]] | None = None,
                 margin: float = 0.0) -> tuple[dict[str, dict], dict[str, str]]:
    """Each variant's tune point, chosen on its tuning runs alone by the mean val loss (for tasks too:
    it keeps falling after accuracy has saturated at 1.0), among points where every tuning seed
    finished (none diverged or failed). Of the points within `margin` of the best, the most stable
    one is taken: one that borders no diverged or failed point of its grid (``grids``: variant → its
    tune grid) and is not at the grid's edge, so a setting next to a cliff is not chosen for a gain
    smaller than the noise. Returns (variant -> point, variant -> why none was)."""
    tuning = runs[runs["role"] == "tune"] if "role" in runs else runs.iloc[:0]
    chosen, none = {}, {}
    points = eligible_points(tuning) if not tuning.empty else pd.DataFrame()
    for variant, group in tuning.groupby("variant", sort=False):
        ok = set(points[(points["variant"] == variant) & points["eligible"]]["point"])
        done = group[(group["status"] == "finished") & group["sweep"].map(point_key).isin(ok)]
        if done.empty:
            none[variant] = f"every tuning point of '{variant}' had a diverged or failed seed"
            continue
        score = done.assign(point=done["sweep"].map(point_key)).groupby("point")["val_loss"].mean().sort_values()
        near = score[score <= score.iloc[0] + margin]
        grid = (grids or {}).get(variant, {})
        unstable = {p for p in points.loc[points["variant"] == variant, "point"] if p not in ok}
        risk = [len(grid_edges(grid, json.loads(p))) + 10 * len(unstable_neighbours(grid, json.loads(p), unstable))
                for p in near.index]
        chosen[variant] = json.loads(near.index[int(np.argmin(risk))])  # ties: the better score (first)
    return chosen, none


def _numeric(values: list) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def grid_edges(grid: dict[str, list], point: dict) -> list[str]:
    """The tuned keys whose chosen value is the smallest or largest of a numeric grid: the optimum was
    not bracketed and may lie beyond the grid (with two values every choice is an edge)."""
    edges = []
    for key, values in grid.items():
        if len(values) < 2 or not _numeric(values) or key not in point:
            continue
        if point[key] in (min(values), max(values)):
            side = "largest" if point[key] == max(values) else "smallest"
            edges.append(f"{key}={point[key]} is the {side} value tried: the best may lie beyond {values}")
    return edges


def unstable_neighbours(grid: dict[str, list], point: dict, unstable: set[str]) -> list[str]:
    """The tuned keys along which the chosen point's next value in its numeric grid (the other keys
    held) had a diverged or failed seed (`unstable`: their point keys): the choice borders a cliff."""
    out = []
    for key, values in grid.items():
        if not _numeric(values) or key not in point or point[key] not in values:
            continue
        ordered = sorted(values)
        i = ordered.index(point[key])
        for j in (i - 1, i + 1):
            if 0 <= j < len(ordered) and point_key({**point, key: ordered[j]}) in unstable:
                out.append(f"{key}={ordered[j]}, next to the chosen {point[key]}, had a diverged or failed seed: "
                           "the chosen setting borders instability")
    return out


@dataclass
class Tuning:
    """A study's tuning: each variant's tune point chosen on its tuning runs alone (``choose_tuned``, as
    the runner chose it), why a variant got none, what to doubt about each choice (the grid edges it
    sits on, the unstable points it borders), and every tune point's record."""

    chosen: dict[str, dict]  # variant -> its tune point
    none: dict[str, str]  # variant -> why no point could be chosen
    flags: dict[str, list[str]]  # variant -> doubts about its chosen point
    points: pd.DataFrame  # per (variant, point): sweep, val_loss (mean of finished seeds), seeds, failures, chosen
    runs: pd.DataFrame  # the tuning runs


def study_tuning(runs: pd.DataFrame, design: StudyDesign) -> Tuning | None:
    """The tuning of a study (None where it tunes nothing or no tuning run is here): each variant's grid,
    and the spec's margin where its metric is val loss (else val loss's default)."""
    tuning = runs[runs["role"] == "tune"] if "role" in runs else runs.iloc[:0]
    if tuning.empty or not design.tuned:
        return None
    loss = MetricSpec(name="val_loss")
    margin = (design.margin if design.margin is not None and metric_of(design.metric, tuning).name == loss.name
              else loss.default_margin)
    # a quantized variant's float run is tuned on its variant's grid
    grids = {v: design.tune_grid(v.removesuffix(FLOAT)) for v in tuning["variant"].unique()}
    chosen, none = choose_tuned(tuning, grids, margin)
    eligible = eligible_points(tuning)
    flags = {}
    for variant, point in chosen.items():
        unstable = set(eligible.loc[(eligible["variant"] == variant) & ~eligible["eligible"], "point"])
        doubts = grid_edges(grids[variant], point) + unstable_neighbours(grids[variant], point, unstable)
        if doubts:
            flags[variant] = doubts
    eligible = eligible.set_index(["variant", "point"])
    points = []
    for (variant, point), group in tuning.groupby(["variant", tuning["sweep"].map(point_key)], sort=False):
        at = eligible.loc[(variant, point)]
        points.append({"variant": variant, "sweep": group["sweep"].iloc[0],
                       "val_loss": group.loc[group["status"] == "finished", "val_loss"].mean(),
                       "seeds": sorted(int(s) for s in group["seed"]), "diverged": int(at["diverged"]),
                       "failed": int(at["failed"]), "eligible": bool(at["eligible"]),
                       "chosen": chosen.get(variant) == group["sweep"].iloc[0]})
    return Tuning(chosen, none, flags, pd.DataFrame(points), tuning)


def variant_summary(runs: pd.DataFrame, baseline: str, references: Mapping[str, str | None] | None = None,
                    extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per variant (baseline first, then by mean val loss): per quality metric (and the
    `extra` columns, e.g. a learning-speed metric) the mean, sd and 95% CI over seeds; its reference;
    params, FLOPs, tokens/s, memory; how many runs failed or diverged at the point it is judged at."""
    references = references or {}
    chosen = best_of_sweep(runs)
    rows = []
    for variant, group in chosen.groupby("variant", sort=False):
        row = {"variant": variant, "n": len(group), "sweep": group["sweep"].iloc[0]}
        for metric in (*QUALITY, *[e for e in extra if e not in QUALITY]):
            ci = mean_ci(group[metric].tolist() if metric in group else [])
            row.update({f"{metric}_mean": ci.mean, f"{metric}_sd": ci.sd, f"{metric}_ci_low": ci.low,
                        f"{metric}_ci_high": ci.high})
        for column in ("params", "active_params", "flops_per_token", "tokens_per_s", "peak_memory_bytes", "mfu",
                       "kv_cache_bytes_per_token", "state_bytes"):
            row[column] = group[column].median() if column in group else float("nan")
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    # failures count at the point each variant is judged at (the others are in its sensitivity curve)
    points = eligible_points(runs).set_index(["variant", "point"])
    for status in ("failed", "diverged"):
        table[status] = [int(points[status].get((v, point_key(sweep)), 0)) for v, sweep in zip(table["variant"], table["sweep"])]
    # "" for the baseline and for variants that are references of their own (compare: {v: null}); runs under
    # names the design does not give (a quantized variant's float run) against the baseline
    table["reference"] = [references.get(v, baseline) or "" if v != baseline else "" for v in table["variant"]]
    others = table[table["variant"] != baseline].sort_values("val_loss_mean")["variant"].tolist()
    order = [v for v in [baseline, *others] if v in set(table["variant"])]
    return table.set_index("variant").reindex(order).reset_index()


# -- comparisons --------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """A variant against its reference on the study's metric, and the verdict in words."""

    variant: str
    reference: str
    metric: str
    n: int
    delta: float
    ci_low: float
    ci_high: float
    p: float  # the test's own two-sided p-value (no difference) at the current seeds
    p_adjusted: float  # after the looks (adaptive seeds) and Holm–Shaffer across the study's comparisons
    test: str
    verdict: str
    margin: float
    mde: float  # the smallest |difference| these seeds could detect at 80% power, after the correction
    sd: float
    p_equivalent: float = math.nan  # TOST (a difference of at least the margin) at the current seeds
    p_equivalent_adjusted: float = math.nan  # after the looks and the correction
    seeds: list[int] = field(default_factory=list)
    n_reference: int = 0
    p_sequential: float = math.nan  # after the looks, before the correction
    p_equivalent_sequential: float = math.nan
    higher_is_better: bool = False
    machine: str | None = None
    note: str = ""  # why it is inconclusive when seeds are not the reason
    needs_seeds: bool = True  # whether more seeds could decide it (not after failures, saturation)
    censored: int = 0  # seeds where either side never reached the target (tokens_to_target)
    unit: str = ""
    alpha: float = 0.05
    tuned: dict = field(default_factory=dict)  # variant and reference -> the tuned values they ran at
    decided_at: dict | None = None  # the look that decided it, when before all seeds: n, delta, ci_low, ci_high

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
        later = ""
        if self.decided_at and self.verdict in ("better", "worse", "equivalent"):
            d = self.decided_at  # the verdict's numbers are its deciding look's; the later seeds are stated too
            later = (f" {self.n - d['n']} more seed(s) were trained after that look: over all "
                     f"{self.n} seeds Δ {significant(self.delta, sign=True)}{unit} ({ci}).")
            ci = (f"95% CI {significant(d['ci_low'], sign=True)} to {significant(d['ci_high'], sign=True)}")
            over = f"{self.test} over the first {d['n']} seeds, the look that decided it"
        delta = self.decided_at["delta"] if later else self.delta
        if self.verdict in ("better", "worse"):
            bound = (f"at least {significant(abs(delta))}{unit} ({self.censored} seed(s) never reached the target: "
                     "their values are lower bounds, so the difference is at least this large; "
                     if self.censored else f"{significant(abs(delta))}{unit} (")
            return (f"{self.variant} is {self.verdict} than {self.reference} by {bound}{ci}, {over}, Holm-adjusted p "
                    f"{p_value(self.p_adjusted)}).{later}")
        if self.verdict == "equivalent":
            detectable = (f" The difference itself is detectable (adjusted p {p_value(self.p_adjusted)}), but smaller "
                          "than the margin." if self.p_adjusted < self.alpha else "")
            return (f"{self.variant} is equivalent to {self.reference} within ±{self.margin:g}{unit} "
                    f"(Δ {significant(delta, sign=True)}, {ci}, {over}, TOST adjusted p "
                    f"{p_value(self.p_equivalent_adjusted)}).{detectable}{later}")
        if self.verdict == "saturated":
            return (f"{self.variant} vs {self.reference} is saturated: every seed of both reached the metric's bound, so "
                    "the task cannot tell them apart at this budget. That is no evidence that they are the same: compare "
                    "learning speed (metric: online_loss or tokens_to_target), or make the task harder.")
        if self.note:
            return f"{self.variant} vs {self.reference} is inconclusive: {self.note}."
        equivalence = f", and equivalence needs the difference shown inside ±{self.margin:g}" if self.margin > 0 else ""
        return (f"{self.variant} vs {self.reference} is inconclusive: Δ {significant(self.delta, sign=True)}{unit} "
                f"({ci}, {over}, Holm-adjusted p {p_value(self.p_adjusted)}); these seeds could detect a difference of "
                f"±{significant(self.mde)} or more (80% power, after the correction){equivalence}.")

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
    """The verdicts of one study on one machine (or its runs pooled): the decision rule, the noise floor,
    each comparison, the variants' table, and the doubts about tuned settings."""

    study: str
    metric: str  # the runs column the verdicts test
    design: Design
    noise: Noise
    comparisons: list[Comparison]
    variants: pd.DataFrame
    machine: str | None = None
    metric_spec: MetricSpec | None = None
    tuning: dict[str, list[str]] = field(default_factory=dict)  # variant -> doubts about its tuned setting

    @property
    def higher_is_better(self) -> bool:
        return self.metric_spec.higher_is_better if self.metric_spec else "accuracy" in self.metric

    @property
    def metric_label(self) -> str:
        """The metric in words, in full (what it is, how it is measured)."""
        return self.metric_spec.describe() if self.metric_spec else self.metric.replace("_", " ")

    @property
    def metric_name(self) -> str:
        """The metric's short name ("val loss", "steps to loss 1")."""
        return self.metric_spec.label if self.metric_spec else self.metric.replace("_", " ")

    def pending(self) -> set[str]:
        """Variants (with their references) in comparisons that more seeds could still decide."""
        return pending(self.comparisons)

    def to_dict(self) -> dict:
        return {"study": self.study, "machine": self.machine, "metric": self.metric, "metric_description": self.metric_label,
                "alpha": self.design.alpha, "margin": self.design.margin, "design": self.design.describe(),
                "noise": {"baseline_sd": _json_number(self.noise.baseline_sd), "baseline_n": self.noise.baseline_n,
                          "paired_sd": _json_number(self.noise.paired_sd), "paired_df": self.noise.paired_df},
                "tuning_flags": self.tuning,
                "comparisons": [c.to_dict() for c in self.comparisons]}


def _per_seed(group: pd.DataFrame, metric: str) -> dict[int, float]:
    values = group.dropna(subset=[metric]) if metric in group else group.iloc[:0]
    return {int(s): float(v) for s, v in zip(values["seed"], values[metric])}


def _sequential(tests: list[Test], looks: list[tuple[int, float]], alpha: float, which: str) -> tuple[float, Test | None]:
    """The smallest p_k·α/α_k over the looks that have a p-value (NaN if none has), and the test of
    the first look that crossed α (else of the smallest): a verdict reached at a look stands on that
    look's seeds."""
    ps = [(min(1.0, getattr(t, which) * alpha / level), t) for t, (_, level) in zip(tests, looks)
          if not math.isnan(getattr(t, which))]
    if not ps:
        return math.nan, None
    smallest = min(p for p, _ in ps)
    return smallest, next((t for p, t in ps if p < alpha), min(ps, key=lambda pair: pair[0])[1])


def compare(variant: dict[int, float], reference: dict[int, float], design: Design,
            equivalence: bool = True) -> tuple[Test, tuple[float, Test | None], tuple[float, Test | None], float]:
    """Test one comparison from per-seed values: paired where the seeds pair up (at least two shared
    seeds), else Welch. Returns the test at all seeds, the sequential p-values (no difference;
    equivalence: NaN where `equivalence` is off) each with the test of the look that gave it, and the
    α of the last look."""
    shared = sorted(set(variant) & set(reference))
    margin = design.margin if equivalence else 0.0
    if len(shared) >= 2:
        differences = np.array([variant[s] - reference[s] for s in shared])
        looks = design.looks(len(shared))
        tests = [paired(differences[:k], design, margin) for k, _ in looks]
        test = paired(differences, design, margin)
    else:  # seeds that don't pair up: every look's α was spent on what is here now
        test = welch(list(variant.values()), list(reference.values()), margin)
        looks = design.looks(test.n)[-1:]
        tests = [test]
    return (test, _sequential(tests, looks, design.alpha, "p"), _sequential(tests, looks, design.alpha, "p_equivalent"),
            looks[-1][1])


def saturated(mine: dict[int, float], theirs: dict[int, float], bound: float | None, higher_is_better: bool) -> bool:
    """Whether every value of both sides sits at the metric's bound (≥ it when higher is better, else ≤)."""
    values = [*mine.values(), *theirs.values()]
    if bound is None or not mine or not theirs:
        return False
    return all(v >= bound if higher_is_better else v <= bound for v in values)


def judge(values: dict[str, dict[int, float]], pairs: list[tuple[str, str]], metric: MetricSpec, design: Design,
          machine: str | None = None, problems: dict[str, str] | None = None,
          censored: dict[str, set[int]] | None = None) -> list[Comparison]:
    """The comparisons (variant, reference) of one study from per-seed values of its metric: each
    tested, both hypotheses corrected across the study together, and given its verdict; sorted by
    verdict, then |Δ|. `problems`: variant → why its seeds cannot be judged (failed, diverged); a
    comparison with one is inconclusive for good. `censored`: variant → seeds whose value is only a
    lower bound (no equivalence is claimed from those)."""
    problems, censored = problems or {}, censored or {}
    higher = metric.higher_is_better
    comparisons, levels = [], []
    for variant, reference in pairs:
        mine, theirs = values.get(variant, {}), values.get(reference, {})
        shared = sorted(set(mine) & set(theirs))
        n_censored = sum(1 for s in (shared or set(mine) | set(theirs))
                         if s in censored.get(variant, set()) | censored.get(reference, set()))
        test, (p_sequential, deciding), (p_equivalent_sequential, deciding_equivalence), level = compare(
            mine, theirs, design, equivalence=not n_censored)
        c = Comparison(
            variant=variant, reference=reference, metric=metric.column, n=test.n, delta=test.delta, ci_low=test.ci_low,
            ci_high=test.ci_high, p=test.p, p_adjusted=math.nan, test=test.test, verdict="inconclusive",
            margin=design.margin, mde=math.nan, sd=test.sd, p_equivalent=test.p_equivalent,
            seeds=shared or sorted(mine), n_reference=len(theirs), p_sequential=p_sequential,
            p_equivalent_sequential=p_equivalent_sequential, higher_is_better=higher, machine=machine,
            censored=n_censored, unit=metric.unit_name, alpha=design.alpha)
        failed = "; ".join(filter(None, (problems.get(variant), problems.get(reference))))
        if failed:
            c.note, c.needs_seeds = failed, False
        elif saturated(mine, theirs, design.bound, higher):
            c.verdict, c.needs_seeds = "saturated", False
        elif test.untestable:
            c.note = test.untestable
        if c.note or c.verdict == "saturated":  # no claim: out of the tests, still in the correction's count
            c.p_sequential = c.p_equivalent_sequential = math.nan
        comparisons.append(c)
        levels.append((level, test.se, test.df, deciding, deciding_equivalence))
    adjusted, adjusted_equivalent = holm_shaffer([c.p_sequential for c in comparisons],
                                                 [c.p_equivalent_sequential for c in comparisons])
    for c, p, p_equivalent, (level, se, df, deciding, deciding_equivalence) in zip(
            comparisons, adjusted, adjusted_equivalent, levels):
        c.p_adjusted, c.p_equivalent_adjusted = p, p_equivalent
        c.mde = minimum_detectable(se, df, level / len(comparisons))  # Holm's first step: α / comparisons
        if c.verdict == "saturated" or c.note:
            continue
        if p_equivalent < design.alpha:
            c.verdict = "equivalent"
            c.decided_at = _earlier_look(deciding_equivalence, c.n)
        elif p < design.alpha and c.delta != 0:
            c.decided_at = _earlier_look(deciding, c.n)
            delta = c.decided_at["delta"] if c.decided_at else c.delta  # the deciding look's direction
            c.verdict = "better" if (delta > 0) == higher else "worse"
        elif c.censored:
            c.note = (f"{c.censored} seed(s) never reached the target (a lower bound); Δ {significant(c.delta, sign=True)} "
                      f"{c.unit}, Holm-adjusted p {p_value(c.p_adjusted)}: no equivalence is claimed from censored values")
    order = {v: i for i, v in enumerate(VERDICTS)}
    comparisons.sort(key=lambda c: (order[c.verdict], -abs(c.delta) if not math.isnan(c.delta) else 0))
    return comparisons


def _earlier_look(test: Test | None, n: int) -> dict | None:
    """The deciding look's seeds, difference and CI when it came before all n seeds were in (seeds
    trained later for other comparisons do not undo a verdict reached at a look), else None."""
    if test is None or test.n >= n:
        return None
    return {"n": test.n, "delta": test.delta, "ci_low": test.ci_low, "ci_high": test.ci_high}


def pending(comparisons: list[Comparison]) -> set[str]:
    """What adaptive seeds train next: the variants, with their references, of every comparison that
    is inconclusive for want of seeds."""
    return {name for c in comparisons if c.verdict == "inconclusive" and c.needs_seeds
            for name in (c.variant, c.reference)}


def noise_floor(values: dict[str, dict[int, float]], baseline: str, comparisons: list[Comparison]) -> Noise:
    """The baseline's seed-to-seed sd, and the sd of paired differences pooled over the comparisons."""
    paired_ = [c for c in comparisons if c.test != "welch" and c.n >= 2 and not math.isnan(c.sd)]
    df = sum(c.n - 1 for c in paired_)
    pooled = math.sqrt(sum((c.n - 1) * c.sd**2 for c in paired_) / df) if df else math.nan
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


def with_metric(runs: pd.DataFrame, curves: pd.DataFrame | None, metric: MetricSpec) -> tuple[pd.DataFrame, dict[str, Value]]:
    """The runs with the metric's value in its column (a learning-speed metric read off the curves),
    and each finished run's Value (censored, or missing with the reason)."""
    done = runs[runs["status"] == "finished"]
    values = run_values(done, curves, metric)
    if metric.column in QUALITY and metric.column in runs:
        return runs, values
    column = runs["run_id"].map(lambda r: values[r].value if r in values else math.nan)
    return runs.assign(**{metric.column: column.astype(float)}), values


def _problems(runs: pd.DataFrame, table: pd.DataFrame, variants: list[str], values: dict[str, Value],
              chosen: pd.DataFrame) -> dict[str, str]:
    """Variant → why its seeds cannot all be judged: seeds that failed or diverged at the point it is
    judged at (all its runs where none finished), and finished seeds without a value of the metric."""
    out = {}
    judged = table.set_index("variant") if not table.empty else pd.DataFrame()
    for variant in variants:
        if variant in judged.index:
            row = judged.loc[variant]
            failed, diverged, finished = int(row["failed"]), int(row["diverged"]), int(row["n"])
        else:
            mine = runs[runs["variant"] == variant]
            failed, diverged, finished = (int((mine["status"] == s).sum()) for s in ("failed", "diverged", "finished"))
            if not failed and not diverged:
                continue  # not run yet
        total = failed + diverged + finished
        parts = [f"{k} of {total} seeds of {variant} {what}" for k, what in ((diverged, "diverged"), (failed, "failed")) if k]
        missing = [values[r].missing for r in chosen.loc[chosen["variant"] == variant, "run_id"]
                   if r in values and values[r].missing]
        if missing:
            parts.append(f"{len(missing)} of {total} seeds of {variant} have no value: {missing[0]}")
        if parts:
            out[variant] = "; ".join(parts) + (" (they count against it: no verdict)" if failed or diverged else "")
    return out


def summarise(runs: pd.DataFrame, design: StudyDesign, machine: str | None = None,
              curves: pd.DataFrame | None = None) -> StudySummary:
    """The verdicts of a study from its runs on one machine: each variant at its chosen sweep point
    against its reference. `curves`: the store's per-step metrics (learning-speed metrics are read
    off them)."""
    metric = metric_of(design.metric, runs)
    rule = design.rule(metric)
    baseline = design.baseline
    tuning = study_tuning(runs, design)
    runs = eval_runs(runs)
    runs, run_values_ = with_metric(runs, curves, metric)
    table = variant_summary(runs, baseline, design.references, extra=(metric.column,))
    chosen = best_of_sweep(runs)
    values = {v: _per_seed(g, metric.column) for v, g in chosen.groupby("variant")}
    censored = {v: {int(s) for s, r in zip(g["seed"], g["run_id"]) if r in run_values_ and run_values_[r].censored}
                for v, g in chosen.groupby("variant")}
    pairs = []
    variants = [v for v in design.variants if v in set(runs["variant"])] or list(table["variant"])
    for v in variants:
        runs_of = chosen[chosen["variant"] == v]
        if _post_training(runs_of) and f"{metric.column}_float" in runs_of:
            # post-training quantization: against its own float checkpoint, evaluated the same way, and
            # against another post-training method the spec names (the same checkpoint per seed)
            values[v + FLOAT] = _per_seed(runs_of, f"{metric.column}_float")
            pairs.append((v, v + FLOAT))
            if (ref := design.compare.get(v)) in values and _post_training(chosen[chosen["variant"] == ref]):
                pairs.append((v, ref))
        # runs under names the spec does not give (an older plan's) are compared with the baseline
        elif v != baseline and (ref := design.references.get(v, baseline)) and _same_data(chosen, v, ref):
            pairs.append((v, ref))
    problems = _problems(runs, table, variants, run_values_, chosen)
    comparisons = judge(values, pairs, metric, rule, machine, problems, censored)
    if design.tuned:  # the values each side was trained at, chosen on the tuning seeds
        at = dict(zip(table["variant"], table["sweep"])) if not table.empty else {}
        for c in comparisons:
            c.tuned = {c.variant: at.get(c.variant) or {}, c.reference: at.get(c.reference) or {}}
    return StudySummary(design.name, metric.column, rule, noise_floor(values, baseline, comparisons),
                        comparisons, table, machine, metric, tuning.flags if tuning else {})


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


# -- the study on each machine ------------------------------------------------------------------------


@dataclass
class StudyAnalysis:
    """Everything the report, the runner's summary and ``--json`` say about one study on one machine:
    its verdicts (``summary``: noise, comparisons, variants, the doubts about tuned settings), a
    recipe ladder's climb, the study's tuning, and the scaling laws of its runs there."""

    machine: str
    summary: StudySummary
    ladder: pd.DataFrame | None  # ``ladder_climb`` on this machine (a recipe ladder only)
    tuning: Tuning | None  # chosen on every machine's tuning runs, as the runner chose (``study_tuning``)
    fits: Callable[[], dict[str, dict]] = field(repr=False, compare=False)  # machine -> its scaling summary

    @property
    def scaling(self) -> dict | None:
        """This machine's part of ``scaling_per_machine`` (None where its runs span too few sizes or
        budgets). Fitted on first use, for every machine of the study at once: the bootstrap takes
        seconds, and the runner's console summary does not show the laws."""
        return self.fits().get(self.machine)


def analyse(runs: pd.DataFrame, design: StudyDesign, curves: pd.DataFrame | None = None) -> list[StudyAnalysis]:
    """The study on each machine its runs ran on (a machine with no finished run is left out), from its
    current runs and the store's per-step metrics (`curves`). Losses from different hardware are not one
    sample: each machine gets its own verdicts, ladder and scaling fits."""
    runs = runs.assign(machine=runs["machine"].fillna(NOT_RUN))
    evaluated = eval_runs(runs)
    fits = functools.cache(lambda: {part["machine"]: part for part in
                                    scaling_per_machine(evaluated, design.baseline, design.extrapolate_to)})
    tuning = study_tuning(runs, design)
    out = []
    for machine, group in runs.groupby("machine", sort=False):
        if not (group["status"] == "finished").any():  # planned or failed runs alone (an interrupted study)
            continue
        summary = summarise(group, design, machine, curves)
        if summary.variants.empty:
            continue
        ladder = None
        if design.ladder:
            mine = with_metric(evaluated[evaluated["machine"] == machine], curves, summary.metric_spec)[0]
            ladder = ladder_climb(mine, list(design.ladder), summary.metric)
        out.append(StudyAnalysis(machine, summary, ladder, tuning, fits))
    return out
