"""The report's figures: seaborn on matplotlib's Agg backend, returned as inline PNG data URIs."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # files, not windows: reports are written on headless machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from bench.analysis import pareto_front  # noqa: E402
from bench.formatting import BYTE_UNITS, TIME_UNITS, count, flop_rate, flops, significant, size, unit_for  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)


def to_data_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def with_runs(metrics: pd.DataFrame, runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Per-step metrics joined with their run's columns. Merged folders (one spec on two machines)
    share run ids, so rows are matched on the folder as well."""
    keys = ["run_id", "folder"] if "folder" in metrics and "folder" in runs else ["run_id"]
    return metrics.merge(runs[keys + columns], on=keys)


CURVE_AXES = (("tokens", "tokens seen", count), ("flops", "training FLOPs", flops),
              ("seconds", "training time (s, evaluation excluded)", significant))


def _humanise(axis, format_value) -> None:
    """Tick labels in units chosen by magnitude (never 1e9): at most 5 ticks on a linear axis, the
    decades on a log one."""
    if axis.get_scale() == "log":
        axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    else:
        axis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=4))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: format_value(value)))


def _in_unit(values: pd.Series, units) -> tuple[pd.Series, str]:
    """Values divided by the unit their largest reaches (bars read 0, 128, 256 KiB, not 97.7 KiB)."""
    unit, scale = unit_for(values.abs().max(), units)
    return values / scale, unit


def loss_curves(metrics: pd.DataFrame, runs: pd.DataFrame, floor: float | None) -> str | None:
    """Val and training loss against tokens, training FLOPs and training time (a variant that wins per
    step can lose per second): per variant the mean over seeds at each step, the band its min–max."""
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
    several = data["machine"].nunique() > 1
    lines = data.assign(line=data["variant"] + (" · " + data["machine"] if several else ""))
    order = {v: i for i, v in enumerate(runs["variant"].unique())}  # the baseline first, as the spec names them
    names = sorted(lines["line"].unique(), key=lambda n: (order.get(n.split(" · ")[0], len(order)), n))
    palette = dict(zip(names, sns.color_palette(n_colors=len(names))))
    log_x = {x: x != "seconds" and data[x].max() / max(data[x].min(), 1) > 20 for x, _, _ in axes_shown}
    fig, grid = plt.subplots(2, len(axes_shown), figsize=(4.4 * len(axes_shown), 7), squeeze=False)
    for row, (column, label) in enumerate((("val_loss", "validation loss"), ("train_loss", "training loss"))):
        for ax, (x, x_label, format_x) in zip(grid[row], axes_shown):
            points = lines.dropna(subset=[column, x])
            for name in names:
                group = points[points["line"] == name]
                if group.empty:
                    continue
                band = group.groupby("step").agg(x=(x, "mean"), mean=(column, "mean"), low=(column, "min"),
                                                 high=(column, "max"))
                ax.plot(band["x"], band["mean"], color=palette[name], label=name, linewidth=1.4)
                ax.fill_between(band["x"], band["low"], band["high"], color=palette[name], alpha=0.2, linewidth=0)
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
    return to_data_uri(fig)


VERDICT_COLOURS = {"better": "#0a7b34", "worse": "#b42318", "equivalent": "#1d4ed8", "inconclusive": "#a58a00",
                   "saturated": "#7c3aed"}


def forest(comparisons: list, metric: str, margin: float, higher_is_better: bool) -> str | None:
    """Each comparison's paired difference from its reference with its 95% CI, the ±margin band shaded
    and the verdict as the marker's colour: the study in one picture."""
    shown = [c for c in comparisons if np.isfinite(c.delta)]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.38 * len(shown) + 1.1))
    if margin > 0:
        ax.axvspan(-margin, margin, color="#d6e4ff", label=f"equivalence margin ±{margin:g}")
    ax.axvline(0, color="black", linewidth=0.8)
    for i, c in enumerate(shown):
        colour = VERDICT_COLOURS.get(c.verdict, "grey")
        if np.isfinite(c.ci_low) and np.isfinite(c.ci_high):
            ax.errorbar(c.delta, i, xerr=[[c.delta - c.ci_low], [c.ci_high - c.delta]], fmt="none", ecolor=colour,
                        capsize=5, linewidth=2)
        ax.plot(c.delta, i, "o", color=colour, markersize=9)
    for verdict in dict.fromkeys(c.verdict for c in shown):
        ax.plot([], [], "o", color=VERDICT_COLOURS.get(verdict, "grey"), label=verdict)
    ax.set_yticks(range(len(shown)), [f"{c.variant} − {c.reference}" for c in shown])
    ax.set_ylim(len(shown) - 0.5, -0.5)
    _humanise(ax.xaxis, lambda v: np.format_float_positional(v, precision=6, trim="-"))
    better = "right" if higher_is_better else "left"
    ax.set_xlabel(f"Δ {metric.replace('_', ' ')} (variant − reference), paired, 95% CI; {better} is better")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=5, frameon=False, fontsize=8)
    return to_data_uri(fig)


def final_metrics(summary: pd.DataFrame, metrics: list[str]) -> str | None:
    """Each variant's mean with its 95% confidence interval, per quality metric."""
    metrics = [m for m in metrics if summary[f"{m}_mean"].notna().any()]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 0.5 * len(summary) + 1.6), squeeze=False)
    for i, (ax, metric) in enumerate(zip(axes[0], metrics)):
        mean = summary[f"{metric}_mean"]
        low = (mean - summary[f"{metric}_ci_low"]).fillna(0)
        high = (summary[f"{metric}_ci_high"] - mean).fillna(0)
        y = np.arange(len(summary))
        ax.errorbar(mean, y, xerr=[low, high], fmt="o", capsize=4)
        labels = summary["variant"] + (" · " + summary["machine"] if summary["machine"].nunique() > 1 else "")
        ax.set_yticks(y, labels if i == 0 else [""] * len(y))
        ax.invert_yaxis()
        ax.set_title(f"{metric.replace('_', ' ')}: mean and 95% CI")
    return to_data_uri(fig)


COST_PANELS = (("tokens_per_s", "training tokens/s (higher is better)", True, count),
               ("peak_memory_bytes", "peak memory in training", False, size),
               ("params", "parameters", False, count),
               ("flops_per_token", "training FLOPs per token", False, flops),
               ("kv_cache_bytes_per_token", "KV cache per token (bf16)", False, size))


def quality_vs_cost(summary: pd.DataFrame, metric: str = "val_loss", higher_is_better: bool = False) -> str | None:
    """The quality metric against each cost the runs recorded; the Pareto front joined."""
    quality = f"{metric}_mean"
    panels = [p for p in COST_PANELS if p[0] in summary and summary[p[0]].notna().sum() >= 2
              and summary[p[0]].nunique() > 1]
    data = summary.dropna(subset=[quality])
    if not panels or len(data) < 2:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    palette = dict(zip(data["variant"].unique(), sns.color_palette(n_colors=data["variant"].nunique())))
    for ax, (column, label, higher_better, format_x) in zip(axes[0], panels):
        d = data.dropna(subset=[column])
        cost = -d[column].to_numpy(float) if higher_better else d[column].to_numpy(float)
        loss = -d[quality].to_numpy(float) if higher_is_better else d[quality].to_numpy(float)
        front = pareto_front(cost, loss)
        sns.scatterplot(data=d, x=column, y=quality, hue="variant", palette=palette, ax=ax, s=60, legend=False)
        f = d[front].sort_values(column)
        ax.plot(f[column], f[quality], color="black", linewidth=1)
        _humanise(ax.xaxis, format_x)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric.replace('_', ' ')} (mean over seeds)")
    handles = [matplotlib.lines.Line2D([], [], marker="o", linestyle="", color=c, label=v) for v, c in palette.items()]
    handles.append(matplotlib.lines.Line2D([], [], color="black", label="Pareto front"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return to_data_uri(fig)


def kernel_figures(kernels: pd.DataFrame) -> list[tuple[str, str]]:
    """Achieved FLOP/s of attention against sequence length (one panel per direction, one legend);
    decode costs per attention; latency of the other kernels."""
    figures = []
    ok = kernels[kernels["status"] == "ok"] if "status" in kernels else kernels.iloc[0:0]
    attention = ok[ok["component"] == "attention"] if not ok.empty else ok
    if not attention.empty and attention["flops_per_s"].notna().any():
        several = attention["machine"].nunique() > 1
        grid = sns.relplot(data=attention, x="seq_len", y="flops_per_s", hue="backend", style="name",
                           col="direction", row="machine" if several else None, kind="line", markers=True,
                           height=3.2, aspect=1.4, facet_kws={"sharey": False})
        grid.set(xscale="log")
        lengths = sorted(attention["seq_len"].dropna().unique())
        for ax in grid.axes.flat:
            ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(lengths))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.0f}"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            _humanise(ax.yaxis, flop_rate)
        grid.set_axis_labels("sequence length", "achieved FLOP/s")
        grid.figure.subplots_adjust(wspace=0.35)
        figures.append(("attention: achieved FLOP/s", to_data_uri(grid.figure)))
    decode = ok[ok["component"] == "decode"] if not ok.empty else ok
    if not decode.empty:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        steps = decode[decode["phase"] == "decode"]
        prefill = decode[decode["phase"] == "prefill"]
        for ax, data, column, title, units in (
                (axes[0], steps, "per_token_s", "per-token decode latency", TIME_UNITS),
                (axes[1], prefill, "median_s", "prefill latency", TIME_UNITS),
                (axes[2], steps, "kv_cache_bytes", "KV cache after decoding", BYTE_UNITS)):
            values, unit = _in_unit(data[column], units)
            sns.barplot(data=data.assign(value=values), x="name", y="value", hue="machine", ax=ax,
                        legend=ax is axes[0] and data["machine"].nunique() > 1)
            ax.set(title=title, xlabel="attention", ylabel=unit)
        figures.append(("decode", to_data_uri(fig)))
    other = ok[ok["component"].isin(["mlp", "norm", "moe", "quantization"])] if not ok.empty else ok
    if not other.empty:
        values, unit = _in_unit(other["median_s"], TIME_UNITS)
        grid = sns.catplot(data=other.assign(latency=values), x="latency", y="name", hue="machine", col="component",
                           row="direction", kind="bar", sharex=False, sharey=False, height=2.6, aspect=1.4,
                           legend=other["machine"].nunique() > 1)
        grid.set_axis_labels(f"latency ({unit}, median)", "")
        figures.append(("other kernels", to_data_uri(grid.figure)))
    return figures


def scaling_figure(points: pd.DataFrame, fits: dict) -> str | None:
    """Observed losses and fitted L(N, D) per variant, and each variant's compute-optimal frontier."""
    if not fits:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    palette = dict(zip(fits, sns.color_palette(n_colors=len(fits))))
    for variant, fit in fits.items():
        d = points[points["variant"] == variant]
        for n, group in d.groupby("params"):
            tokens = np.geomspace(group["tokens"].min() / 2, group["tokens"].max() * 4, 50)
            axes[0].plot(tokens, fit.loss(n, tokens), color=palette[variant], alpha=0.6, linewidth=1)
            axes[0].scatter(group["tokens"], group["val_loss"], color=palette[variant], s=18)
        spent = d["compute"] if "compute" in d else 6 * d["params"] * d["tokens"]
        compute = np.geomspace(spent.min() / 4, spent.max() * 100, 80)
        axes[1].plot(compute, fit.frontier_loss(compute), color=palette[variant], label=variant)
        axes[1].axvline(spent.max(), color=palette[variant], linestyle=":", linewidth=1)
        axes[1].scatter(spent, d["val_loss"], color=palette[variant], s=14, alpha=0.6)
    estimated = points["estimated"] if "estimated" in points else pd.Series(True, index=points.index)
    axis = ("training compute C = 6ND" if estimated.all() else "training compute C = FLOPs/token × D"
            + (" (6ND where not recorded)" if estimated.any() else ""))
    axes[0].set(xscale="log", xlabel="training tokens D", ylabel="val loss",
                title="observed (dots) and fitted L(N, D) per model size (N: active parameters)")
    axes[1].set(xscale="log", xlabel=axis, ylabel="loss",
                title="compute-optimal frontier (dotted: largest trained; right of it: extrapolation)")
    axes[1].legend(fontsize=8)
    return to_data_uri(fig)


def moe_figure(metrics: pd.DataFrame, runs: pd.DataFrame) -> str | None:
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
    fig, axes = plt.subplots(1, 4, figsize=(22, 4))
    sns.boxplot(data=util, x="expert", y="fraction", hue="variant", ax=axes[0])
    axes[0].axhline(1 / (util["expert"].max() + 1), color="black", linestyle="--", linewidth=1, label="uniform")
    axes[0].set_title("share of routed tokens per expert (final step; all layers and seeds)")
    sns.lineplot(data=moe, x="step", y="moe_balance_loss", hue="variant", ax=axes[1])
    axes[1].set_title("load-balancing loss (1 = uniform routing)")
    for ax, column, title in ((axes[2], "moe_z_loss", "router z-loss"),
                              (axes[3], "moe_dropped_fraction", "tokens dropped over capacity")):
        sns.lineplot(data=moe, x="step", y=column, hue="variant", ax=ax, legend=False)
        ax.set_title(title)
    return to_data_uri(fig)


def quantization_figure(quantized: pd.DataFrame) -> str | None:
    if quantized.empty:
        return None
    q = quantized.assign(loss_change_pct=100 * quantized["val_loss_change"], model_mib=quantized["model_bytes"] / 2**20)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    sns.scatterplot(data=q, x="model_mib", y="loss_change_pct", hue="variant", s=70, ax=axes[0])
    axes[0].scatter(q["model_bytes_float"] / 2**20, [0.0] * len(q), marker="*", s=160, color="black", label="float")
    axes[0].axhline(0, color="black", linewidth=1)
    axes[0].legend(fontsize=8)
    axes[0].set(xlabel="model size (MiB, serialized)", ylabel="val loss change (%)", title="quality against model bytes")
    sns.barplot(data=q, x="variant", y="latency_ms", ax=axes[1], color="tab:blue", label="quantized")
    axes[1].axhline(q["latency_ms_float"].median(), color="black", linestyle="--", label="float")
    axes[1].set(ylabel="forward latency (ms, median)", title="inference latency of one val batch")
    axes[1].legend(fontsize=8)
    return to_data_uri(fig)


def sensitivity_figure(tuning: pd.DataFrame) -> str | None:
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
        sns.lineplot(data=done, x="x", y="val_loss", hue="variant", marker="o", errorbar=("pi", 100), ax=ax)
    bad = frame[frame["status"] != "finished"]
    if not bad.empty:  # diverged or failed: no loss to plot, marked at the top of the axes
        top = ax.get_ylim()[1] if not done.empty else 1.0
        ax.scatter(bad["x"], [top] * len(bad), marker="x", color="red", s=60, label="diverged or failed", zorder=3)
        ax.legend(fontsize=8)
    if single and frame["x"].max() / max(frame["x"].min(), 1e-300) > 10:
        ax.set_xscale("log")
    ax.set_xlabel(", ".join(keys))
    ax.set_ylabel("val loss (tuning seeds)")
    ax.set_title("sensitivity to the tuned setting (mean over tuning seeds)")
    return to_data_uri(fig)


def ladder_figure(climb: pd.DataFrame, metric: str, higher_is_better: bool = False) -> str | None:
    """A recipe ladder as a waterfall: each step's bar runs from the cumulative difference before it to
    the one after it (its paired difference from the step before); the dots are the cumulative paired
    difference from the first step with its 95% CI."""
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
    ax.set_ylabel(f"paired Δ {metric.replace('_', ' ')}")
    ax.set_title("recipe ladder: each step's paired change, cumulative from the first")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return to_data_uri(fig)


def serving_figure(serving: pd.DataFrame) -> str | None:
    """Each variant served under load: generated tokens/s against concurrency, and p99 inter-token
    latency against tokens/s (lower right is better: more throughput at the same tail latency)."""
    if serving.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    sns.lineplot(data=serving, x="concurrency", y="tokens_per_s", hue="variant", marker="o", ax=axes[0])
    axes[0].set(xscale="log", xlabel="concurrent requests", ylabel="generated tokens/s",
                title="throughput against concurrency")
    axes[0].set_xticks(sorted(serving["concurrency"].unique()), labels=[str(c) for c in sorted(serving["concurrency"].unique())])
    latency, unit = _in_unit(serving["itl_p99_s"], TIME_UNITS)
    sns.lineplot(data=serving.assign(latency=latency), x="tokens_per_s", y="latency", hue="variant", marker="o",
                 sort=False, ax=axes[1], legend=False)
    axes[1].set(xlabel="generated tokens/s", ylabel=f"p99 inter-token latency ({unit})",
                title="tail latency against throughput")
    return to_data_uri(fig)
