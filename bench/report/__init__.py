"""The HTML report: a pure function of one or more results stores.

    python -m bench.report results/attention [results/attention-gpu ...] [-o report.html]

One self-contained file (figures inlined as SVG, no scripts, no network requests); a section appears only
where the study has something to show in it. Several folders — the same spec on a laptop and on a GPU —
merge into one report with the machines side by side.
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

from bench import costs, scaling
from bench.analysis import (
    NOT_RUN, QUALITY, SCALING_TABLES, VERDICTS, StudyAnalysis, StudySummary, Tuning, analyse, eval_runs,
)
from bench.findings import delta_text, finding_row, suite_folders, summary_line
from bench.formatting import count, duration, flop_rate, flops, missing, p_value, percent, significant, size
from bench.report import figures
from bench.report.multimodal import multimodal_section
from bench.report.recall import recall_section
from bench.serve.sweep import RISE, rate_text
from bench.spec import StudyDesign
from bench.store import Results, load, read_spec
from bench.speed import speed_phrase

TEMPLATE = Path(__file__).with_name("template.html")
FINDINGS_TEMPLATE = Path(__file__).with_name("findings.html")


def _merge(folders: list[Path]) -> Results:
    """Several results folders as one: every row keeps its folder; studies carry their spec as stored
    (``spec``, what the report shows) and their design (``design``, what it reads)."""
    loaded = [(folder, load(folder)) for folder in folders]
    frames = {}
    for part in ("runs", "metrics", "kernels", "serving"):
        frames[part] = pd.concat([getattr(r, part).assign(folder=str(f)) for f, r in loaded], ignore_index=True)
    studies = []
    for folder, r in loaded:
        for _, row in r.studies.iterrows():
            design = read_spec(row["spec"], f"{folder / 'results.db'}: study '{row['name']}'").design
            studies.append({"folder": str(folder), "name": row["name"], "spec": json.loads(row["spec"]),
                            "design": design, "command": row["command"]})
    if not studies:
        raise ValueError(f"no study recorded in {', '.join(map(str, folders))}")
    return Results(frames["runs"], frames["metrics"], frames["kernels"], pd.DataFrame(studies), frames["serving"])


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _setting(value):
    """A config value as the table shows it: floats in positional notation, as short as they round-trip
    (1e-05 reads 0.00001)."""
    return np.format_float_positional(value, trim="-") if isinstance(value, float) else value


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
        diffs = [{"key": k, "baseline": _setting(base.get(k)), "variant": _setting(mine.get(k))}
                 for k in sorted(set(base) | set(mine)) if k != "seed" and base.get(k) != mine.get(k)]
        out.append({"variant": variant, "differences": diffs})
    return out


def latest_serving(serving: pd.DataFrame) -> pd.DataFrame:
    """The rows of each variant's last serving sweep on each machine (a rerun appends a sweep), one per
    offered rate (and cap on requests in flight: rows of the closed-loop generator before sweeps differ
    in that alone), by variant and rate."""
    if serving.empty:
        return serving
    frame = serving.copy()
    for column in ("sweep_id", "settings_key", "max_concurrency"):
        if column not in frame:
            frame[column] = None
    frame["sweep_id"] = frame["sweep_id"].fillna(frame["settings_key"]).fillna("")
    frame["machine"] = frame["machine"].fillna("")
    last = frame.groupby(["variant", "machine"], sort=False)["sweep_id"].transform("last")
    frame = frame[frame["sweep_id"] == last].drop_duplicates(["variant", "machine", "request_rate", "max_concurrency"],
                                                             keep="last")
    return frame.sort_values(["variant", "request_rate", "max_concurrency"]).reset_index(drop=True)


def _serving_settings(serving: pd.DataFrame) -> str:
    """How the variants were driven, in words (the first row's settings; every sweep of a report shares them
    unless rerun otherwise)."""
    if serving.empty:
        return ""
    r = serving.iloc[0]
    batching = ", ".join(f"{v}: {b}" for v, b in serving.drop_duplicates("variant")[["variant", "batching"]].values
                         if isinstance(b, str) and b != "continuous")
    cap = (f"at most {int(r['max_concurrency'])} in flight" if not missing(r.get("max_concurrency"))
           else "no cap on requests in flight")
    burstiness = r.get("burstiness")
    arrivals = ("Poisson arrivals" if missing(burstiness) or burstiness == 1 else
                f"gamma arrivals of burstiness {significant(burstiness, 2)}")
    by_variant = serving.drop_duplicates("variant", keep="last").set_index("variant")
    slos = {v: _slo_text(x) for v, x in by_variant.get("goodput_slos", pd.Series(dtype=object)).items()}
    if len(set(slos.values())) <= 1:
        phrase = next(iter(slos.values()), "")
        goodput = (f"goodput counts the requests that met every SLO ({phrase})" if phrase
                   else "no SLOs were given, so goodput is the completed requests/s")
    else:
        goodput = ("goodput counts the requests that met every SLO (" + "; ".join(
            f"{v}: {t or 'none given: the completed requests/s'}" for v, t in slos.items()) + ")")
    served = "; ".join(phrase for k in ("device", "dtype", "kernel", "quantization")
                       if (phrase := _served_with(by_variant, k)))
    notes = r.get("percentile_notes") if isinstance(r.get("percentile_notes"), list) else []
    external = serving[serving["engine"] == "external"] if "engine" in serving else serving.iloc[:0]
    text = (f"Open-loop load: {int(r['num_prompts'])} streamed requests per offered rate, sent at their scheduled "
            f"times ({arrivals}, seeded) whether or not earlier ones had finished, {cap}, after "
            f"{int(r['warmup']) if not missing(r.get('warmup')) else 0} warm-up requests that count nowhere; prompts of "
            f"{int(r['prompt_len'])} tokens (validation windows), {int(r['new_tokens'])} new tokens each, greedy; "
            f"{goodput}. TTFT, TPOT, ITL and E2EL as vLLM's benchmark defines them; a percentile is shown only "
            f"with enough samples (p99 needs 100{'; here ' + '; '.join(notes) if notes else ''}). ")
    if not missing(r.get("max_batch")):
        text += (f"The service batches up to {int(r['max_batch'])} sequences (continuous batching"
                 f"{'; ' + batching if batching else ''}){'; served with ' + served if served else ''}; a fresh "
                 f"service per rate, on the loopback interface.")
    if not external.empty:
        text += " External servers: " + ", ".join(f"{v} at {t}" for v, t in
                                                  external[["variant", "target"]].drop_duplicates().values) + "."
    return text


def _slo_text(slos) -> str:
    return ", ".join(f"{name.upper()} ≤ {bound:g} ms" for name, bound in slos.items()) \
        if isinstance(slos, dict) else ""


def _served_with(by_variant: pd.DataFrame, key: str) -> str:
    """What served the variants, from their /health: "dtype float32", or per variant where they differ."""
    if key not in by_variant:
        return ""
    values = {v: x for v, x in by_variant[key].items() if isinstance(x, str) and x}
    if len(set(values.values())) == 1:
        return f"{key} {next(iter(values.values()))}"
    return f"{key} " + ", ".join(f"{x} ({v})" for v, x in values.items()) if values else ""


def _serving_saturation(serving: pd.DataFrame) -> list[dict]:
    """Each variant's saturation point (``bench.serve.sweep``): the offered rate, or why there is none."""
    if serving.empty or "saturation_note" not in serving:
        return []
    out = []
    for (variant, machine), rows in serving.groupby(["variant", "machine"], sort=False):
        rate, note = rows["saturation_rate"].iloc[-1], rows["saturation_note"].iloc[-1]
        if not isinstance(note, str):  # the closed-loop generator's rows: no sweep of rates
            continue
        out.append({"variant": variant, "machine": machine, "machine_note": serving["machine"].nunique() > 1,
                    "rate": None if missing(rate) else rate_text(rate), "note": note})
    return out


def _serving_row(r, machine_note: bool) -> dict:
    def pair(name):
        p99 = r.get(f"p99_{name}_ms")
        return f"{_ms(r.get(f'median_{name}_ms'))} / {_ms(p99)}"

    def rate(value):
        return "–" if missing(value) else significant(value, 3)

    cap = r.get("max_concurrency")
    return {"variant": r["variant"], "machine": r["machine"], "machine_note": machine_note,
            "rate": rate_text(r["request_rate"]), "cap": "–" if missing(cap) else int(cap),
            "outcomes": f"{int(r['completed'])} / {int(r['failed'])} / {int(r['rejected'])}",
            "requests_per_s": rate(r.get("request_throughput")), "goodput": rate(r.get("request_goodput")),
            "tokens_per_s": "–" if missing(r.get("output_throughput")) else count(r["output_throughput"]),
            "ttft": pair("ttft"), "tpot": pair("tpot"), "itl": pair("itl"),
            "kv_peak": "–" if missing(r.get("kv_cache_bytes_peak")) else size(r["kv_cache_bytes_peak"]),
            "batched": "–" if missing(r.get("max_batched")) else int(r["max_batched"]),
            "saturation": not missing(r.get("saturation_rate")) and r["saturation_rate"] == r["request_rate"]}


def _ms(value) -> str:
    """A latency stored in milliseconds, in words ("–" where it was not measured)."""
    return "–" if missing(value) else duration(value / 1e3)


def _latency(row) -> str:
    return duration(row["median_s"]) + (" ~" if row.get("noisy") is True else "")


def _throughput(row) -> str:
    if missing(row.get("flops_per_s")):
        return "–"
    peak = row.get("pct_peak_flops")
    return flop_rate(row["flops_per_s"]) + ("" if missing(peak) else f" · {significant(peak, 2)}%")


def _pivot(rows: pd.DataFrame, cell) -> dict:
    """One row per (variant, backend, direction), one column per sequence length (or one column)."""
    lengths = sorted(int(n) for n in rows["seq_len"].dropna().unique()) if "seq_len" in rows else []
    table = []
    keys = ["name", "backend", "direction"]
    for key, group in rows.groupby(keys, sort=False, dropna=False):  # in the order the spec named them
        by_length = {int(r["seq_len"]): cell(r) for _, r in group.iterrows() if not missing(r.get("seq_len"))}
        cells = [by_length.get(n, "") for n in lengths] if lengths else [cell(group.iloc[-1])]
        table.append({"name": key[0], "backend": "" if missing(key[1]) else key[1], "direction": key[2].replace("_", "+"),
                      "cells": cells})
    return {"columns": [f"{n} tokens" for n in lengths] or ["median"], "rows": table}


def _quiet_rerun(command: str | None, spec: dict, rows: pd.DataFrame) -> str | None:
    """The command that times a machine's kernels again, quietly: the study's own command with ten
    times the samples (at least a second per candidate) and, on a CPU, the threads fixed at those the
    noisy timing used. A changed kernels: section is timed again (its hash is new) while finished
    runs are not repeated; the tables then show the newer timing."""
    if not command:
        return None
    min_time = float((spec.get("kernels") or {}).get("min_time") or 0.1)
    extra = f" --set kernels.min_time={_setting(max(1.0, 10 * min_time))}"
    timed = rows[(rows["component"] != "train_step") & (rows["device"] == "cpu")] if "device" in rows else rows.iloc[:0]
    threads = timed["threads"].dropna() if "threads" in timed else []
    if len(threads):
        extra += f" --set kernels.threads={int(threads.iloc[-1])}"
    return command + extra


def _kernel_tables(kernels: pd.DataFrame, spec: dict | None = None, commands: dict[str, str] | None = None) -> list[dict]:
    """Per machine: each timed component's latencies (and attention's FLOP/s and % of peak) as compact
    tables, decode costs per attention, and what could not run, once per backend and reason. Where a
    latency is noisy, ``rerun`` is the command that measures it quietly (`commands`: each results
    folder's study command)."""
    if kernels.empty:
        return []
    out = []
    timed = kernels[kernels["component"] != "train_step"] if "component" in kernels else kernels  # steps: their own section
    for machine, rows in timed.groupby("machine", sort=False):
        ok = rows[rows["status"] == "ok"]
        components = []
        for component, group in ok[ok["component"] != "decode"].groupby("component", sort=False):
            components.append({"component": component, "latency": _pivot(group, _latency),
                               "throughput": _pivot(group, _throughput)
                               if "flops_per_s" in group and group["flops_per_s"].notna().any() else None})
        decode = ok[ok["component"] == "decode"] if "phase" in ok else ok.iloc[:0]
        decode_rows = _decode_rows(decode)
        skipped = rows[rows["status"] != "ok"]
        not_run = [{"what": (r["backend"] if isinstance(r.get("backend"), str) else r["name"]),
                    "component": r["component"], "status": r["status"], "reason": r["reason"]}
                   for _, r in skipped.drop_duplicates(["component", "backend", "status", "reason"]).iterrows()]
        noisy = bool(ok["noisy"].eq(True).any()) if "noisy" in ok else False  # NaN where a row was not timed
        folder = rows["folder"].iloc[-1] if "folder" in rows else None
        out.append({"machine": machine, "components": components, "decode": decode_rows,
                    "decode_contexts": any(d["context"] is not None for d in decode_rows),
                    "decode_state": any(d["state"] != "–" for d in decode_rows), "not_run": not_run,
                    "noisy": noisy, "rerun": _quiet_rerun((commands or {}).get(folder), spec or {}, ok) if noisy else None})
    return out


def _decode_rows(decode: pd.DataFrame) -> list[dict]:
    """One machine's decode timings, per attention (and per context, where the section timed several): prefill
    and per-token latency, the bytes its cache held at the end of decoding (a KV cache's or a recurrent state's),
    and what its layers declare — KV cache per token ("none" where it keeps a state instead) and state per
    sequence, whatever its length."""
    out = []
    contexts = "context" in decode and decode["context"].notna().any()
    for name, group in decode.groupby("name", sort=False):
        lengths = group.groupby("context", sort=True) if contexts else [(None, group)]
        for context, at in lengths:
            step, prefill = at[at["phase"] == "decode"], at[at["phase"] == "prefill"]
            if step.empty:
                continue
            r = step.iloc[-1]
            held = r.get("kv_cache_bytes_final")
            state = r.get("state_bytes")
            per_token = r.get("kv_cache_bytes_per_token")
            out.append({"name": name, "context": None if context is None else int(context),
                        "prefill": _latency(prefill.iloc[-1]) if not prefill.empty else "–",
                        "per_token": duration(r["per_token_s"]), "tokens_per_s": significant(r["tokens_per_s"]),
                        "kv_cache": size(r["kv_cache_bytes"] if missing(held) else held),
                        "kv_per_token": "none" if per_token == 0 and not missing(state) else size(per_token),
                        "state": size(state) if not missing(state) and state else "–",
                        "length": int(r["prompt"] + r["new_tokens"])})
    return out


def _speed_rows(kernels: pd.DataFrame) -> list[dict]:
    """Each comparison's training steps timed side by side (``bench.speed``), the latest per machine."""
    if kernels.empty or "component" not in kernels:
        return []
    rows = kernels[kernels["component"] == "train_step"].drop_duplicates(["name", "reference", "machine"], keep="last")
    return [{"variant": r["name"], "reference": r["reference"], "machine": r["machine"], "status": r["status"],
             "phrase": speed_phrase(r.to_dict()) if r["status"] == "ok" else r.get("reason", ""),
             "steps": "–" if r["status"] != "ok" else f"{duration(r['variant_step_s'])} against {duration(r['reference_step_s'])}"}
            for _, r in rows.iterrows()]


def _optima(optima: list[dict]) -> str:
    """Approach 2's optimum per budget: "1.2e+05 at 1e+12 FLOPs, …", "(outside the trained sizes)" where it is."""
    return ", ".join(f"{count(o['n_opt'])} at {flops(o['budget'])}" + ("" if o["inside"] else " (outside the trained sizes)")
                     for o in optima)


def _scaling_rows(summary: dict, palette: figures.Palette | None = None) -> dict:
    """One machine's scaling summary (``analysis.scaling_summary``) as table rows and its figure."""
    fits = [{"variant": r["variant"], **{k: significant(r[k], 4) for k in scaling.PARAMS},
             **{f"{k}_ci": f"{significant(r[f'{k}_ci'][0], 4)} – {significant(r[f'{k}_ci'][1], 4)}" for k in scaling.PARAMS},
             "a": significant(r["a"], 3), "b": significant(r["b"], 3), "r2": significant(r["r2"], 4),
             "max_residual": significant(r["max_residual"], 3), "objective": significant(r["objective"], 4), "warnings": r["warnings"]}
            for r in summary["fits"]]
    multipliers = [{"variant": m["variant"], "where": m["where"], "compute": flops(m["compute"]), "loss": significant(m["loss"], 4),
                    "multiplier": significant(m["multiplier"], 3),
                    "ci": f"{significant(m['ci'][0], 3)} – {significant(m['ci'][1], 3)}" if m["ci"] else "–",
                    "extrapolated": m["extrapolated"]}
                   for m in summary["multipliers"]]
    approach2 = [{"variant": r["variant"], "a": significant(r["a"], 3), "b": significant(r["b"], 3),
                  "note": f"{r['budgets']} compute budgets, N_opt {_optima(r.get('optima', []))}; R² of the N_opt line "
                          f"{significant(r['r2'], 4)}, parabolas' R² ≥ {significant(r['parabola_r2'], 4)}"}
                 if r["error"] is None else {"variant": r["variant"], "a": None, "b": None, "note": r["error"]}
                 for r in summary["approach2"]]
    compute_law = [{"variant": c["variant"], "E": significant(c["E"], 4), "K": significant(c["K"], 4), "gamma": significant(c["gamma"], 3),
                    "r2": significant(c["r2"], 4), "points": c["points"],
                    "range": f"{flops(c['range'][0])} – {flops(c['range'][1])} (outside: extrapolation)",
                    "max_residual": significant(c["max_residual"], 3)}
                   for c in summary["compute_law"]]
    figure = figures.scaling_figure(summary["points"], summary["parametric"], palette)
    return {"fits": fits, "multipliers": multipliers, "approach2": approach2, "compute_law": compute_law,
            "figures": [figure] if figure else []}


def _scaling_section(parts: list[dict], palette: figures.Palette | None = None) -> dict | None:
    """The report's scaling section from ``analysis.scaling_per_machine``: every machine's rows and figures."""
    if not parts:
        return None
    formatted = [_scaling_rows(part, palette) for part in parts]
    merged = {key: [row for part in formatted for row in part[key]] for key in SCALING_TABLES}
    merged["figures"] = [f for part in formatted for f in part["figures"]]
    return merged


SIZE_KEYS = ("model.n_embd", "model.n_layer")  # sweeping either grows the model
BUDGET_KEYS = ("train.tokens", "train.steps", "train.flops", "train.seconds")


def _asks_for_scaling(design: StudyDesign) -> bool:
    """Whether a study is a scaling study (its spec sweeps model size and budget, or names extrapolate_to):
    the report then says why no law was fitted; in any other study the section is left out."""
    sweep = design.sweep
    return bool(design.extrapolate_to) or (any(k in sweep for k in SIZE_KEYS) and any(k in sweep for k in BUDGET_KEYS))


def _tuning_section(tuning: Tuning | None, palette: figures.Palette | None = None) -> dict | None:
    """Each variant's tune points (``analysis.Tuning``): mean val loss over the tuning seeds, failures,
    eligibility, the chosen one; what to doubt about the choices (grid edges, unstable neighbours);
    and the sensitivity figure."""
    if tuning is None:
        return None
    rows = [{"variant": r["variant"], "setting": ", ".join(f"{k}={v}" for k, v in r["sweep"].items()),
             "val_loss": significant(r["val_loss"], 4), "seeds": ", ".join(map(str, r["seeds"])),
             "diverged": int(r["diverged"]), "failed": int(r["failed"]), "eligible": bool(r["eligible"]),
             "chosen": bool(r["chosen"])} for r in tuning.points.to_dict("records")]
    return {"rows": rows, "figure": figures.sensitivity_figure(tuning.runs, palette),
            "flags": [{"variant": v, "flag": f} for v, fs in tuning.flags.items() for f in fs]}


def _ladder_section(analysis: StudyAnalysis | None) -> dict | None:
    """A recipe ladder: each step's paired change from the step before (with its verdict) and from the
    first step (``analysis.ladder_climb``), as a table and a waterfall figure."""
    if analysis is None or analysis.ladder is None:
        return None
    summary, climb = analysis.summary, analysis.ladder
    verdicts = {c.variant: c.verdict for c in summary.comparisons}

    def change(row, label: str) -> str:
        if row[f"{label}_n"] < 2:
            return "–"
        return (f"{significant(row[label], 3, sign=True)} ({significant(row[f'{label}_low'], 3, sign=True)} to "
                f"{significant(row[f'{label}_high'], 3, sign=True)}, n = {row[f'{label}_n']})")

    rows = [{"step": r["step"], "verdict": verdicts.get(r["step"], "–" if i == 0 else "not compared"),
             "step_change": change(r, "change") if i else "–", "cumulative": change(r, "cumulative") if i else "–"}
            for i, (_, r) in enumerate(climb.iterrows())]
    return {"rows": rows, "metric": summary.metric.replace("_", " "), "figure": figures.ladder_figure(climb, summary.metric, summary.higher_is_better)}


def _comparison_rows(summary: StudySummary) -> list[dict]:
    """The verdict table, in the summary's order (verdict, then the size of the difference)."""
    return [{"variant": c.variant, "reference": c.reference, "verdict": c.verdict,
             "delta": significant(c.delta, 3, sign=True),
             "ci": f"{significant(c.ci_low, 3, sign=True)} to {significant(c.ci_high, 3, sign=True)}", "test": c.test,
             "n": c.n, "p": p_value(c.p), "p_adjusted": p_value(c.p_adjusted),
             "p_equivalent": p_value(c.p_equivalent_adjusted),
             "mde": "–" if np.isnan(c.mde) else f"±{significant(c.mde, 3)}", "note": c.note or _decided(c)}
            for c in summary.comparisons]


def _decided(c) -> str:
    """For a verdict reached at an earlier look: that look's numbers (the row's are all seeds')."""
    d = c.decided_at
    if not d:
        return ""
    return (f"decided at its {d['n']}-seed look: Δ {significant(d['delta'], 3, sign=True)}, 95% CI "
            f"{significant(d['ci_low'], 3, sign=True)} to {significant(d['ci_high'], 3, sign=True)}; "
            f"this row is all {c.n} seeds")


def _headlines(summary: StudySummary, runs: pd.DataFrame, kernels: pd.DataFrame) -> list[dict]:
    """Each comparison's verdict in words, then what the variant costs against its reference here."""
    mine = runs[runs["machine"] == summary.machine]
    quantized = mine[(mine["kind"] == "quantize") & (mine["status"] == "finished")] if "kind" in mine else mine.iloc[:0]
    if "machine_id" in kernels and "machine_id" in mine:  # timed on this machine, whatever its thread count then
        kernels = kernels[kernels["machine_id"].isin(set(mine["machine_id"]))].assign(machine=summary.machine)
    out = []
    if not summary.comparisons:  # a study of one model (a baseline to reproduce): its result is the answer
        metric = summary.metric.replace("_", " ")
        for _, r in summary.variants.iterrows():
            m = summary.metric
            out.append({"verdict": "result", "costs": "", "tuned": "", "doubts": "", "sentence":
                        f"{r['variant']} reaches {metric} {significant(r[f'{m}_mean'], 4)} (sd {significant(r[f'{m}_sd'], 2)} "
                        f"over {int(r['n'])} seeds; 95% CI {significant(r[f'{m}_ci_low'], 4)} to "
                        f"{significant(r[f'{m}_ci_high'], 4)}), with {count(r['params'])} parameters at "
                        f"{count(r['tokens_per_s'])} tokens/s on {summary.machine}."})
    for c in summary.comparisons:
        if c.reference == f"{c.variant} (float)":
            facts = costs.quantization_costs(quantized[quantized["variant"] == c.variant])
        elif not quantized.empty and c.reference in set(quantized["variant"]):  # two post-training methods
            facts = costs.quantization_costs(quantized[quantized["variant"] == c.variant],
                                             quantized[quantized["variant"] == c.reference])
        else:
            facts = costs.costs(c.variant, c.reference, summary.variants, mine, kernels, summary.machine)
        doubts = [f"{name}: {flag}" for name in (c.variant, c.reference) for flag in summary.tuning.get(name, [])]
        out.append({"verdict": c.verdict, "sentence": c.verdict_sentence(), "costs": costs.cost_sentence(facts, summary.machine),
                    "tuned": c.tuned_sentence(), "doubts": "; ".join(doubts)})
    return out


def _variant_rows(summary: StudySummary, baseline: str) -> tuple[list[str], list[dict]]:
    """Per variant (baseline first, then in the order of the verdicts): the quality metrics' mean ± sd
    over seeds (the tested one first; the others shown, not tested), size, speed, setting, failures."""
    metrics = [summary.metric] + [m for m in QUALITY if m != summary.metric
                                  and summary.variants[f"{m}_mean"].notna().any()]
    verdicts = {c.variant: (VERDICTS.index(c.verdict), -abs(c.delta) if np.isfinite(c.delta) else 0.0)
                for c in summary.comparisons}  # as the verdicts are: by verdict, then the size of the difference
    table = summary.variants.assign(
        order=[(-1, 0.0) if v == baseline else verdicts.get(v, (len(VERDICTS), 0.0)) for v in summary.variants["variant"]])
    rows = []
    for _, r in table.sort_values("order", kind="stable").iterrows():
        rows.append({"variant": r["variant"], "baseline": r["variant"] == baseline, "n": int(r["n"]),
                     "metrics": [f"{significant(r[f'{m}_mean'], 4)} ± {significant(r[f'{m}_sd'], 2)}" for m in metrics],
                     "setting": ", ".join(f"{k}={v}" for k, v in (r["sweep"] or {}).items()) or "–",
                     "params": count(r["params"]), "tokens_per_s": count(r["tokens_per_s"]),
                     "failed": f"{int(r['failed'])} / {int(r['diverged'])}"})
    return [summary.metric_name] + [m.replace("_", " ") for m in metrics[1:]], rows


def _grid(key: str, values: list | dict) -> str:
    """A tuned key's candidates: one grid ("train.lr in {0.003, 0.006}"), or one per variant (different
    optimizers' learning rates: "train.lr in {0.003, 0.006} for adamw, {0.012, 0.024} for muon")."""
    def listed(grid: list) -> str:
        return "{" + ", ".join(map(str, grid)) + "}"

    if isinstance(values, dict):
        return f"{key} in " + ", ".join(f"{listed(grid)} for {variant}" for variant, grid in values.items())
    return f"{key} in {listed(values)}"


def _settings(design: StudyDesign, runs: pd.DataFrame, summary: StudySummary) -> list[tuple[str, str]]:
    """The study's settings, one line each: model, data, budget, seeds, tuning, precision."""
    baseline = design.baseline
    train = runs[(runs["variant"] == baseline) & (runs["kind"] == "train")] if "kind" in runs else runs.iloc[:0]
    config = next((c for c in train.get("config", []) if isinstance(c, dict)), None)
    lines = []
    if config:
        m, d, t = config["model"], config["data"], config["train"]
        parts = [f"{m['n_layer']} layers × {m['n_embd']} wide, {m['n_head']} heads"]
        for family in ("attention", "positional", "norm", "mlp", "moe", "quantization"):
            component = m.get(family)
            if component:
                parts.append(f"{family} {component.get('name') if isinstance(component, dict) else component}")
        lines.append(("model", f"{baseline} (the baseline): " + ", ".join(parts)))
        what = d.get("task") or d.get("name") or d.get("source")
        seq_len = t.get("seq_len") or d.get("seq_len") or m.get("block_size")
        tokenizer = f", {d['tokenizer']} tokenizer" if d.get("tokenizer") else ""
        lines.append(("data", f"{d.get('source')}{f' ({what})' if what != d.get('source') else ''}{tokenizer}, "
                              f"vocabulary {m.get('vocab_size')}, {seq_len}-token sequences"))
        kinds = ("steps", "tokens", "flops", "seconds")
        if any(f"train.{k}" in design.sweep for k in kinds):  # one budget per sweep point
            lines.append(("budget", f"per sweep point (below), batch {t['batch_size']}"))
        else:
            budget = next((f"{t[k]:,} {k}" if k != "flops" else flops(t[k]) for k in kinds if t.get(k)), "–")
            tokens = train["tokens"].median() if "tokens" in train and train["tokens"].notna().any() else None
            lines.append(("budget", f"{budget} per run, batch {t['batch_size']}"
                                    + (f" ({count(tokens)} tokens per run)" if tokens else "")))
    for key, values in design.sweep.items():  # the model and budget lines show the first point
        show = flops if key == "train.flops" else count if key == "train.tokens" else _setting
        lines.append(("sweep", f"{key} in {{{', '.join(str(show(v)) for v in values)}}}"))
    seeds = sorted({int(s) for s in eval_runs(runs)["seed"]})
    lines.append(("seeds", f"{', '.join(map(str, seeds))}; {summary.design.describe()}"))
    if design.tune:
        tuning_seeds = sorted({int(s) for s in runs.loc[runs.get("role") == "tune", "seed"]}) if "role" in runs else []
        lines.append(("tuning", "; ".join(_grid(key, values) for key, values in design.tune.items())
                                + f", chosen per variant on tuning seed(s) {', '.join(map(str, tuning_seeds)) or '–'}"))
    else:
        lines.append(("tuning", "none: every variant at the spec's settings"))
    precisions = sorted({f"{r['dtype']} on {r['device']}" for _, r in train.iterrows() if isinstance(r.get("dtype"), str)})
    if precisions:
        lines.append(("precision", ", ".join(precisions)))
    return lines


def study_analyses(results: Results) -> list[StudyAnalysis]:
    """The first study in (merged) `results`, analysed once from its current runs: one analysis per machine."""
    design = results.studies.iloc[0]["design"]
    return analyse(results.runs[results.runs["current"]], design, curves=results.metrics)


def _findings(results: Results, analyses: list[StudyAnalysis]) -> list[dict]:
    """The findings table's rows of a study that tests a published direction (one per machine)."""
    design = results.studies.iloc[0]["design"]
    if design.finding is None:
        return []
    runs = results.runs[results.runs["current"]].assign(machine=results.runs["machine"].fillna(NOT_RUN))
    kernels = results.kernels
    return [finding_row(a.summary, design, runs[runs["machine"] == a.machine],
                        kernels[kernels["machine"] == a.machine] if "machine" in kernels else kernels)
            for a in analyses]


def study_rows(folder: str | Path) -> list[dict]:
    """The findings rows of one results folder (empty where its study tests no published direction)."""
    results = _merge([Path(folder)])
    return _findings(results, study_analyses(results))


def suite_rows(folder: str | Path) -> list[dict]:
    """The findings rows of a suite: one per finding study in `folder`'s subfolders (``suite_folders``)."""
    return [{**row, "study_folder": sub.name} for sub in suite_folders(Path(folder)) for row in study_rows(sub)]


def summary_json(folders: list[str | Path]) -> dict:
    """The machine-readable verdicts (``python -m bench.report DIR --json``): the study, its noise floor
    and every comparison; with several machines, each machine's under "machines" as well; a study
    that tests a published direction carries its findings rows. A findings suite's folder (its
    studies in subfolders): the findings table."""
    if len(folders) == 1 and suite_folders(Path(folders[0])) and not (Path(folders[0]) / "results.db").exists():
        return {"findings": suite_rows(Path(folders[0]))}
    results = _merge([Path(f) for f in folders])
    analyses = study_analyses(results)
    if not analyses:
        raise ValueError(f"no finished runs in {', '.join(map(str, folders))}")
    summaries = [a.summary for a in analyses]
    first = summaries[0].to_dict()
    out = {**first, "comparisons": [c for s in summaries for c in s.to_dict()["comparisons"]],
           "findings": _findings(results, analyses)}
    if len(summaries) > 1:
        out["machines"] = [s.to_dict() for s in summaries]
    return out


def write_findings(folder: str | Path, out: str | Path | None = None) -> Path:
    """The findings suite's page (default findings.html in the suite's folder): the table, each row
    linking to its study's report."""
    folder = Path(folder)
    rows = suite_rows(folder)
    if not rows:
        raise ValueError(f"no finding studies under {folder} (subfolders with a results.db whose spec has finding:)")
    out = Path(out) if out else folder / "findings.html"
    context = {"rows": [{**r, "deltas": [delta_text(c) for c in r["comparisons"]], "minutes": f"{r['minutes']:.1f}",
                         "link": f"{r['study_folder']}/report.html"} for r in rows],
               "summary": summary_line(rows), "generated": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    out.write_text(environment.from_string(FINDINGS_TEMPLATE.read_text()).render(**context))
    return out


def build_report(folders: list[str | Path]) -> str:
    """The report for one or more results folders, as an HTML string."""
    folders = [Path(f) for f in folders]
    results = _merge(folders)
    studies = results.studies.to_dict("records")
    spec, design = studies[0]["spec"], studies[0]["design"]  # the spec as stored (shown), its design (read)
    baseline = design.baseline
    analyses = study_analyses(results)  # the verdicts, tuning, ladder and scaling laws of each machine
    summaries = [a.summary for a in analyses]
    runs, metrics, kernels = results.runs[results.runs["current"]].copy(), results.metrics, results.kernels
    failed = [{"variant": r["variant"] + (" (tuning)" if r.get("role") == "tune" else ""), "seed": r["seed"],
               "status": r["status"], "reason": r["reason"]}
              for _, r in runs[runs["status"].isin(["failed", "diverged"])].iterrows()]
    all_runs = runs.assign(machine=runs["machine"].fillna(NOT_RUN))
    runs = eval_runs(all_runs)  # what the verdicts, curves and tables are about; tuning has its own section
    if not metrics.empty:  # the current plan's steps (runs of an edited spec's earlier plan stay out)
        metrics = metrics.merge(runs[["run_id", "folder"]], on=["run_id", "folder"])
    combined = (pd.concat([s.variants.assign(machine=s.machine) for s in summaries], ignore_index=True)
                if summaries else pd.DataFrame())
    floor = runs["loss_floor"].dropna().median() if "loss_floor" in runs and runs["loss_floor"].notna().any() else None
    quantized = runs[(runs["kind"] == "quantize") & (runs["status"] == "finished")]
    serving = latest_serving(results.serving)
    machines = runs.dropna(subset=["hardware"]).drop_duplicates("machine")
    metric = summaries[0].metric if summaries else "val_loss"
    higher = summaries[0].higher_is_better if summaries else False
    # one colour per variant in every figure: the baseline first, the spec's order, then any other name shown
    # (a study with cells: its variants as the spec names them first, the lines of its cells figure)
    palette = figures.variant_palette([*(design.cell_names if design.cells else ()), baseline, *design.variants,
                                       *all_runs["variant"],
                                       *kernels.get("name", []), *serving.get("variant", [])])
    figs = {
        "curves": figures.loss_curves(metrics, runs, floor, palette),
        "final": figures.final_metrics(combined, list(QUALITY), palette) if not combined.empty else None,
        "cost": figures.quality_vs_cost(combined, metric, higher, palette) if not combined.empty else None,
        "moe": figures.moe_figure(metrics, runs, palette) if not metrics.empty else None,
        "quantization": figures.quantization_figure(quantized, palette) if not quantized.empty else None,
        "serving": figures.serving_figure(serving, palette) if not serving.empty else None,
    }
    study_lines = []
    for x in summaries:
        columns, rows = _variant_rows(x, baseline)
        study_lines.append({
            "machine": x.machine, "metric": x.metric.replace("_", " "), "metric_label": x.metric_label,
            "design": x.design.describe(),
            "noise": x.noise.sentence(x.metric_name), "headlines": _headlines(x, runs, kernels),
            "forest": figures.forest(x.comparisons, x.metric, x.design.margin, x.higher_is_better),
            "comparisons": _comparison_rows(x), "columns": columns, "variants": rows,
            "settings": _settings(design, all_runs[all_runs["machine"] == x.machine], x)})
    context = {
        "name": design.name,
        "description": design.description,
        "baseline": baseline,
        "generated": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "summaries": study_lines,
        "figures": figs,
        "floor": floor,
        "kernel_figures": figures.kernel_figures(kernels, palette) if not kernels.empty else [],
        "kernels": _kernel_tables(kernels, spec, {s["folder"]: s["command"] for s in studies}),
        "speed": _speed_rows(kernels),
        "scaling": _scaling_section([a.scaling for a in analyses if a.scaling], palette),
        "scaling_asked": _asks_for_scaling(design),
        "quantized": [{"variant": r["variant"], "seed": r["seed"], "val_loss_float": significant(r["val_loss_float"], 4),
                       "val_loss": significant(r["val_loss"], 4), "change": percent(r["val_loss_change"]),
                       "bytes_float": size(r["model_bytes_float"]), "bytes": size(r["model_bytes"]),
                       "latency_float": duration(r["latency_ms_float"] / 1e3), "latency": duration(r["latency_ms"] / 1e3),
                       "decode_float": _ms(r.get("decode_ms_per_token_float")), "decode": _ms(r.get("decode_ms_per_token")),
                       "seconds": "–" if missing(r.get("quantize_seconds")) else duration(r["quantize_seconds"]),
                       "format": r["quantization_format"]}
                      for _, r in quantized.sort_values(["variant", "seed"]).iterrows()],
        "serving": [_serving_row(r, serving["machine"].nunique() > 1) for _, r in serving.iterrows()],
        "serving_saturation": _serving_saturation(serving),
        "serving_rule": f"the lowest offered rate after which goodput rises by less than {RISE:.0%}",
        "serving_settings": _serving_settings(serving),
        "failed": failed,
        "tuning": _tuning_section(analyses[0].tuning if analyses else None, palette),  # the flags of the table's choices
        "ladder": _ladder_section(analyses[0] if analyses else None),
        "recall": recall_section(analyses, design, palette),
        "multimodal": multimodal_section(runs, list(dict.fromkeys([baseline, *design.variants]))),
        "diffs": _config_differences(runs, baseline),
        "machines": [{"machine": r["machine"], "cpu": r["hardware"].get("cpu"), "cores": r["hardware"].get("cpu_cores"),
                      "threads": r["hardware"].get("torch_threads"), "gpu": r["hardware"].get("gpu"),
                      "python": r["hardware"].get("python"), "libraries": r["libraries"], "git_commit": r["git_commit"],
                      "platform": r["hardware"].get("platform")} for _, r in machines.iterrows()],
        "commands": [{"folder": s["folder"], "command": s["command"]} for s in studies],
        "spec": spec,
        "n_runs": len(runs),
        "findings": [{**r, "deltas": [delta_text(c) for c in r["comparisons"]], "minutes": f"{r['minutes']:.1f}"}
                     for r in _findings(results, analyses)],
    }
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(TEMPLATE.read_text()).render(**context)


def write_report(folders: list[str | Path], out: str | Path | None = None) -> Path:
    """Write the report (default: report.html in the first folder) and return its path."""
    out = Path(out) if out else Path(folders[0]) / "report.html"
    out.write_text(build_report(folders))
    return out
