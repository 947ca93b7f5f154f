"""The report's section for a study with cells (``cells:``): Zoology's MQAR figure (Arora et al. 2023,
Figure 2). The study's metric against the first cell key (model width, on a log2 axis where it is a
number), one panel per value of the other keys (sequence length), one line per variant as the spec
names it: its mean over seeds with the 95% CI band, each point marked by the verdict against its
reference in the same cell (filled: decided; hollow: inconclusive or saturated; a square: the
reference itself). Beside it the verdicts cell by cell, and above it the study's answer in one
computed statement per panel: the smallest first-key value at which each variant's mean reaches a
threshold (0.9 for accuracy and recall), against the baseline's.

Everything is read off the analysis (``StudySummary``: each variant's mean and CI, each comparison's
difference, CI and verdict) and the design (``StudyDesign.cell_of``); nothing is recomputed here.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from markupsafe import Markup
from matplotlib import lines, ticker

from bench.analysis import StudyAnalysis, StudySummary
from bench.formatting import significant
from bench.report import figures
from bench.spec import StudyDesign

THRESHOLD = 0.9  # what a bounded score (accuracy, recall) must reach to count as solving the task
DECIDED = ("better", "worse", "equivalent")  # filled markers; inconclusive and saturated are hollow


def default_threshold(summary: StudySummary) -> float | None:
    """The level the statement asks each variant to reach: 0.9 for a score bounded by 1 (accuracy,
    recall), else none (a loss has no level that means solved)."""
    bounded = summary.metric.startswith(("val_accuracy", "val_recall"))
    return THRESHOLD if bounded and summary.higher_is_better else None


def _numeric(values) -> bool:
    return all(isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) for v in values)


def _shown(value) -> str:
    """A cell value as the text shows it: floats in positional notation (0.00001, not 1e-05)."""
    return np.format_float_positional(value, trim="-") if isinstance(value, float) else str(value)


def _x_label(key: str, value) -> str:
    return f"{key}={_shown(value)}"


def _panel(cell: dict, first: str) -> str:
    """The cell's other keys as a panel's title: seq_len=64 (a whole section's keys each by name:
    seq_len=64, num_kv_pairs=4)."""
    parts = []
    for key, value in cell.items():
        if key != first:
            named = value.items() if isinstance(value, dict) else [(key.rsplit(".", 1)[-1], value)]
            parts += [f"{k}={_shown(v)}" for k, v in named]
    return ", ".join(parts)


def cell_frame(summary: StudySummary, design: StudyDesign) -> pd.DataFrame:
    """One row per variant and cell that has finished runs, in the grid's order: variant (as the spec
    names it), name (expanded), cell (its label), panel (the label of the cell's other keys, "" with
    one key), x (the first key's value), mean, low, high (its 95% CI), n, and against its reference in
    the cell: reference (as the spec names it; "" for none), verdict, delta, ci_low, ci_high."""
    columns = ["variant", "name", "cell", "panel", "x", "mean", "low", "high", "n", "reference", "verdict", "delta",
               "ci_low", "ci_high"]
    if not design.cells or summary.variants.empty:
        return pd.DataFrame(columns=columns)
    first = next(iter(design.cells))
    table = summary.variants.set_index("variant")
    metric = summary.metric
    judged = {c.variant: c for c in summary.comparisons if c.reference == design.reference_of(c.variant)}
    rows = []
    for label, cell in design.cell_grid:
        for variant in design.cell_names:
            name = design.in_cell(variant, label)
            if name not in table.index:
                continue
            r, c = table.loc[name], judged.get(name)
            reference = design.reference_of(name)
            rows.append({"variant": variant, "name": name, "cell": label, "panel": _panel(cell, first),
                         "x": cell[first], "mean": r[f"{metric}_mean"], "low": r[f"{metric}_ci_low"],
                         "high": r[f"{metric}_ci_high"], "n": int(r["n"]),
                         "reference": design.cell_of(reference)[0] if reference else "",
                         "verdict": c.verdict if c else None, "delta": c.delta if c else math.nan,
                         "ci_low": c.ci_low if c else math.nan, "ci_high": c.ci_high if c else math.nan})
    return pd.DataFrame(rows, columns=columns)


def _reaches(mean: float, threshold: float, higher_is_better: bool) -> bool:
    return bool(np.isfinite(mean)) and (mean >= threshold if higher_is_better else mean <= threshold)


def reaching(frame: pd.DataFrame, threshold: float, higher_is_better: bool = True) -> list[dict]:
    """Per variant and panel (in the frame's order): ``at``, the smallest x whose mean reaches
    `threshold` (None where none does; x in numeric order, else in the frame's), ``best`` (the best
    mean), ``best_at`` (its x) and ``tried`` (the x values, in order)."""
    rows = []
    for (variant, panel), group in frame.groupby(["variant", "panel"], sort=False):
        group = group.dropna(subset=["mean"])
        if group.empty:
            continue
        if _numeric(group["x"]):
            group = group.assign(_x=group["x"].astype(float)).sort_values("_x", kind="stable")
        xs = [_python(x) for x in group["x"]]
        at = next((x for x, m in zip(xs, group["mean"]) if _reaches(m, threshold, higher_is_better)), None)
        best = int(np.argmax(group["mean"]) if higher_is_better else np.argmin(group["mean"]))
        rows.append({"variant": variant, "panel": panel, "at": at, "best": float(group["mean"].iloc[best]),
                     "best_at": xs[best], "tried": xs})
    return rows


def _python(value):
    """A numpy scalar as the Python number it holds (64, not 64.0 or np.int64(64))."""
    return value.item() if isinstance(value, np.generic) else value


def reach_statement(frame: pd.DataFrame, baseline: str, threshold: float, x_name: str, metric: str = "accuracy",
                    higher_is_better: bool = True) -> list[str]:
    """The study's answer, one sentence per panel: where the baseline's mean first reaches `threshold`
    along x (its smallest x), and where each other variant's does, against it ("attention reaches
    accuracy ≥ 0.9 at n_embd=64; gla needs n_embd=256 (4× attention's)"); "does not reach it within the
    n_embd values tried" where it never does, with its best mean. `frame`: variant, panel, x, mean per cell."""
    reached = reaching(frame, threshold, higher_is_better)
    level = f"{metric} {'≥' if higher_is_better else '≤'} {threshold:g}"
    out = []
    for panel in dict.fromkeys(r["panel"] for r in reached):
        by = {r["variant"]: r for r in reached if r["panel"] == panel}
        base = by.get(baseline)
        parts = []
        for name in [baseline] * (base is not None) + [v for v in by if v != baseline]:
            r, what = by[name], level if not parts else "it"
            if r["at"] is None:
                tried = r["tried"]
                span = f"{_shown(tried[0])} to {_shown(tried[-1])}" if len(tried) > 1 else _shown(tried[0])
                parts.append(f"{name} does not reach {what} within the {x_name} values tried ({span}; best "
                             f"{significant(r['best'], 3)} at {_x_label(x_name, r['best_at'])})")
                continue
            where = _x_label(x_name, r["at"])
            if name == baseline or base is None or base["at"] is None:
                parts.append(f"{name} reaches {what} at {where}")
                continue
            numeric = _numeric([r["at"], base["at"]])
            ratio = f" ({figures.plain(r['at'] / base['at'])}× {baseline}'s)" if numeric and base["at"] > 0 else ""
            if r["at"] == base["at"]:
                parts.append(f"{name} also at {where}")
            elif numeric and r["at"] < base["at"]:
                parts.append(f"{name} already at {where}{ratio}")
            else:
                parts.append(f"{name} needs {where}{ratio}")
        out.append((f"At {panel}: " if panel else "") + "; ".join(parts) + ".")
    return out


def recall_figure(frame: pd.DataFrame, x_name: str, metric: str, threshold: float | None = None,
                  palette: figures.Palette | None = None, bounded: bool = False) -> Markup | None:
    """One panel per panel value, x = the first cell key (log2 where it is a positive number), y = the
    metric: per variant its mean over seeds joined across x with the 95% CI band (error bars where a
    line has one point), each point filled where its verdict against its reference decided, hollow
    where it is inconclusive or saturated, a square where the variant is the reference in that cell."""
    frame = frame.dropna(subset=["mean"])
    if frame.empty:
        return None
    panels = list(dict.fromkeys(frame["panel"]))
    xs = list(dict.fromkeys(frame["x"]))
    log2 = _numeric(xs) and all(float(x) > 0 for x in xs)
    position = {x: float(x) for x in xs} if log2 else {x: float(i) for i, x in enumerate(xs)}
    colours = figures.colours_for(list(dict.fromkeys(frame["variant"])), palette)
    fig, grid = plt.subplots(1, len(panels), figsize=(max(4.2, 3.6 * len(panels)), 3.9), sharey=True, squeeze=False)
    axes = list(grid[0])
    for ax, panel in zip(axes, panels):
        for variant, colour in colours.items():
            line = frame[(frame["panel"] == panel) & (frame["variant"] == variant)]
            if line.empty:
                continue
            line = line.assign(pos=line["x"].map(position)).sort_values("pos")
            ax.plot(line["pos"], line["mean"], color=colour, linewidth=1.6, label=variant)
            band = line.dropna(subset=["low", "high"])
            if len(band) >= 2:
                ax.fill_between(band["pos"], band["low"], band["high"], color=colour, alpha=0.18, linewidth=0)
            elif len(band) == 1:
                ax.errorbar(band["pos"], band["mean"], yerr=[band["mean"] - band["low"], band["high"] - band["mean"]],
                            fmt="none", ecolor=colour, capsize=3)
            for _, point in line.iterrows():
                reference = not isinstance(point["verdict"], str)  # compared with none in this cell
                filled = reference or point["verdict"] in DECIDED
                ax.plot(point["pos"], point["mean"], "s" if reference else "o", markersize=7, markeredgewidth=1.5,
                        color=colour, markerfacecolor=colour if filled else "white", zorder=3)
        if threshold is not None:
            ax.axhline(threshold, color="black", linestyle="--", linewidth=0.9)
        if log2:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(ticker.FixedLocator([position[x] for x in xs]))
            ax.xaxis.set_major_formatter(figures.TickLabels(figures.plain))
            ax.xaxis.set_minor_locator(ticker.NullLocator())
        else:
            ax.set_xticks([position[x] for x in xs], [_shown(x) for x in xs])
        if bounded:
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel(x_name)
        ax.set_title(panel or f"{metric} against {x_name}")
    axes[0].set_ylabel(f"{metric} (mean over seeds, 95% CI)")
    handles = [lines.Line2D([], [], color=c, linewidth=1.6, label=v) for v, c in colours.items()]
    grey = "#555555"
    handles += [lines.Line2D([], [], marker="o", linestyle="", color=grey, label="decided vs its reference"),
                lines.Line2D([], [], marker="o", linestyle="", color=grey, markerfacecolor="white",
                             label="inconclusive or saturated"),
                lines.Line2D([], [], marker="s", linestyle="", color=grey, label="the reference")]
    if threshold is not None:
        handles.append(lines.Line2D([], [], color="black", linestyle="--", linewidth=0.9, label=f"threshold {threshold:g}"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.82 if len(handles) > 6 else 0.88))
    return figures.to_svg(fig)


def _rows(frame: pd.DataFrame, metric: str) -> list[dict]:
    """The verdict table per cell: each variant in each cell with its mean and 95% CI, and against its
    reference in the cell the paired difference, its CI and the verdict ("reference" where it is one)."""
    def mean(r) -> str:
        ci = (f" ({significant(r['low'], 3)} to {significant(r['high'], 3)})"
              if np.isfinite(r["low"]) and np.isfinite(r["high"]) else "")
        return f"{significant(r['mean'], 3)}{ci}"

    rows = []
    for _, r in frame.iterrows():
        compared = isinstance(r["verdict"], str)
        rows.append({"variant": r["variant"], "cell": r["cell"], "reference": r["reference"] or "–",
                     "mean": mean(r), "n": r["n"],
                     "delta": significant(r["delta"], 3, sign=True) if compared else "–",
                     "ci": (f"{significant(r['ci_low'], 3, sign=True)} to {significant(r['ci_high'], 3, sign=True)}"
                            if compared and np.isfinite(r["ci_low"]) and np.isfinite(r["ci_high"]) else "–"),
                     "verdict": r["verdict"] if compared else "reference"})
    return rows


def recall_section(analyses: list[StudyAnalysis], design: StudyDesign, palette: figures.Palette | None = None,
                   threshold: float | None = None) -> dict | None:
    """The section's content for a study with cells (None for any other): per machine the statement,
    the figure and the verdict table per cell; `threshold` (default: ``default_threshold``)."""
    if not design.cell_variants or not analyses:
        return None
    keys = list(design.cells)
    x_name = keys[0].rsplit(".", 1)[-1]
    baseline = design.cell_of(design.baseline)[0]
    parts = []
    for analysis in analyses:
        summary = analysis.summary
        frame = cell_frame(summary, design)
        if frame.empty:
            continue
        level = default_threshold(summary) if threshold is None else threshold
        metric = summary.metric_name
        parts.append({
            "machine": summary.machine,
            "statement": reach_statement(frame, baseline, level, x_name, metric, summary.higher_is_better)
            if level is not None else [],
            "figure": recall_figure(frame, x_name, metric, level, palette, bounded=default_threshold(summary) is not None),
            "rows": _rows(frame, metric), "metric": metric})
    if not parts:
        return None
    others = [k.rsplit(".", 1)[-1] for k in keys[1:]]
    return {"title": f"{parts[0]['metric']} against {x_name}" + (f", one panel per {', '.join(others)}" if others else ""),
            "x": x_name, "parts": parts, "several": len(parts) > 1, "baseline": baseline}
