"""How numbers read in the CLI and the report: significant figures, never scientific notation, units by magnitude."""

from __future__ import annotations

import math
import re

from hypothesis import given
from hypothesis import strategies as st

from bench.formatting import count, duration, flop_rate, flops, percent, significant, size


def test_significant_figures_in_fixed_notation():
    assert significant(0.974) == "0.974" and significant(0.9996) == "1.00"  # the carry keeps 3 figures
    assert significant(2.317e-4) == "0.000232" and significant(41321.5) == "41300"
    assert significant(0.0) == "0" and significant(-0.0123) == "-0.0123"
    assert significant(0.0123, sign=True) == "+0.0123" and significant(-0.5, 2, sign=True) == "-0.50"
    assert significant(float("nan")) == "–" and significant(None) == "–"


@given(st.floats(min_value=1e-9, max_value=1e12, allow_nan=False) | st.floats(min_value=-1e12, max_value=-1e-9))
def test_significant_never_prints_an_exponent_and_keeps_the_value(value):
    text = significant(value, 3)
    assert not re.search(r"[eE][+-]?\d", text)
    assert math.isclose(float(text), value, rel_tol=5e-3)  # 3 significant figures: within half a unit of the 3rd


def test_units_are_chosen_by_magnitude():
    assert duration(8.002e-4) == "800 µs" and duration(0.0099) == "9.90 ms" and duration(1.2) == "1.20 s"
    assert size(512) == "512 B" and size(524288) == "512 KiB" and size(830021632) == "792 MiB" and size(3 * 2**30) == "3.00 GiB"
    assert flops(712_700) == "713 kFLOP" and flops(1e19) == "10.0 EFLOP"
    assert flop_rate(4.5e10) == "45.0 GFLOP/s" and flop_rate(1.2e12) == "1.20 TFLOP/s" and flop_rate(4.5e7) == "45.0 MFLOP/s"
    assert count(104_190) == "104.19k" and percent(0.0421) == "4.2%"
