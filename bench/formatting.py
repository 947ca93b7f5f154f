"""How numbers read in tables: the terminal summary and the HTML report share these."""

from __future__ import annotations

import math


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def number(value, digits: int = 4) -> str:
    """A measurement: fixed decimals in the usual range, scientific notation outside it."""
    if missing(value):
        return "–"
    if isinstance(value, int | str):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.{max(1, digits - 1)}e}"
    return f"{value:.{digits}f}"


def count(n) -> str:
    """A count (parameters, tokens/s, bytes): 1.23M."""
    if missing(n):
        return "–"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"
