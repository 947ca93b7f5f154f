"""A sweep over offered request rates, and where its goodput saturates.

The curve is goodput (``request_goodput``: requests/s that met every SLO) against the offered rate;
without SLOs, the completed requests/s (``request_throughput``). Failed and rejected requests never
count, so a service that sheds load or misses its SLOs shows it.

The saturation point is the lowest swept rate r_i after which goodput rises by less than
``RISE`` (5%): every higher swept rate's goodput is below 1.05 · goodput(r_i), and goodput(r_i) > 0.
The highest rate swept has no rate after it, so it is never the saturation point:

- the curve still rises at the last rate (the rule holds nowhere before it): not saturated within the
  sweep (``rate`` None, and the note says up to which rate it rose; where that last rate is ``inf``,
  that it saturates somewhere above the last finite rate);
- no goodput at any rate (every request failed, was rejected or missed an SLO): ``rate`` None;
- one rate swept: no curve, ``rate`` None.

A curve that falls after a peak (overload collapse) saturates at its peak or before it. ``inf`` (every
request at once) sorts last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

RISE = 0.05  # goodput rising by less than this fraction beyond a rate: saturated there


@dataclass(frozen=True)
class Saturation:
    rate: float | None  # the offered rate (requests/s) at which goodput stops rising; None: see note
    note: str


def rate_text(rate: float) -> str:
    """An offered rate as the command line writes it: 4, 0.5, inf."""
    return "inf" if math.isinf(rate) else f"{rate:g}"


def goodput_of(row: dict) -> float:
    """A row's point on the curve: request_goodput with SLOs, else request_throughput (0 when missing)."""
    value = row.get("request_goodput") if row.get("goodput_slos") else row.get("request_throughput")
    return 0.0 if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def saturation_point(rates: Sequence[float], goodputs: Sequence[float], rise: float = RISE) -> Saturation:
    """Where goodput against offered rate stops rising (the module docstring's rule)."""
    if len(rates) != len(goodputs):
        raise ValueError("one goodput per rate")
    points = sorted(zip(map(float, rates), (0.0 if g is None or math.isnan(g) else float(g) for g in goodputs)))
    if not points:
        return Saturation(None, "no rate swept")
    if all(g <= 0 for _, g in points):
        return Saturation(None, "no goodput at any rate: every request failed, was rejected or missed an SLO")
    if len(points) == 1:
        return Saturation(None, f"one rate swept ({rate_text(points[0][0])} requests/s): no curve to saturate")
    for i, (rate, goodput) in enumerate(points[:-1]):
        if goodput > 0 and max(g for _, g in points[i + 1:]) < (1 + rise) * goodput:
            return Saturation(rate, f"goodput rises by less than {rise:.0%} beyond {rate_text(rate)} requests/s")
    if math.isinf(points[-1][0]):  # every request at once still gives more: the knee lies between the last two
        return Saturation(None, f"saturates above {rate_text(points[-2][0])} requests/s: goodput still rises by "
                                f"{rise:.0%} or more from there to every request at once (sweep rates in between)")
    return Saturation(None, f"not saturated: goodput still rises by {rise:.0%} or more up to "
                            f"{rate_text(points[-1][0])} requests/s, the highest rate swept")


def annotate(rows: list[dict], rise: float = RISE) -> Saturation:
    """Each row of one variant's sweep gains the sweep's ``saturation_rate`` and ``saturation_note``."""
    found = saturation_point([r["request_rate"] for r in rows], [goodput_of(r) for r in rows], rise)
    for row in rows:
        row["saturation_rate"], row["saturation_note"] = found.rate, found.note
    return found
