"""Per-image metric values summarised as a mean with a percentile-bootstrap confidence interval."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Summary:
    """Mean of per-image values with a bootstrap CI.

    mean/low/high are over the finite values; `n_inf` counts the infinite ones left out (PSNR of identical
    images). When every value is infinite, mean/low/high are that infinity.
    """

    mean: float
    low: float
    high: float
    n: int  # all values, infinite ones included
    n_inf: int


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> Summary:
    """Percentile bootstrap (1 - alpha) CI of the mean, deterministic for a given seed."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    infinite = np.isinf(v)
    finite = v[~infinite]
    if finite.size == 0:
        return Summary(float(v[0]), float(v[0]), float(v[0]), int(v.size), int(v.size))
    rng = np.random.default_rng(seed)
    means = finite[rng.integers(0, finite.size, size=(n_boot, finite.size))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Summary(float(finite.mean()), float(low), float(high), int(v.size), int(infinite.sum()))
