"""The report's figures: seaborn on matplotlib's Agg backend, returned as inline SVG markup.

SVG rather than PNG: tick labels and legends stay text that the browser lays out (the report's
Chromium test measures their boxes), figures scale without blur, and the report stays one
self-contained file. Every figure that shows variants takes the report's one ``variant_palette``, so
a variant has the same colour in every figure; every axis is labelled in plain numbers (2, 20, 150k,
1.5G — never 2×10⁰ or 1e9) and ``to_svg`` thins or turns tick labels until no two overlap.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Iterable, Mapping

import matplotlib

matplotlib.use("Agg")  # files, not windows: reports are written on headless machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from markupsafe import Markup  # noqa: E402
from matplotlib import category, ticker  # noqa: E402

from bench.analysis import pareto_front  # noqa: E402
from bench.formatting import BYTE_UNITS, SI, TIME_UNITS, missing, significant, unit_for  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
# Text stays <text> that the browser sets in DejaVu Sans (or its sans-serif), not glyph outlines; clip
# paths and markers are named by a hash of their content with a fixed salt: the same store, the same bytes.
matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "archbench"})

Palette = Mapping[str, str]  # a variant's name -> its colour as #rrggbb


def variant_palette(names: Iterable) -> dict[str, str]:
    """One colour per name, in the order given — the baseline first, then the spec's variants, then any
    other name a figure shows (a kernel, a served variant): tab10's ten, then evenly spaced hues.
    The report builds it once and passes it to every figure, so a variant has one colour throughout."""
    order = list(dict.fromkeys(n for n in names if isinstance(n, str) and n))
    colours = list(sns.color_palette("tab10", 10))
    if len(order) > 10:
        colours += sns.color_palette("husl", len(order) - 10)
    return {name: matplotlib.colors.to_hex(c) for name, c in zip(order, colours)}


def _base_name(name: str, palette: Palette) -> str:
    """The palette's name for a line of a variant on one machine ("gqa · laptop", "gqa @ laptop")."""
    if name in palette:
        return name
    for separator in (" · ", " @ "):
        if separator in name and name.split(separator)[0] in palette:
            return name.split(separator)[0]
    return name


def colours_for(names: Iterable[str], palette: Palette | None = None) -> dict[str, str]:
    """The colour of each of `names` from `palette` (a variant on one machine takes the variant's), in
    the palette's order (legends list the baseline first). Without a palette (a figure drawn on its
    own) the names' own order makes one; names the palette lacks get the colours that follow its own."""
    names = list(dict.fromkeys(names))
    if palette is None:
        return variant_palette(names)
    unknown = [n for n in names if _base_name(n, palette) not in palette]
    extended = variant_palette([*palette, *unknown]) if unknown else palette
    rank = {n: i for i, n in enumerate(extended)}
    return {n: extended[_base_name(n, extended)] for n in sorted(names, key=lambda n: rank[_base_name(n, extended)])}


# -- tick labels --------------------------------------------------------------------------------------

def short(value: float, digits: int = 3) -> str:
    """A tick label: `digits` significant figures with an SI suffix, trailing zeros dropped — 0.003, 2,
    20, 150k, 1.5M, 150G (the axis label names the unit: FLOPs, tokens, FLOP/s)."""
    if missing(value) or not np.isfinite(value):
        return ""
    if value == 0:
        return "0"
    rounded = float(significant(value, digits))  # rounding first: 999.6k reads 1M, not 1000k
    unit, scale = unit_for(abs(rounded), SI)
    return _trim(significant(rounded / scale, digits)) + unit


def short_size(value: float, digits: int = 3) -> str:
    """Bytes in binary units, trailing zeros dropped: 512 B, 4 KiB, 97.7 KiB."""
    if missing(value) or not np.isfinite(value):
        return ""
    if value == 0:
        return "0"
    unit, scale = unit_for(abs(value), BYTE_UNITS)
    return f"{_trim(significant(value / scale, digits))} {unit}"


def plain(value: float, digits: int = 3) -> str:
    """A number as a tick label: `digits` significant figures in positional notation, trailing zeros
    dropped (0.25, 3, 1200, 0.0005)."""
    if missing(value) or not np.isfinite(value):
        return ""
    return "0" if value == 0 else _trim(significant(value, digits))


def _trim(text: str) -> str:
    return text.rstrip("0").rstrip(".") if "." in text else text


class TickLabels(ticker.Formatter):
    """Tick labels from `format_value(value, digits)` with as few significant figures (three at least)
    as tell an axis's ticks apart: 2.46, 2.47 on a wide axis, 2.4625, 2.465 on a narrow one — never
    matplotlib's offset ("+2.46") or scientific notation (1e-5, ×10⁻⁵) beside the axis."""

    def __init__(self, format_value: Callable[..., str] = plain):
        self.format_value = format_value

    def __call__(self, value, pos=None) -> str:
        return self.format_value(value)

    def format_ticks(self, values) -> list[str]:
        labels = [self.format_value(v) for v in values]
        for digits in range(4, 9):
            if len(set(labels)) == len(labels):
                break
            labels = [self.format_value(v, digits) for v in values]
        return labels


def _humanise(axis, format_value: Callable[..., str] = short) -> None:
    """Tick labels in units chosen by magnitude (never 1e9 or 2×10⁰): at most 5 ticks on a linear axis;
    on a log one 1, 2 and 5 × each decade (``to_svg`` keeps the decades only where they crowd), the
    minor ticks unlabelled."""
    if axis.get_scale() == "log":
        axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_minor_formatter(ticker.NullFormatter())
    else:
        axis.set_major_locator(ticker.MaxNLocator(nbins=4))
    axis.set_major_formatter(TickLabels(format_value))


def _plain_numbers(fig) -> None:
    """Any axis of numbers a figure left to matplotlib's defaults labelled in plain numbers: its log
    formatter prints 10⁰ at the decades and 2×10⁰, 3×10⁰ … at the minor ticks of a short range; its
    linear one may move an offset or a power of ten beside the axis."""
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if isinstance(axis.get_major_formatter(), ticker.LogFormatter):
                _humanise(axis, short)
            elif isinstance(axis.get_major_formatter(), ticker.ScalarFormatter):
                axis.set_major_formatter(TickLabels(plain))  # the locator matplotlib chose stays
            if axis.get_scale() == "log" and not isinstance(axis.get_minor_formatter(), ticker.NullFormatter):
                axis.set_minor_formatter(ticker.NullFormatter())


def _drawn_ticks(axis) -> list:
    """The ticks `axis` draws with a label (in its view, visible, not empty), as laid out now."""
    # Axis._update_ticks is what Axis.draw itself calls: it positions and labels exactly the ticks drawn
    return [t for t in axis._update_ticks() if t.label1.get_visible() and t.label1.get_text()]


def _crowded(labels: list, renderer) -> bool:
    """Whether any two labels' boxes overlap, each grown by a tenth of its font size on every side: the
    browser may set the text in a slightly wider font than the one matplotlib measured."""
    boxes = []
    for label in labels:
        box = label.get_window_extent(renderer)
        pad = 0.2 * label.get_fontsize() * renderer.points_to_pixels(1.0) / 2
        boxes.append((box.x0 - pad, box.y0 - pad, box.x1 + pad, box.y1 + pad))
    return any(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
               for i, a in enumerate(boxes) for b in boxes[i + 1:])


class _Decades(ticker.LogLocator):
    """A log axis's ticks at its decades only: what a crowded 1-2-5 log axis falls back to."""


def _declutter(fig) -> None:
    """Make every axis's tick labels stand apart: a crowded log axis keeps its decades only, a crowded
    axis of numbers every other tick (until none overlap), a crowded axis of names (which must all
    stay) turns them upright, 45° first."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            names = isinstance(axis.get_major_formatter(), ticker.FixedFormatter | category.StrCategoryFormatter)
            for _ in range(6):
                ticks = _drawn_ticks(axis)
                labels = [t.label1 for t in ticks]
                if len(labels) < 2 or not _crowded(labels, renderer):
                    break
                locator = axis.get_major_locator()
                if names:
                    if axis is ax.yaxis or labels[0].get_rotation() == 90:
                        break  # rows of names cannot turn: the figure's height is set per row instead
                    angle = 45 if labels[0].get_rotation() < 45 else 90
                    for label in axis.get_majorticklabels():
                        label.set(rotation=angle, ha="right" if angle < 90 else "center", rotation_mode="anchor"
                                  if angle < 90 else "default")
                elif isinstance(locator, ticker.LogLocator) and not isinstance(locator, _Decades):
                    axis.set_major_locator(_Decades(base=10, subs=(1.0,)))
                else:
                    axis.set_major_locator(ticker.FixedLocator([t.get_loc() for t in ticks][::2]))
                    axis.set_minor_formatter(ticker.NullFormatter())


# -- output -------------------------------------------------------------------------------------------

_TAG = re.compile(r"<[^>]+>")  # matplotlib escapes < in text, so this matches tags only


def to_svg(fig) -> Markup:
    """The figure as inline SVG markup for the report (closing it): log axes in plain numbers, tick
    labels decluttered, no metadata (no date: the report is a pure function of the store), ids
    prefixed by a hash of the figure so that no two figures in one page share one."""
    _plain_numbers(fig)
    _declutter(fig)
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight",
                metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    plt.close(fig)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]  # no XML declaration or doctype inside HTML
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)  # matplotlib comments each mathtext label's source
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    prefix = "f" + hashlib.sha256(svg.encode()).hexdigest()[:10] + "-"

    def tag(match: re.Match) -> str:
        text = match.group(0)
        text = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text)  # HTML parses inline SVG into its namespace
        text = text.replace("xlink:href=", "href=")  # SVG 2's plain href: no xlink namespace to declare
        text = re.sub(r'\bid="', f'id="{prefix}', text)
        text = text.replace('href="#', f'href="#{prefix}').replace("url(#", f"url(#{prefix}")
        return text

    return Markup(_TAG.sub(tag, svg).strip())


def with_runs(metrics: pd.DataFrame, runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Per-step metrics joined with their run's columns. Merged folders (one spec on two machines)
    share run ids, so rows are matched on the folder as well."""
    keys = ["run_id", "folder"] if "folder" in metrics and "folder" in runs else ["run_id"]
    return metrics.merge(runs[keys + columns], on=keys)


CURVE_AXES = (("tokens", "tokens seen", short), ("flops", "training FLOPs", short),
              ("seconds", "training time (s, evaluation excluded)", plain))
CURVE_POINTS = 400  # points per drawn curve: a panel is a few hundred pixels wide, and SVG grows with every point
MACHINE_STYLES = ("-", "--", ":", "-.")  # the same variant on another machine: its colour, another dash


def _thinned(frame: pd.DataFrame, points: int = CURVE_POINTS) -> pd.DataFrame:
    """At most `points` rows of a curve, evenly spaced, the first and last kept."""
    if len(frame) <= points:
        return frame
    return frame.iloc[np.unique(np.linspace(0, len(frame) - 1, points).round().astype(int))]


def _in_unit(values: pd.Series, units) -> tuple[pd.Series, str]:
    """Values divided by the unit their largest reaches (bars read 0, 128, 256 KiB, not 97.7 KiB)."""
    unit, scale = unit_for(values.abs().max(), units)
    return values / scale, unit


def loss_curves(metrics: pd.DataFrame, runs: pd.DataFrame, floor: float | None,
                palette: Palette | None = None) -> Markup | None:
    """Val and training loss against tokens, training FLOPs and training time (a variant that wins per
    step can lose per second): per variant the mean over seeds at each step, the band its min–max.
    Each variant in its palette colour; with several machines, one dash per machine."""
    if metrics.empty or "val_loss" not in metrics:
        return None
    data = with_runs(metrics, runs, ["variant", "machine", "flops_per_token"])
    if data["val_loss"].isna().all():
        return None
    data = data.sort_values("step").assign(flops=lambda d: d["tokens"] * d["flops_per_token"])
    # the raw per-step training loss is noisy: a rolling mean per run
    data["train_loss"] = data.groupby(["machine", "run_id"])["train_loss"].transform(
        lambda x: x.rolling(20, min_periods=1).mean())
    axes_shown = [a for a in CURVE_AXES if a[0] in data and data[a[0]].notna().any()]
    machines = list(dict.fromkeys(data["machine"]))
    several = len(machines) > 1
    lines = data.assign(line=data["variant"] + (" · " + data["machine"] if several else ""))
    order = {v: i for i, v in enumerate(palette or runs["variant"].unique())}  # the baseline first, as the spec names them
    names = sorted(lines["line"].unique(), key=lambda n: (order.get(n.split(" · ")[0], len(order)), n))
    colours = colours_for(names, palette)
    dashes = {n: MACHINE_STYLES[machines.index(n.split(" · ")[1]) % len(MACHINE_STYLES)] if several else "-"
              for n in names}
    log_x = {x: x != "seconds" and data[x].max() / max(data[x].min(), 1) > 20 for x, _, _ in axes_shown}
    fig, grid = plt.subplots(2, len(axes_shown), figsize=(4.4 * len(axes_shown), 7), squeeze=False)
    for row, (column, label) in enumerate((("val_loss", "validation loss"), ("train_loss", "training loss"))):
        for ax, (x, x_label, format_x) in zip(grid[row], axes_shown):
            points = lines.dropna(subset=[column, x])
            for name in names:
                group = points[points["line"] == name]
                if group.empty:
                    continue
                band = _thinned(group.groupby("step").agg(x=(x, "mean"), mean=(column, "mean"), low=(column, "min"),
                                                          high=(column, "max")))
                ax.plot(band["x"], band["mean"], color=colours[name], linestyle=dashes[name], label=name, linewidth=1.4,
                        marker="o" if len(band) < 3 else None, markersize=4)  # one evaluation is a point, not a line
                ax.fill_between(band["x"], band["low"], band["high"], color=colours[name], alpha=0.2, linewidth=0)
            if floor is not None:
                ax.axhline(floor, color="black", linestyle="--", linewidth=1, label="entropy rate (floor)")
            if log_x[x]:
                ax.set_xscale("log")
            _humanise(ax.xaxis, format_x)
            ax.set_xlabel(x_label)
            ax.set_ylabel(label)
    handles, labels = grid[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), frameon=False)
    fig.suptitle("mean over seeds (band: min–max over seeds)", y=0.94, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return to_svg(fig)


VERDICT_COLOURS = {"better": "#0a7b34", "worse": "#b42318", "equivalent": "#1d4ed8", "inconclusive": "#a58a00",
                   "saturated": "#7c3aed"}


def forest(comparisons: list, metric: str, margin: float, higher_is_better: bool) -> Markup | None:
    """Each comparison's paired difference from its reference with its 95% CI, the ±margin band shaded
    and the verdict as the marker's colour (verdicts, not variants, are coloured here): the study in
    one picture."""
    shown = [c for c in comparisons if np.isfinite(c.delta)]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.38 * len(shown) + 1.1))
    if margin > 0:
        ax.axvspan(-margin, margin, color="#d6e4ff", label=f"equivalence margin ±{margin:g}")
    ax.axvline(0, color="black", linewidth=0.8)
    labels = []
    for i, c in enumerate(shown):
        colour = VERDICT_COLOURS.get(c.verdict, "grey")
        # a verdict reached at an earlier look is drawn with that look's numbers, as its sentence states them
        decided = getattr(c, "decided_at", None)
        d = decided or {"delta": c.delta, "ci_low": c.ci_low, "ci_high": c.ci_high}
        if np.isfinite(d["ci_low"]) and np.isfinite(d["ci_high"]):
            ax.errorbar(d["delta"], i, xerr=[[d["delta"] - d["ci_low"]], [d["ci_high"] - d["delta"]]], fmt="none",
                        ecolor=colour, capsize=5, linewidth=2)
        ax.plot(d["delta"], i, "o", color=colour, markersize=9)
        labels.append(f"{c.variant} − {c.reference}" + (f" (its {decided['n']}-seed look)" if decided else ""))
    for verdict in dict.fromkeys(c.verdict for c in shown):
        ax.plot([], [], "o", color=VERDICT_COLOURS.get(verdict, "grey"), label=verdict)
    ax.set_yticks(range(len(shown)), labels)
    ax.set_ylim(len(shown) - 0.5, -0.5)
    _humanise(ax.xaxis, plain)
    better = "right" if higher_is_better else "left"
    ax.set_xlabel(f"Δ {metric.replace('_', ' ')} (variant − reference), paired, 95% CI; {better} is better")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=5, frameon=False, fontsize=8)
    return to_svg(fig)


def final_metrics(summary: pd.DataFrame, metrics: list[str], palette: Palette | None = None) -> Markup | None:
    """Each variant's mean with its 95% confidence interval, per quality metric, in its colour."""
    metrics = [m for m in metrics if summary[f"{m}_mean"].notna().any()]
    if not metrics:
        return None
    colours = colours_for(summary["variant"], palette)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 0.5 * len(summary) + 1.6), squeeze=False)
    labels = summary["variant"] + (" · " + summary["machine"] if summary["machine"].nunique() > 1 else "")
    for i, (ax, metric) in enumerate(zip(axes[0], metrics)):
        mean = summary[f"{metric}_mean"]
        low = (mean - summary[f"{metric}_ci_low"]).fillna(0)
        high = (summary[f"{metric}_ci_high"] - mean).fillna(0)
        for y, (variant, m, lo, hi) in enumerate(zip(summary["variant"], mean, low, high)):
            ax.errorbar([m], [y], xerr=[[lo], [hi]], fmt="o", capsize=4, color=colours[variant])
        ax.set_yticks(np.arange(len(summary)), labels if i == 0 else [""] * len(summary))
        ax.set_ylim(len(summary) - 0.5, -0.5)
        _humanise(ax.xaxis, plain)
        ax.set_title(f"{metric.replace('_', ' ')}: mean and 95% CI")
    return to_svg(fig)


COST_PANELS = (("tokens_per_s", "training tokens/s (higher is better)", True, short),
               ("peak_memory_bytes", "peak memory in training", False, short_size),
               ("params", "parameters", False, short),
               ("flops_per_token", "training FLOPs per token", False, short),
               ("kv_cache_bytes_per_token", "KV cache per token (bf16)", False, short_size),
               ("state_bytes", "decoding state per sequence (bf16)", False, short_size))


def quality_vs_cost(summary: pd.DataFrame, metric: str = "val_loss", higher_is_better: bool = False,
                    palette: Palette | None = None) -> Markup | None:
    """The quality metric against each cost the runs recorded; the Pareto front joined."""
    quality = f"{metric}_mean"
    panels = [p for p in COST_PANELS if p[0] in summary and summary[p[0]].notna().sum() >= 2
              and summary[p[0]].nunique() > 1]
    data = summary.dropna(subset=[quality])
    if not panels or len(data) < 2:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    colours = colours_for(data["variant"], palette)
    for ax, (column, label, higher_better, format_x) in zip(axes[0], panels):
        d = data.dropna(subset=[column])
        cost = -d[column].to_numpy(float) if higher_better else d[column].to_numpy(float)
        loss = -d[quality].to_numpy(float) if higher_is_better else d[quality].to_numpy(float)
        front = pareto_front(cost, loss)
        sns.scatterplot(data=d, x=column, y=quality, hue="variant", hue_order=list(colours), palette=colours, ax=ax, s=60,
                        legend=False)
        f = d[front].sort_values(column)
        ax.plot(f[column], f[quality], color="black", linewidth=1)
        _humanise(ax.xaxis, format_x)
        _humanise(ax.yaxis, plain)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric.replace('_', ' ')} (mean over seeds)")
    handles = [matplotlib.lines.Line2D([], [], marker="o", linestyle="", color=c, label=v) for v, c in colours.items()]
    handles.append(matplotlib.lines.Line2D([], [], color="black", label="Pareto front"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return to_svg(fig)


KERNEL_KEYS = ("machine", "component", "name", "backend", "direction", "seq_len", "phase", "context")


def kernel_figures(kernels: pd.DataFrame, palette: Palette | None = None) -> list[tuple[str, Markup]]:
    """Achieved FLOP/s of attention against sequence length (one panel per direction, one legend);
    decode costs per attention (at one prompt length; timed at several contexts: against the context,
    ``decode_context_figure``); latency of the other kernels. Each kernel in its variant's colour, the
    latest timing of each (a quieter rerun replaces a noisy one, as in the tables)."""
    figures = []
    ok = kernels[kernels["status"] == "ok"] if "status" in kernels else kernels.iloc[0:0]
    if not ok.empty:
        ok = ok.drop_duplicates([k for k in KERNEL_KEYS if k in ok], keep="last")
    colours = colours_for(ok["name"].dropna().astype(str), palette) if "name" in ok else {}
    attention = ok[ok["component"] == "attention"] if not ok.empty else ok
    if not attention.empty and attention["flops_per_s"].notna().any():
        several = attention["machine"].nunique() > 1
        names = [n for n in colours if n in set(attention["name"])]  # legend in the palette's order
        grid = sns.relplot(data=attention, x="seq_len", y="flops_per_s", hue="name", hue_order=names,
                           palette={n: colours[n] for n in names}, style="backend", col="direction",
                           row="machine" if several else None, kind="line", markers=True, height=3.2, aspect=1.4,
                           facet_kws={"sharey": False})
        grid.set(xscale="log")
        lengths = sorted(attention["seq_len"].dropna().unique())
        for ax in grid.axes.flat:
            ax.xaxis.set_major_locator(ticker.FixedLocator(lengths))
            ax.xaxis.set_major_formatter(TickLabels(short))
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            _humanise(ax.yaxis, short)
        grid.set_axis_labels("sequence length", "achieved FLOP/s")
        grid.figure.subplots_adjust(wspace=0.35)
        figures.append(("attention: achieved FLOP/s", to_svg(grid.figure)))
    decode = ok[ok["component"] == "decode"] if not ok.empty else ok
    against_context = decode_context_figure(decode, palette) if not decode.empty else None
    if against_context is not None:
        figures.append(("decode cost against context", against_context))
    if "context" in decode:  # rows timed at several contexts are drawn against them, not as bars
        decode = decode[decode["context"].isna()]
    if not decode.empty:
        machines = list(dict.fromkeys(decode["machine"]))
        fig, axes = plt.subplots(len(machines), 3, figsize=(12, 3.4 * len(machines)), squeeze=False)
        for row, machine in zip(axes, machines):
            mine = decode[decode["machine"] == machine]
            steps = mine[mine["phase"] == "decode"]
            if "kv_cache_bytes_final" in steps:  # held at the end of decoding, where the row says (after the prompt else)
                steps = steps.assign(kv_cache_bytes=steps["kv_cache_bytes_final"].fillna(steps["kv_cache_bytes"]))
            prefill = mine[mine["phase"] == "prefill"]
            for ax, data, column, title, units in (
                    (row[0], steps, "per_token_s", "per-token decode latency", TIME_UNITS),
                    (row[1], prefill, "median_s", "prefill latency", TIME_UNITS),
                    (row[2], steps, "kv_cache_bytes", "cache held after decoding (KV or state)", BYTE_UNITS)):
                if data.empty:
                    ax.set_axis_off()
                    continue
                values, unit = _in_unit(data[column], units)
                sns.barplot(data=data.assign(value=values), x="name", y="value", hue="name",
                            palette={n: colours[n] for n in data["name"]}, saturation=1, ax=ax, legend=False)
                _humanise(ax.yaxis, plain)
                ax.set(title=title + (f" · {machine}" if len(machines) > 1 else ""), xlabel="attention", ylabel=unit)
        fig.tight_layout()
        figures.append(("decode", to_svg(fig)))
    other = ok[ok["component"].isin(["mlp", "norm", "moe", "quantization"])] if not ok.empty else ok
    if not other.empty:
        values, unit = _in_unit(other["median_s"], TIME_UNITS)
        several = other["machine"].nunique() > 1
        other = other.assign(latency=values, label=other["name"] + (" · " + other["machine"] if several else ""))
        grid = sns.catplot(data=other, x="latency", y="label", hue="name",
                           palette={n: colours[n] for n in other["name"]}, col="component", row="direction",
                           kind="bar", dodge=False, saturation=1, sharex=False, sharey=False, height=2.6, aspect=1.4,
                           legend=False)
        for ax in grid.axes.flat:
            _humanise(ax.xaxis, plain)
        grid.set_axis_labels(f"latency ({unit}, median)", "")
        figures.append(("other kernels", to_svg(grid.figure)))
    return figures


def _powers_of_two(values: pd.Series, most: int = 6) -> list[float]:
    """Ticks for a log2 axis over `values`: powers of two, every k-th so that at most `most` are drawn."""
    low, high = int(np.floor(np.log2(values.min()))), int(np.ceil(np.log2(values.max())))
    step = max(1, -(-(high - low) // (most - 1)))
    return [2.0 ** k for k in range(low, high + 1, step)]


def decode_context_figure(kernels: pd.DataFrame, palette: Palette | None = None) -> Markup | None:
    """Decoding against the context it follows (decode rows timed at several ``contexts``): per-token
    latency, and the bytes the cache holds after the prompt (a KV cache grows with the context, a
    recurrent state does not), one line per variant in its colour (one dash per machine); log2 x.
    None where no timed decode row names a context."""
    if kernels.empty or not {"component", "phase", "context"} <= set(kernels):
        return None
    rows = kernels[(kernels["component"] == "decode") & (kernels["phase"] == "decode") & kernels["context"].notna()]
    if "status" in rows:
        rows = rows[rows["status"] == "ok"]
    if rows.empty:
        return None
    rows = rows.drop_duplicates([k for k in KERNEL_KEYS if k in rows], keep="last").sort_values("context")
    machines = list(dict.fromkeys(rows["machine"])) if "machine" in rows else [None]
    several = len(machines) > 1
    colours = colours_for(rows["name"].astype(str), palette)
    latency, time_unit = _in_unit(rows["per_token_s"].astype(float), TIME_UNITS)
    rows = rows.assign(latency=latency, held=rows["kv_cache_bytes"].astype(float))
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for name in colours:
        for m, machine in enumerate(machines):
            line = rows[(rows["name"] == name) & ((rows["machine"] == machine) if machine is not None else True)]
            if line.empty:
                continue
            style = {"color": colours[name], "linestyle": MACHINE_STYLES[m % len(MACHINE_STYLES)], "marker": "o",
                     "markersize": 4, "label": name + (f" · {machine}" if several else "")}
            axes[0].plot(line["context"], line["latency"], **style)
            axes[1].plot(line["context"], line["held"], **style)
    contexts = sorted(rows["context"].unique())
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(ticker.FixedLocator(contexts))
        ax.xaxis.set_major_formatter(TickLabels(lambda v, digits=3: f"{v:.0f}"))  # 1024, not 1.02k
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_xlabel("context (tokens prefilled before decoding)")
    _humanise(axes[0].yaxis, plain)
    axes[0].set_ylim(bottom=0)
    axes[0].set(ylabel=f"per-token decode latency ({time_unit})", title="per-token latency against context")
    held = rows["held"][rows["held"] > 0]
    if not held.empty and held.max() / held.min() > 20:  # a KV cache beside a state: both readable on log2
        axes[1].set_yscale("log", base=2)
        axes[1].yaxis.set_major_locator(ticker.FixedLocator(_powers_of_two(held)))
        axes[1].yaxis.set_minor_locator(ticker.NullLocator())
        axes[1].yaxis.set_major_formatter(TickLabels(short_size))
    else:
        _humanise(axes[1].yaxis, short_size)
        axes[1].set_ylim(bottom=0)
    batch = rows["batch"].dropna().unique() if "batch" in rows else []
    axes[1].set(ylabel="bytes (KV cache or state)", title="cache held after the prompt"
                + (f" (batch {int(batch[0])})" if len(batch) == 1 else ""))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    return to_svg(fig)


def scaling_figure(points: pd.DataFrame, fits: dict, palette: Palette | None = None) -> Markup | None:
    """Observed losses and fitted L(N, D) per variant, and each variant's compute-optimal frontier."""
    if not fits:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colours = colours_for(fits, palette)
    for variant, fit in fits.items():
        d = points[points["variant"] == variant]
        for n, group in d.groupby("params"):
            tokens = np.geomspace(group["tokens"].min() / 2, group["tokens"].max() * 4, 50)
            axes[0].plot(tokens, fit.loss(n, tokens), color=colours[variant], alpha=0.6, linewidth=1)
            axes[0].scatter(group["tokens"], group["val_loss"], color=colours[variant], s=18)
        spent = d["compute"] if "compute" in d else 6 * d["params"] * d["tokens"]
        compute = np.geomspace(spent.min() / 4, spent.max() * 100, 80)
        axes[1].plot(compute, fit.frontier_loss(compute), color=colours[variant], label=variant)
        axes[1].axvline(spent.max(), color=colours[variant], linestyle=":", linewidth=1)
        axes[1].scatter(spent, d["val_loss"], color=colours[variant], s=14, alpha=0.6)
    estimated = points["estimated"] if "estimated" in points else pd.Series(True, index=points.index)
    axis = ("training compute C = 6ND (FLOPs)" if estimated.all() else "training compute C = FLOPs/token × D"
            + (" (6ND where not recorded)" if estimated.any() else ""))
    axes[0].set(xscale="log", xlabel="training tokens D", ylabel="val loss",
                title="observed (dots) and fitted L(N, D) per model size (N: active parameters)")
    axes[1].set(xscale="log", xlabel=axis, ylabel="loss",
                title="compute-optimal frontier (dotted: largest trained; right of it: extrapolation)")
    for ax in axes:
        _humanise(ax.xaxis, short)
        _humanise(ax.yaxis, plain)
    axes[1].legend(fontsize=8)
    return to_svg(fig)


def moe_figure(metrics: pd.DataFrame, runs: pd.DataFrame, palette: Palette | None = None) -> Markup | None:
    """Expert utilisation at the end of training, and the auxiliary losses over training."""
    if "moe_expert_fractions" not in metrics or metrics["moe_expert_fractions"].isna().all():
        return None
    moe = with_runs(metrics.dropna(subset=["moe_expert_fractions"]), runs, ["variant", "seed", "machine"])
    last = moe.sort_values("step").groupby(["machine", "run_id"]).tail(1)
    rows = []
    for _, r in last.iterrows():
        for layer, fractions in enumerate(r["moe_expert_fractions"]):
            for expert, fraction in enumerate(fractions):
                rows.append({"variant": r["variant"], "layer": layer, "expert": expert, "fraction": fraction})
    util = pd.DataFrame(rows)
    colours = colours_for(util["variant"], palette)
    fig, axes = plt.subplots(1, 4, figsize=(22, 4))
    sns.boxplot(data=util, x="expert", y="fraction", hue="variant", hue_order=list(colours), palette=colours,
                saturation=1, ax=axes[0])  # seaborn greys boxes and bars by default: the palette's colour exactly
    axes[0].axhline(1 / (util["expert"].max() + 1), color="black", linestyle="--", linewidth=1, label="uniform")
    axes[0].set_title("share of routed tokens per expert (final step; all layers and seeds)")
    # min–max over seeds, not a bootstrap interval: the same store draws the same band
    sns.lineplot(data=moe, x="step", y="moe_balance_loss", hue="variant", hue_order=list(colours), palette=colours,
                 errorbar=("pi", 100), ax=axes[1])
    axes[1].set_title("load-balancing loss (1 = uniform routing)")
    for ax, column, title in ((axes[2], "moe_z_loss", "router z-loss"),
                              (axes[3], "moe_dropped_fraction", "tokens dropped over capacity")):
        sns.lineplot(data=moe, x="step", y=column, hue="variant", hue_order=list(colours), palette=colours,
                     errorbar=("pi", 100), ax=ax, legend=False)
        ax.set_title(title)
    for ax in axes:
        _humanise(ax.yaxis, plain)
        if ax is not axes[0]:
            _humanise(ax.xaxis, short)
    return to_svg(fig)


def quantization_figure(quantized: pd.DataFrame, palette: Palette | None = None) -> Markup | None:
    """Each quantized variant's val loss change against its model bytes, and its forward latency."""
    if quantized.empty:
        return None
    q = quantized.assign(loss_change_pct=100 * quantized["val_loss_change"], model_mib=quantized["model_bytes"] / 2**20)
    colours = colours_for(q["variant"], palette)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    sns.scatterplot(data=q, x="model_mib", y="loss_change_pct", hue="variant", hue_order=list(colours), palette=colours,
                    s=70, ax=axes[0])
    axes[0].scatter(q["model_bytes_float"] / 2**20, [0.0] * len(q), marker="*", s=160, color="black", label="float")
    axes[0].axhline(0, color="black", linewidth=1)
    axes[0].legend(fontsize=8)
    axes[0].set(xlabel="model size (MiB, serialized)", ylabel="val loss change (%)", title="quality against model bytes")
    sns.barplot(data=q, x="variant", y="latency_ms", hue="variant", hue_order=list(colours), palette=colours,
                saturation=1, ax=axes[1], legend=False)
    axes[1].axhline(q["latency_ms_float"].median(), color="black", linestyle="--", label="float")
    axes[1].set(ylabel="forward latency (ms, median)", title="inference latency of one val batch")
    axes[1].legend(fontsize=8)
    for ax in axes:
        _humanise(ax.yaxis, plain)
    _humanise(axes[0].xaxis, plain)
    return to_svg(fig)


def sensitivity_figure(tuning: pd.DataFrame, palette: Palette | None = None) -> Markup | None:
    """Each variant's val loss against its tuned setting (mean over tuning seeds; × where a seed
    diverged or failed): a variant that only works at one setting shows it here."""
    if tuning.empty:
        return None
    frame = tuning.assign(setting=tuning["sweep"].map(lambda p: ", ".join(f"{v}" for v in p.values())))
    keys = sorted({k for p in tuning["sweep"] for k in p})
    single = len(keys) == 1 and all(isinstance(p.get(keys[0]), int | float) for p in tuning["sweep"])
    frame["x"] = frame["sweep"].map(lambda p: p[keys[0]]) if single else frame["setting"]
    fig, ax = plt.subplots(figsize=(7, 4))
    done = frame[frame["status"] == "finished"]
    if not done.empty:
        colours = colours_for(done["variant"], palette)
        sns.lineplot(data=done, x="x", y="val_loss", hue="variant", hue_order=list(colours), palette=colours,
                     marker="o", errorbar=("pi", 100), ax=ax)
    bad = frame[frame["status"] != "finished"]
    if not bad.empty:  # diverged or failed: no loss to plot, marked at the top of the axes
        top = ax.get_ylim()[1] if not done.empty else 1.0
        ax.scatter(bad["x"], [top] * len(bad), marker="x", color="red", s=60, label="diverged or failed", zorder=3)
        ax.legend(fontsize=8)
    if single:
        if frame["x"].max() / max(frame["x"].min(), 1e-300) > 10:
            ax.set_xscale("log")
        _humanise(ax.xaxis, plain)
    _humanise(ax.yaxis, plain)
    ax.set_xlabel(", ".join(keys))
    ax.set_ylabel("val loss (tuning seeds)")
    ax.set_title("sensitivity to the tuned setting (mean over tuning seeds)")
    return to_svg(fig)


def ladder_figure(climb: pd.DataFrame, metric: str, higher_is_better: bool = False) -> Markup | None:
    """A recipe ladder as a waterfall: each step's bar runs from the cumulative difference before it to
    the one after it (its paired difference from the step before); the dots are the cumulative paired
    difference from the first step with its 95% CI. Coloured by direction (helped or hurt), not variant."""
    if climb.empty or climb["cumulative"].isna().all():
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(climb) + 2), 4))
    x = np.arange(len(climb))
    after = climb["cumulative"].to_numpy(dtype=float)
    start = np.concatenate([[0.0], after[:-1]])
    sign = 1 if higher_is_better else -1
    colours = ["#2a9d8f" if sign * d > 0 else "#e76f51" for d in (after - start)]  # green: the step helped
    ax.bar(x, after - start, bottom=start, color=colours, alpha=0.6, width=0.6, label="this step vs the one before")
    low, high = climb["cumulative_low"].to_numpy(dtype=float), climb["cumulative_high"].to_numpy(dtype=float)
    ax.errorbar(x, after, yerr=[after - low, high - after], fmt="o", color="black", capsize=3,
                label=f"cumulative vs {climb['step'].iloc[0]} (95% CI)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x, [f"+{s}" if i else s for i, s in enumerate(climb["step"])], rotation=30, ha="right")
    _humanise(ax.yaxis, plain)
    ax.set_ylabel(f"paired Δ {metric.replace('_', ' ')}")
    ax.set_title("recipe ladder: each step's paired change, cumulative from the first")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return to_svg(fig)


def serving_figure(serving: pd.DataFrame, palette: Palette | None = None) -> Markup | None:
    """Each variant served under open-loop load: goodput against the offered request rate (its
    saturation point ringed; inf, every request at once, the labelled last tick), and the median time to
    first token against the offered rate (queueing shows there first). Goodput is the requests/s that met
    every SLO, or without SLOs the completed requests/s."""
    if serving.empty or "request_rate" not in serving:
        return None
    frame = serving.copy()
    slos = frame["goodput_slos"].map(lambda v: bool(v) if isinstance(v, dict) else False) \
        if "goodput_slos" in frame else pd.Series(False, index=frame.index)
    goodput = frame["request_goodput"] if "request_goodput" in frame else pd.Series(np.nan, index=frame.index)
    frame["goodput"] = np.where(slos, goodput, frame["request_throughput"]).astype(float)
    rates = sorted(frame["request_rate"].astype(float).unique())
    finite = [r for r in rates if np.isfinite(r)]
    log = len(finite) > 1 and finite[-1] / finite[0] > 4
    # inf sits one step beyond the highest finite rate: twice it on a log axis, one mean gap (at least half
    # of it) on a linear one
    step = max((finite[-1] - finite[0]) / max(len(finite) - 1, 1), finite[-1] / 2) if finite else 0.0
    at_inf = (2 * finite[-1] if log else finite[-1] + step) if finite else 1.0
    frame["x"] = frame["request_rate"].astype(float).map(lambda r: at_inf if np.isinf(r) else r)
    colours = colours_for(frame["variant"], palette)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    ttft = frame["median_ttft_ms"].astype(float) / 1e3
    latency, unit = _in_unit(ttft, TIME_UNITS) if ttft.notna().any() else (ttft, "ms")
    frame["latency"] = latency
    for variant, colour in colours.items():
        rows = frame[frame["variant"] == variant].sort_values("x")
        axes[0].plot(rows["x"], rows["goodput"], marker="o", color=colour, label=variant)
        axes[1].plot(rows["x"], rows["latency"], marker="o", color=colour, label=variant)
        saturated = rows[rows["saturation_rate"].astype(float) == rows["request_rate"].astype(float)] \
            if "saturation_rate" in rows else rows.iloc[:0]
        axes[0].scatter(saturated["x"], saturated["goodput"], s=180, facecolors="none", edgecolors=colour,
                        linewidths=2, zorder=3)
    label = "goodput (requests/s meeting every SLO)" if slos.any() else "goodput (completed requests/s)"
    axes[0].set(ylabel=label, title="goodput against offered load (ringed: saturation point)")
    axes[1].set(ylabel=f"median time to first token ({unit})", title="time to first token against offered load")
    positions = [at_inf if np.isinf(r) else r for r in rates]
    names = ["inf" if np.isinf(r) else short(r) for r in rates]
    for ax in axes:
        if log:
            ax.set_xscale("log")
        ax.set_xlabel("offered request rate (requests/s; inf: all at once)")
        ax.xaxis.set_major_locator(ticker.FixedLocator(positions))
        ax.xaxis.set_major_formatter(ticker.FixedFormatter(names))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_ylim(bottom=0)
        _humanise(ax.yaxis, plain)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return to_svg(fig)
