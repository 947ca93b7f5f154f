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


def loss_curves(metrics: pd.DataFrame, runs: pd.DataFrame, floor: float | None) -> str | None:
    """Val loss against tokens seen: mean over seeds per variant with a min–max band."""
    if metrics.empty or "val_loss" not in metrics:
        return None
    evals = with_runs(metrics.dropna(subset=["val_loss"]), runs, ["variant", "machine"])
    if evals.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, column, title in ((axes[0], "val_loss", "validation loss"), (axes[1], "train_loss", "training loss")):
        data = evals if column == "val_loss" else with_runs(metrics, runs, ["variant", "machine"])
        if column == "train_loss":  # a rolling mean per run: the raw per-step loss is noisy
            data = data.sort_values("step").copy()
            data[column] = data.groupby(["machine", "run_id"])[column].transform(lambda s: s.rolling(20, min_periods=1).mean())
        sns.lineplot(data=data, x="tokens", y=column, hue="variant", style="machine" if data["machine"].nunique() > 1 else None,
                     errorbar=("pi", 100), ax=ax)
        tokens = data["tokens"]
        if tokens.max() / max(tokens.min(), 1) > 20:
            ax.set_xscale("log")
        if floor is not None:
            ax.axhline(floor, color="black", linestyle="--", linewidth=1, label="entropy rate (floor)")
            ax.legend(fontsize=8)
        ax.set_title(title + " (mean over seeds, band: min–max)")
        ax.set_xlabel("tokens")
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


def quality_vs_cost(summary: pd.DataFrame) -> str | None:
    """Val loss against tokens/s, peak memory, params and FLOPs/token; the Pareto front joined."""
    panels = [("tokens_per_s", "tokens/s (higher is better)", True), ("peak_memory_bytes", "peak memory (bytes)", False),
              ("params", "parameters", False), ("flops_per_token", "training FLOPs/token", False)]
    panels = [p for p in panels if p[0] in summary and summary[p[0]].notna().sum() >= 2]
    data = summary.dropna(subset=["val_loss_mean"])
    if not panels or len(data) < 2:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    palette = dict(zip(data["variant"].unique(), sns.color_palette(n_colors=data["variant"].nunique())))
    for ax, (column, label, higher_better) in zip(axes[0], panels):
        d = data.dropna(subset=[column])
        cost = -d[column].to_numpy(float) if higher_better else d[column].to_numpy(float)
        front = pareto_front(cost, d["val_loss_mean"].to_numpy(float))
        sns.scatterplot(data=d, x=column, y="val_loss_mean", hue="variant", palette=palette, ax=ax, s=60,
                        legend=ax is axes[0][0])
        f = d[front].sort_values(column)
        ax.plot(f[column], f["val_loss_mean"], color="black", linewidth=1, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("val loss (mean)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("quality against cost (black: Pareto front)")
    return to_data_uri(fig)


def kernel_figures(kernels: pd.DataFrame) -> list[tuple[str, str]]:
    """Latency and achieved FLOP/s against sequence length per backend and machine; decode costs."""
    figures = []
    ok = kernels[kernels["status"] == "ok"] if "status" in kernels else kernels.iloc[0:0]
    attention = ok[ok["component"] == "attention"] if not ok.empty else ok
    if not attention.empty:
        attention = attention.assign(latency_ms=1e3 * attention["median_s"], tflops=attention["flops_per_s"] / 1e12)
        for column, label in (("latency_ms", "latency (ms, median)"), ("tflops", "achieved TFLOP/s")):
            grid = sns.relplot(data=attention, x="seq_len", y=column, hue="backend", style="machine",
                               col="direction", row="name", kind="line", markers=True, height=3, aspect=1.3,
                               facet_kws={"sharey": False})
            grid.set(xscale="log")
            for ax in grid.axes.flat:
                ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            grid.set_axis_labels("sequence length", label)
            figures.append((f"attention {label}", to_data_uri(grid.figure)))
    decode = ok[ok["component"] == "decode"] if not ok.empty else ok
    if not decode.empty:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        steps = decode[decode["phase"] == "decode"].assign(per_token_ms=lambda d: 1e3 * d["per_token_s"])
        sns.barplot(data=steps, x="name", y="per_token_ms", hue="machine", ax=axes[0])
        axes[0].set_title("per-token decode latency (ms)")
        prefill = decode[decode["phase"] == "prefill"].assign(ms=lambda d: 1e3 * d["median_s"])
        sns.barplot(data=prefill, x="name", y="ms", hue="machine", ax=axes[1])
        axes[1].set_title("prefill latency (ms)")
        sns.barplot(data=steps, x="name", y="kv_cache_bytes_per_token", hue="machine", ax=axes[2])
        axes[2].set_title("KV-cache bytes per token")
        for ax in axes:
            ax.set_xlabel("attention")
        figures.append(("decode", to_data_uri(fig)))
    other = ok[ok["component"].isin(["mlp", "norm", "moe", "quantization"])] if not ok.empty else ok
    if not other.empty:
        other = other.assign(latency_ms=1e3 * other["median_s"])
        grid = sns.catplot(data=other, x="latency_ms", y="name", hue="machine", col="component", row="direction",
                           kind="bar", sharex=False, sharey=False, height=2.6, aspect=1.4)
        grid.set_axis_labels("latency (ms, median)", "")
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
