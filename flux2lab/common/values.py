"""Checks of JSON-like values that Python's types blur: a bool is not an int, nan and inf are not numbers to use."""

from __future__ import annotations

import math
from typing import Any

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes seeds from 0 to 2**63-1 (and wraps larger ones)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
