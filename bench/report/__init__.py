"""The HTML report: a pure function of one or more results stores.

    python -m bench.report results/attention [results/attention-gpu ...] [-o report.html]

One self-contained file (figures inlined as PNG, no scripts, no network requests). Several folders —
the same spec on a laptop and on a GPU — merge into one report with the machines side by side.
Everything that came from a spec is HTML-escaped by the template engine.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from bench import scaling
from bench.analysis import (
    QUALITY, SCALING_TABLES, StudySummary, choose_tuned, eligible_points, eval_runs, point_key, scaling_per_machine, summarise,
)
from bench.formatting import count, missing, number
from bench.report import figures
from bench.results import Results, load

TEMPLATE = Path(__file__).with_name("template.html")


def _merge(folders: list[Path]) -> Results:
    """Several results folders as one: every row keeps its folder; studies carry their parsed spec."""
    loaded = [(folder, load(folder)) for folder in folders]
    frames = {}
    for part in ("runs", "metrics", "kernels"):
        frames[part] = pd.concat([getattr(r, part).assign(folder=str(f)) for f, r in loaded], ignore_index=True)
    studies = []
    for folder, r in loaded:
        for _, row in r.studies.iterrows():
            studies.append({"folder": str(folder), "name": row["name"], "spec": json.loads(row["spec"]),
                            "command": row["command"]})
    if not studies:
        raise ValueError(f"no study recorded in {', '.join(map(str, folders))}")
    return Results(frames["runs"], frames["metrics"], frames["kernels"], pd.DataFrame(studies))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _config_differences(runs: pd.DataFrame, baseline: str) -> list[dict]:
    """Each variant's resolved configuration keys that differ from the baseline's (seed aside)."""
    first = runs[runs["kind"] == "train"].drop_duplicates("variant").set_index("variant")
    first = pd.concat([first, runs[runs["kind"] == "quantize"].drop_duplicates("variant").set_index("variant")])
    if baseline not in first.index:
        return []
    base = _flatten(first.loc[baseline, "config"])
    out = []
    for variant, row in first.iterrows():
        if variant == baseline:
            continue
        mine = _flatten(row["config"])
        diffs = [{"key": k, "baseline": base.get(k), "variant": mine.get(k)}
                 for k in sorted(set(base) | set(mine)) if k != "seed" and base.get(k) != mine.get(k)]
        out.append({"variant": variant, "differences": diffs})
    return out


KERNEL_COLUMNS = ("machine", "component", "name", "backend", "kernel", "direction", "seq_len", "status", "reason",
                  "median_s", "iqr_s", "noisy", "pct_peak_flops", "pct_peak_bandwidth")


def _cell(value):
    """A table cell: numbers formatted, missing values (None, NaN) empty."""
    if missing(value):
        return None
    return number(value) if isinstance(value, float) else value


def _optima(optima: list[dict]) -> str:
    """Approach 2's optimum per budget: "1.2e+05 at 1e+12 FLOPs, …", "(outside the trained sizes)" where it is."""
    return ", ".join(f"{o['n_opt']:.3g} at {o['budget']:.3g} FLOPs" + ("" if o["inside"] else " (outside the trained sizes)")
                     for o in optima)


def _scaling_rows(summary: dict) -> dict:
    """One machine's scaling summary (``analysis.scaling_summary``) as table rows and its figure."""
    fits = [{"variant": r["variant"], **{k: number(r[k]) for k in scaling.PARAMS},
             **{f"{k}_ci": f"{number(r[f'{k}_ci'][0])} – {number(r[f'{k}_ci'][1])}" for k in scaling.PARAMS},
             "a": number(r["a"], 3), "b": number(r["b"], 3), "r2": number(r["r2"], 4),
             "max_residual": number(r["max_residual"], 3), "objective": number(r["objective"]), "warnings": r["warnings"]}
            for r in summary["fits"]]
    multipliers = [{"variant": m["variant"], "where": m["where"], "compute": f"{m['compute']:.3g}", "loss": number(m["loss"]),
                    "multiplier": number(m["multiplier"], 3),
                    "ci": f"{number(m['ci'][0], 3)} – {number(m['ci'][1], 3)}" if m["ci"] else "–",
                    "extrapolated": m["extrapolated"]}
                   for m in summary["multipliers"]]
    approach2 = [{"variant": r["variant"], "a": number(r["a"], 3), "b": number(r["b"], 3),
                  "note": f"{r['budgets']} compute budgets, N_opt {_optima(r.get('optima', []))}; R² of the N_opt line "
                          f"{number(r['r2'], 4)}, parabolas' R² ≥ {number(r['parabola_r2'], 4)}"}
                 if r["error"] is None else {"variant": r["variant"], "a": None, "b": None, "note": r["error"]}
                 for r in summary["approach2"]]
    compute_law = [{"variant": c["variant"], "E": number(c["E"]), "K": number(c["K"]), "gamma": number(c["gamma"], 3),
                    "r2": number(c["r2"], 4), "points": c["points"],
                    "range": f"{c['range'][0]:.3g} – {c['range'][1]:.3g} FLOPs (outside: extrapolation)",
                    "max_residual": number(c["max_residual"], 3)}
                   for c in summary["compute_law"]]
    figure = figures.scaling_figure(summary["points"], summary["parametric"])
    return {"fits": fits, "multipliers": multipliers, "approach2": approach2, "compute_law": compute_law,
            "figures": [figure] if figure else []}


def _scaling_section(parts: list[dict]) -> dict | None:
    """The report's scaling section from ``analysis.scaling_per_machine``: every machine's rows and figures."""
    if not parts:
        return None
    formatted = [_scaling_rows(part) for part in parts]
    merged = {key: [row for part in formatted for row in part[key]] for key in SCALING_TABLES}
    merged["figures"] = [f for part in formatted for f in part["figures"]]
    return merged


def _tuning_section(tuning: pd.DataFrame, spec: dict) -> dict | None:
    """Each variant's tune points: mean val loss over the tuning seeds, failures, eligibility, the
    chosen one; and the sensitivity figure."""
    if tuning.empty:
        return None
    chosen, _ = choose_tuned(tuning)
    points = eligible_points(tuning).set_index(["variant", "point"])
    rows = []
    for (variant, point), group in tuning.groupby(["variant", tuning["sweep"].map(point_key)], sort=False):
        stats = points.loc[(variant, point)]
        rows.append({"variant": variant, "setting": ", ".join(f"{k}={v}" for k, v in group["sweep"].iloc[0].items()),
                     "val_loss": number(group.loc[group["status"] == "finished", "val_loss"].mean()),
                     "seeds": ", ".join(str(s) for s in sorted(group["seed"])),
                     "diverged": int(stats["diverged"]), "failed": int(stats["failed"]),
                     "eligible": bool(stats["eligible"]), "chosen": chosen.get(variant) == group["sweep"].iloc[0]})
    return {"rows": rows, "figure": figures.sensitivity_figure(tuning)}


def _comparison_rows(summary: StudySummary) -> list[dict]:
    return [{"machine": summary.machine, "variant": c.variant, "reference": c.reference, "verdict": c.verdict,
             "delta": f"{c.delta:+.4f}" if not np.isnan(c.delta) else "–",
             "ci": f"{number(c.ci_low)} – {number(c.ci_high)}", "test": c.test, "n": c.n, "p": number(c.p, 3),
             "p_adjusted": number(c.p_adjusted, 3), "mde": "–" if np.isnan(c.mde) else f"± {number(c.mde)}",
             "sentence": c.sentence()}
            for c in summary.comparisons]


def _variant_rows(summary: StudySummary, baseline: str) -> list[dict]:
    rows = []
    for _, r in summary.variants.iterrows():
        row = {"machine": summary.machine, "variant": r["variant"], "baseline": r["variant"] == baseline,
               "n": int(r["n"]), "reference": r["reference"],
               "sweep": ", ".join(f"{k}={v}" for k, v in (r["sweep"] or {}).items()),
               "params": count(r["params"]), "tokens_per_s": count(r["tokens_per_s"]),
               "failed": int(r["failed"]), "diverged": int(r["diverged"])}
        for metric in QUALITY:
            if not np.isnan(r[f"{metric}_mean"]):
                row[metric] = {"mean": number(r[f"{metric}_mean"]), "sd": number(r[f"{metric}_sd"]),
                               "ci": f"{number(r[f'{metric}_ci_low'])} – {number(r[f'{metric}_ci_high'])}"}
        rows.append(row)
    return rows


def study_summaries(results: Results) -> list[StudySummary]:
    """The verdicts of the first study in `results`, one summary per machine, from its current runs."""
    spec = results.studies.iloc[0]["spec"]
    runs = results.runs[results.runs["current"]].copy()
    runs["machine"] = runs["machine"].fillna("(not run)")
    out = []
    for machine, group in runs.groupby("machine", sort=False):
        summary = summarise(group, spec, machine)
        if not summary.variants.empty:
            out.append(summary)
    return out


def summary_json(folders: list[str | Path]) -> dict:
    """The machine-readable verdicts (``python -m bench.report DIR --json``): the study, its noise floor
    and every comparison; with several machines, each machine's under "machines" as well."""
    summaries = study_summaries(_merge([Path(f) for f in folders]))
    if not summaries:
        raise ValueError(f"no finished runs in {', '.join(map(str, folders))}")
    first = summaries[0].to_dict()
    out = {**first, "comparisons": [c for s in summaries for c in s.to_dict()["comparisons"]]}
    if len(summaries) > 1:
        out["machines"] = [s.to_dict() for s in summaries]
    return out


def build_report(folders: list[str | Path]) -> str:
    """The report for one or more results folders, as an HTML string."""
    folders = [Path(f) for f in folders]
    results = _merge(folders)
    studies = results.studies.to_dict("records")
    spec = studies[0]["spec"]
    baseline = spec.get("baseline") or next(iter(spec.get("variants", {})), "")
    summaries = study_summaries(results)
    runs, metrics, kernels = results.runs[results.runs["current"]].copy(), results.metrics, results.kernels
    failed = [{"variant": r["variant"] + (" (tuning)" if r.get("role") == "tune" else ""), "seed": r["seed"],
               "status": r["status"], "reason": r["reason"]}
              for _, r in runs[runs["status"].isin(["failed", "diverged"])].iterrows()]
    tuning = runs[runs["role"] == "tune"] if "role" in runs else runs.iloc[:0]
    runs = eval_runs(runs)  # what the verdicts, curves and tables are about; tuning has its own section
    if not metrics.empty:  # the current plan's steps (runs of an edited spec's earlier plan stay out)
        metrics = metrics.merge(runs[["run_id", "folder"]], on=["run_id", "folder"])
    runs["machine"] = runs["machine"].fillna("(not run)")
    variant_rows = [row for x in summaries for row in _variant_rows(x, baseline)]
    combined = (pd.concat([s.variants.assign(machine=s.machine) for s in summaries], ignore_index=True)
                if summaries else pd.DataFrame())
    floor = runs["loss_floor"].dropna().median() if "loss_floor" in runs and runs["loss_floor"].notna().any() else None
    quantized = runs[(runs["kind"] == "quantize") & (runs["status"] == "finished")]
    kernel_rows = kernels.to_dict("records") if not kernels.empty else []
    machines = runs.dropna(subset=["hardware"]).drop_duplicates("machine")
    figs = {
        "curves": figures.loss_curves(metrics, runs, floor),
        "final": figures.final_metrics(combined, list(QUALITY)) if not combined.empty else None,
        "cost": figures.quality_vs_cost(combined) if not combined.empty else None,
        "moe": figures.moe_figure(metrics, runs) if not metrics.empty else None,
        "quantization": figures.quantization_figure(quantized) if not quantized.empty else None,
    }
    context = {
        "name": spec.get("name", ""),
        "description": spec.get("description", ""),
        "baseline": baseline,
        "generated": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "summaries": [{"machine": x.machine, "noise": x.noise.sentence(x.metric.replace("_", " ")),
                       "design": x.design.describe(), "metric": x.metric,
                       "comparisons": _comparison_rows(x)} for x in summaries],
        "variant_rows": variant_rows,
        "quality": [m for m in QUALITY if any(m in row for row in variant_rows)],
        "figures": figs,
        "floor": floor,
        "kernel_figures": figures.kernel_figures(kernels) if not kernels.empty else [],
        "kernel_rows": [{k: _cell(r.get(k)) for k in KERNEL_COLUMNS} for r in kernel_rows],
        "scaling": _scaling_section(scaling_per_machine(runs, baseline, spec.get("extrapolate_to"))),
        "quantized": [{k: number(r[k]) if isinstance(r[k], float) else r[k] for k in
                       ("variant", "seed", "val_loss_float", "val_loss", "val_loss_change", "model_bytes_float",
                        "model_bytes", "latency_ms_float", "latency_ms", "quantization_format")}
                      for _, r in quantized.iterrows()],
        "failed": failed,
        "tuning": _tuning_section(tuning, spec),
        "diffs": _config_differences(runs, baseline),
        "machines": [{"machine": r["machine"], "cpu": r["hardware"].get("cpu"), "cores": r["hardware"].get("cpu_cores"),
                      "threads": r["hardware"].get("torch_threads"), "gpu": r["hardware"].get("gpu"),
                      "python": r["hardware"].get("python"), "libraries": r["libraries"], "git_commit": r["git_commit"],
                      "platform": r["hardware"].get("platform")} for _, r in machines.iterrows()],
        "commands": [{"folder": s["folder"], "command": s["command"]} for s in studies],
        "spec": spec,
        "n_runs": len(runs),
    }
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(TEMPLATE.read_text()).render(**context)


def write_report(folders: list[str | Path], out: str | Path | None = None) -> Path:
    """Write the report (default: report.html in the first folder) and return its path."""
    out = Path(out) if out else Path(folders[0]) / "report.html"
    out.write_text(build_report(folders))
    return out
