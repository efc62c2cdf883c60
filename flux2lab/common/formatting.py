"""One way to print a number in tables, summaries and reports: missing values and non-finite ones read clearly."""

from __future__ import annotations

import math
from typing import Any

MISSING = "—"


def fmt_number(value: Any, spec: str = ".4g", unit: str = "", missing: str = MISSING) -> str:
    """`value` formatted with `spec` and `unit`; None or "" -> `missing`; nan/inf spelled out; text passes through."""
    if value is None or value == "":
        return missing
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(x):
        return "nan"
    if not math.isfinite(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:{spec}}{unit}"


def fmt_percent(value: Any, missing: str = MISSING) -> str:
    """A fraction as a whole percentage (0.42 -> "42%")."""
    return missing if value is None else f"{100 * float(value):.0f}%"
