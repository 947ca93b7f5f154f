"""How numbers read in tables: the terminal summary and the HTML report share these."""

from __future__ import annotations

import math


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def significant(value, digits: int = 3, *, sign: bool = False) -> str:
    """A number to `digits` significant figures in fixed notation (never scientific): 0.974, 1.00,
    0.000232, 41300; exactly zero is "0". With `sign`, positive numbers get a "+"."""
    if missing(value):
        return "–"
    if isinstance(value, str):
        return value
    value = float(value)
    if value == 0:
        return "0"
    rounded = float(f"{value:.{digits - 1}e}")  # rounding may carry a digit: 0.9996 -> 1.00
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(rounded))))
    return f"{rounded:{'+' if sign else ''}.{decimals}f}"


def p_value(p) -> str:
    """A p-value: two significant figures below 0.01, three above, "< 0.0001" below that."""
    if missing(p):
        return "–"
    return "< 0.0001" if p < 1e-4 else f"{p:.2g}" if p < 0.01 else f"{p:.3g}"


TIME_UNITS = (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9))
BYTE_UNITS = (("TiB", 2.0**40), ("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10), ("B", 1.0))
SI = (("Y", 1e24), ("Z", 1e21), ("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0))


def unit_for(value, units: tuple[tuple[str, float], ...]) -> tuple[str, float]:
    """The largest of `units` (name, size; largest first) that `value` reaches; the smallest below all."""
    for unit, scale in units:
        if abs(value) >= scale:
            return unit, scale
    return units[-1]


def _scaled(value, units: tuple[tuple[str, float], ...], digits: int) -> str:
    """`value` in the largest unit it reaches, to `digits` significant figures."""
    if missing(value):
        return "–"
    unit, scale = unit_for(value, units)
    return f"{significant(value / scale, digits)} {unit}"


def duration(seconds, digits: int = 3) -> str:
    """A time: 812 µs, 8.00 ms, 1.20 s."""
    return _scaled(seconds, TIME_UNITS, digits)


def size(n_bytes, digits: int = 3) -> str:
    """Bytes in binary units: 512 B, 4.00 KiB, 1.25 MiB, 2.00 GiB."""
    return _scaled(n_bytes, BYTE_UNITS, digits)


def flops(n, digits: int = 3) -> str:
    """An amount of computation: 713 kFLOP, 1.20 PFLOP."""
    return _scaled(n, tuple((f"{unit}FLOP", scale) for unit, scale in SI), digits)


def flop_rate(n, digits: int = 3) -> str:
    """A compute rate: 45.1 GFLOP/s, 1.20 TFLOP/s."""
    return _scaled(n, tuple((f"{unit}FLOP/s", scale) for unit, scale in SI), digits)


def percent(fraction, digits: int = 2) -> str:
    """A fraction as a percentage: 0.0421 -> 4.2%."""
    return "–" if missing(fraction) else f"{significant(100 * fraction, digits)}%"


def count(n) -> str:
    """A count (parameters, tokens/s, bytes): 1.23M."""
    if missing(n):
        return "–"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"
