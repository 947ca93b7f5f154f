"""Statistics over a study's runs: best-of-sweep selection and per-variant summaries against the baseline."""

from __future__ import annotations

import json

import pandas as pd

QUALITY = ("val_loss", "val_accuracy", "val_bpb")


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


def variant_summary(runs: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """One row per variant: mean and sd over seeds of each quality metric, difference from the baseline,
    params, tokens/s, and how many runs failed or diverged."""
    chosen = best_of_sweep(runs)
    rows = []
    for variant, group in chosen.groupby("variant", sort=False):
        row = {"variant": variant, "n": len(group), "sweep": group["sweep"].iloc[0]}
        for metric in QUALITY:
            values = group[metric].dropna() if metric in group else pd.Series(dtype=float)
            row[f"{metric}_mean"] = values.mean() if len(values) else float("nan")
            row[f"{metric}_sd"] = values.std(ddof=1) if len(values) > 1 else float("nan")
        for column in ("params", "active_params", "flops_per_token", "tokens_per_s", "peak_memory_bytes"):
            row[column] = group[column].median() if column in group else float("nan")
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    counts = runs.groupby("variant")["status"].value_counts().unstack(fill_value=0)
    for status in ("failed", "diverged"):
        table[status] = table["variant"].map(counts[status] if status in counts else {}).fillna(0).astype(int)
    if baseline in set(table["variant"]):
        base = table.set_index("variant").loc[baseline]
        for metric in QUALITY:
            table[f"{metric}_delta"] = table[f"{metric}_mean"] - base[f"{metric}_mean"]
    order = [baseline] + [v for v in table["variant"] if v != baseline]
    return table.set_index("variant").reindex([v for v in order if v in set(table["variant"])]).reset_index()
