"""Known results, reproduced: the findings suite.

    python -m bench.findings                      # every spec in ablations/findings/, then the table
    python -m bench.findings --only rope alibi    # some of them
    python -m bench.report results/findings       # the table again as HTML (--json: as JSON)

Each spec in ``ablations/findings/`` tests one direction the literature reports and says so in its
``finding:`` key (``spec.FindingSpec``): the direction, its source, the verdicts that agree with it,
optionally the expected order of the variants' means, and whether it is a sanity check (true by
construction). A direction *agrees* when every expected comparison reached one of its expected
verdicts (and the order holds on the means); it *disagrees* when a comparison was decided otherwise;
it is *undecided* when a comparison ended inconclusive or saturated. A disagreement is a result:
it is reported, never tuned away.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from bench.analysis import StudySummary
from bench.formatting import significant
from bench.spec import StudyDesign

FINDINGS = Path("ablations") / "findings"  # the shipped specs, one per direction
AGREES = {"agrees": "yes", "disagrees": "no", "undecided": "undecided"}


def study_minutes(runs: pd.DataFrame, kernels: pd.DataFrame) -> float:
    """Wall-clock minutes the study's work took on its machine: the union of its runs' training
    intervals (parallel workers overlap; gaps between invocations are not counted) plus the
    side-by-side speed timing."""
    spans = sorted((float(a), float(b)) for a, b in zip(runs.get("started_at", []), runs.get("finished_at", []))
                   if not (pd.isna(a) or pd.isna(b)))
    total, end = 0.0, -math.inf
    for start, finish in spans:
        total += max(0.0, finish - max(start, end))
        end = max(end, finish)
    if not kernels.empty and "seconds" in kernels:
        total += float(kernels.loc[kernels["component"] == "train_step", "seconds"].fillna(0).sum())
    return total / 60


def finding_row(summary: StudySummary, design: StudyDesign, runs: pd.DataFrame, kernels: pd.DataFrame) -> dict:
    """The findings table's row for one study on one machine (its design has a ``finding``): the
    direction, its source, each expected comparison (the variant against its reference) with our Δ,
    CI and verdict, seeds, minutes and whether we agree."""
    finding = design.finding
    by_pair = {(c.variant, c.reference): c for c in summary.comparisons}
    comparisons, outcomes = [], []
    for variant, expected in finding.expect.items():
        expected = [expected] if isinstance(expected, str) else list(expected)
        c = by_pair.get((variant, design.reference_of(variant)))
        verdict = c.verdict if c else "not run"
        outcomes.append("agrees" if verdict in expected else "disagrees" if verdict in ("better", "worse", "equivalent")
                        else "undecided")
        comparisons.append({"variant": variant, "reference": c.reference if c else None, "verdict": verdict,
                            "expected": expected, "delta": c.delta if c else None, "ci_low": c.ci_low if c else None,
                            "ci_high": c.ci_high if c else None, "unit": c.unit if c else "",
                            "seeds": c.n if c else 0, "sentence": c.sentence() if c else f"{variant} has no verdict yet"})
    order_note, order_holds = "", True
    if finding.order:
        means = summary.variants.set_index("variant")[f"{summary.metric}_mean"] if not summary.variants.empty else {}
        values = [means.get(v, math.nan) for v in finding.order]
        sign = -1 if summary.higher_is_better else 1
        order_holds = all(not math.isnan(x) for x in values) and all(
            sign * a <= sign * b for a, b in zip(values, values[1:]))
        observed = sorted(finding.order, key=lambda v: sign * means.get(v, math.inf))
        order_note = (f"expected order (best first, on the means) {' > '.join(finding.order)}: "
                      + ("holds" if order_holds else f"not observed ({' > '.join(observed)})"))
    status = ("disagrees" if "disagrees" in outcomes or (all(o == "agrees" for o in outcomes) and not order_holds)
              else "agrees" if all(o == "agrees" for o in outcomes) else "undecided")
    return {"study": summary.study, "machine": summary.machine, "direction": finding.direction,
            "source": finding.source, "sanity": finding.sanity, "metric": summary.metric_name,
            "comparisons": comparisons, "order": order_note, "seeds": max((c["seeds"] for c in comparisons), default=0),
            "minutes": study_minutes(runs, kernels), "status": status, "agrees": AGREES[status]}


def delta_text(comparison: dict) -> str:
    """Δ and its 95% CI in words, as the table shows it."""
    if comparison["delta"] is None or math.isnan(comparison["delta"]):
        return "–"
    unit = f" {comparison['unit']}" if comparison["unit"] else ""
    ci = ("" if comparison["ci_low"] is None or math.isnan(comparison["ci_low"]) else
          f" ({significant(comparison['ci_low'], 3, sign=True)} to {significant(comparison['ci_high'], 3, sign=True)})")
    return f"{significant(comparison['delta'], 3, sign=True)}{unit}{ci}"


def suite_folders(folder: Path) -> list[Path]:
    """The results folders of a findings suite: its subfolders that hold a store."""
    return sorted(p.parent for p in Path(folder).glob("*/results.db"))


def summary_line(rows: list[dict]) -> str:
    """How many published directions agree, whether the sanity checks pass, and the minutes spent."""
    published = [r for r in rows if not r["sanity"]]
    checks = [r for r in rows if r["sanity"]]
    agree = sum(r["status"] == "agrees" for r in published)
    passed = sum(r["status"] == "agrees" for r in checks)
    sanity = f"; {passed} of {len(checks)} sanity checks pass" if checks else ""
    return (f"{agree} of {len(published)} published directions decisive and agreeing{sanity}; "
            f"{sum(r['minutes'] for r in rows):.0f} minutes of training and timing in all.")


def markdown(rows: list[dict]) -> str:
    """The findings table as Markdown (the README shows it); minutes are each study's training and timing
    (``study_minutes``), without data preparation and reports."""
    lines = ["| direction | source | our Δ (95% CI) | verdict | seeds | minutes | agrees |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        deltas = "; ".join(f"{c['variant']} vs {c['reference']}: {delta_text(c)}" for c in r["comparisons"])
        deltas += f" ({r['metric']})" + (f"; {r['order']}" if r["order"] else "")
        verdicts = "; ".join(f"{c['variant']} {c['verdict']}" for c in r["comparisons"])
        direction = r["direction"] + (" *(sanity check)*" if r["sanity"] else "")
        lines.append(f"| {direction} | {r['source']} | {deltas} | {verdicts} | {r['seeds']} | "
                     f"{r['minutes']:.1f} | {r['agrees']} |")
    lines += ["", summary_line(rows)]
    return "\n".join(lines)
