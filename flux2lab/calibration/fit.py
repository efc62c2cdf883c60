"""Fitting a calibration run: the polynomial from input change to output change, how good it is, what it allows.

`fit_run` merges a finished run's samples and writes `fit.json` (coefficients, R² overall, on held-out prompts
and per kind, residuals, skip limits with advice, the published FLUX.2 [dev] curve on the same samples) and
`fit.png`.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flux2lab.calibration.record import KINDS, Samples, merge_samples, read_rows
from flux2lab.common.errors import Flux2LabError
from flux2lab.common.files import atomic_write_text
from flux2lab.common.formatting import fmt_number
from flux2lab.pipeline.recipe import FLUX2_DEV_COEFFICIENTS

DEFAULT_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
HELDOUT_FRACTION = 0.2
MAX_DEGREE = 6
DEFAULT_RET_STEPS = 10  # of the skip-limit table, or the run's steps when fewer


def check_degree(degree: int) -> None:
    if not isinstance(degree, int) or not 1 <= degree <= MAX_DEGREE:
        raise Flux2LabError(f"--degree {degree!r}: use an integer from 1 to {MAX_DEGREE} (TeaCache uses 3).")


def check_ret_steps(ret_steps: int | None, steps: int) -> None:
    """`ret_steps` (None: the default) must lie between 0 and the run's steps."""
    if ret_steps is not None and not 0 <= ret_steps <= steps:
        raise Flux2LabError(f"--ret-steps {ret_steps}: give a number from 0 to the {steps} steps of the run (the "
                            "first ret_steps steps always compute).")


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float | None:
    total = float(np.sum((y - y.mean()) ** 2))
    return None if len(y) < 2 or total == 0 else 1.0 - float(np.sum((y - predicted) ** 2)) / total


def heldout_prompts(prompt_ids: Sequence[str]) -> set[str]:
    """A deterministic ~`HELDOUT_FRACTION` of the prompts (by hash of the id), at least one, never all."""
    ids = sorted(set(prompt_ids), key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    if len(ids) < 2:
        return set()
    return set(ids[: min(len(ids) - 1, max(1, round(HELDOUT_FRACTION * len(ids))))])


def polynomial_minimum(coefficients: Sequence[float], lo: float, hi: float) -> tuple[float, float]:
    """(min value, where) of the polynomial over [lo, hi]: the ends and the critical points inside."""
    poly = np.poly1d(coefficients)
    candidates = [lo, hi] + [float(r.real) for r in poly.deriv().roots
                             if abs(r.imag) < 1e-12 and lo < r.real < hi]
    values = [float(poly(c)) for c in candidates]
    k = int(np.argmin(values))
    return values[k], candidates[k]


def max_consecutive_skips(floor: float, threshold: float) -> int | None:
    """How many steps in a row can skip when every rescaled distance is at least `floor`.

    After a computed step the accumulator is 0; k skips in a row need k * floor < threshold, so the most is
    the largest such k. None = no bound (the rescaled distance can be 0).
    """
    if floor <= 0:
        return None
    return max(0, math.ceil(threshold / floor) - 1)


def max_skipped_steps(k: int | None, steps: int, ret_steps: int, cutoff_steps: int | None) -> int:
    """Upper bound on skipped steps in a run: k skips then one compute, over the steps TeaCache decides."""
    eligible = max(0, (cutoff_steps if cutoff_steps is not None else steps) - max(ret_steps, 1))
    if k is None:
        return eligible
    return k * (eligible // (k + 1)) + min(eligible % (k + 1), k)


def skip_limits(coefficients: Sequence[float], x_range: tuple[float, float], thresholds: Sequence[float],
                steps: int, ret_steps: int, cutoff_steps: int | None = None) -> dict[str, Any]:
    """What the polynomial's lowest value over the observed distances allows at each threshold."""
    low, at = polynomial_minimum(coefficients, *x_range)
    floor = max(low, 0.0)
    table = []
    for t in thresholds:
        k = max_consecutive_skips(floor, t)
        table.append({"threshold": t, "max_consecutive_skips": k,
                      "max_skipped_fraction": None if k is None else k / (k + 1),
                      "max_skipped_steps": max_skipped_steps(k, steps, ret_steps, cutoff_steps)})
    return {"poly_min": low, "poly_min_at": at, "floor": floor, "thresholds": table,
            "schedule": {"steps": steps, "ret_steps": ret_steps, "cutoff_steps": cutoff_steps},
            "advice": skip_advice(floor, at, x_range, thresholds)}


def skip_advice(floor: float, at: float, x_range: tuple[float, float], thresholds: Sequence[float]) -> list[str]:
    """The skip limits in plain words."""
    lo, hi = x_range
    if floor <= 0:
        return [(f"The curve reaches 0 at x = {at:.4g} (inside the observed x range {lo:.4g} to {hi:.4g}): where "
                "the input barely changes, any number of steps can be skipped in a row at any threshold > 0. "
                "Check the fit there before trusting it.")]
    lines = [(f"Over the observed x range ({lo:.4g} to {hi:.4g}) the curve never falls below {floor:.4g} "
             f"(at x = {at:.4g}), so every step adds at least {floor:.4g} to the accumulator."),
             (f"Up to threshold {floor:.4g} no step can be skipped; above it at most every other step; above "
             f"{2 * floor:.4g} at most 2 in a row; above {3 * floor:.4g} at most 3 in a row (k skips in a row "
             f"need a threshold above k x {floor:.4g}).")]
    for t in thresholds:
        k = max_consecutive_skips(floor, t)
        if k == 0:
            lines.append(f"At threshold {t:g}: no step can be skipped.")
        elif k == 1:
            lines.append(f"At threshold {t:g}: at most every other step can be skipped (skip, compute, skip...).")
        else:
            lines.append(f"At threshold {t:g}: at most {k} consecutive skips, then a computed step.")
    return lines


def fit_samples(samples: Samples, degree: int = 3, *, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                steps: int = 50, ret_steps: int = 10, cutoff_steps: int | None = None) -> dict[str, Any]:
    """Fit y ~ poly(x) and describe how good it is and what it allows (the content of fit.json)."""
    check_degree(degree)
    finite = np.isfinite(samples.x) & np.isfinite(samples.y)
    excluded = int((~finite).sum())
    if excluded:
        warnings.warn(f"{excluded} of {len(samples)} samples have NaN/inf values and were excluded from the fit.",
                      stacklevel=2)
    s = samples.select(finite)
    prompts = sorted(set(s.prompt_id))
    need = max(10, 3 * (degree + 1))
    if len(s) < need:
        raise Flux2LabError(
            f"too few samples to fit a degree-{degree} polynomial: {len(s)} usable from {len(prompts)} prompt(s) "
            f"(need at least {need}). Record more prompts or more steps.")
    distinct = len(np.unique(s.x))
    if distinct < degree + 1:
        raise Flux2LabError(
            f"only {distinct} distinct x values in {len(s)} samples: a degree-{degree} fit needs at least "
            f"{degree + 1}. Give --degree {max(1, distinct - 1)} or record more varied prompts and steps.")
    coefficients = np.polyfit(s.x, s.y, degree)
    residual = s.y - np.polyval(coefficients, s.x)

    held = heldout_prompts(prompts)
    is_held = np.array([p in held for p in s.prompt_id], dtype=bool)
    heldout: dict[str, Any] = {"prompts": len(held), "samples": int(is_held.sum()), "r2": None, "note": None}
    heldout_residual = np.array([])
    if not held or (~is_held).sum() < need:
        heldout["note"] = "not enough prompts to hold some out (need at least 2, with enough samples left to fit)"
    else:
        train = np.polyfit(s.x[~is_held], s.y[~is_held], degree)
        heldout_residual = s.y[is_held] - np.polyval(train, s.x[is_held])
        heldout["r2"] = r_squared(s.y[is_held], np.polyval(train, s.x[is_held]))
        heldout["residual_std"] = float(np.std(heldout_residual))

    x_range = (float(s.x.min()), float(s.x.max()))
    per_kind = {}
    for kind in KINDS:
        k = s.kind == kind
        if k.any():
            per_kind[kind] = {"samples": int(k.sum()), "prompts": len(set(s.prompt_id[k])),
                              "r2": r_squared(s.y[k], s.y[k] - residual[k]),
                              "mean_residual": float(residual[k].mean())}
    published = np.array(FLUX2_DEV_COEFFICIENTS)
    return {
        "degree": degree,
        "coefficients": [float(c) for c in coefficients],
        "samples": len(s), "prompts": len(prompts), "excluded_nonfinite": excluded,
        "r2": r_squared(s.y, s.y - residual),
        "heldout": heldout,
        "residual": {"std": float(np.std(residual)), "abs_median": float(np.median(np.abs(residual))),
                     "abs_p95": float(np.percentile(np.abs(residual), 95))},
        "x_range": list(x_range), "y_range": [float(s.y.min()), float(s.y.max())],
        "per_kind": per_kind,
        "skip_limits": skip_limits(coefficients, x_range, thresholds, steps, ret_steps, cutoff_steps),
        "published_flux2_dev": {
            "coefficients": list(FLUX2_DEV_COEFFICIENTS),
            "r2_on_these_samples": r_squared(s.y, np.polyval(published, s.x)),
            "skip_limits": skip_limits(published, x_range, thresholds, steps, ret_steps, cutoff_steps),
        },
        "recipe": {"cache": {"method": "teacache", "coefficients": [float(c) for c in coefficients]}},
        "_heldout_residuals": heldout_residual, "_heldout_mask": is_held,  # for the figure; not written
    }


def plot_fit(samples: Samples, fit: dict[str, Any], path: Path, title: str = "") -> Path:
    """The calibration figure: samples by kind with the fitted curve; held-out residuals."""
    from matplotlib.figure import Figure

    s = samples.select(np.isfinite(samples.x) & np.isfinite(samples.y))
    colours = {"t2i": "tab:blue", "multi-reference": "tab:orange"}
    fig = Figure(figsize=(12, 4.8))
    left, right = fig.subplots(1, 2)
    for kind in KINDS:
        k = s.kind == kind
        if k.any():
            left.scatter(s.x[k], s.y[k], s=8, alpha=0.5, color=colours[kind], label=f"{kind} ({k.sum()})")
    xs = np.linspace(*fit["x_range"], 200)
    left.plot(xs, np.polyval(fit["coefficients"], xs), color="black", lw=2,
              label=f"degree-{fit['degree']} fit, R² {fmt_number(fit['r2'], '.3f', missing='n/a')}")
    left.set_xlabel("x: rel-L1 change of the modulated input")
    left.set_ylabel("y: rel-L1 change of the model output")
    left.legend(loc="upper left", fontsize=8)
    left.set_title(title or "TeaCache calibration")

    held = fit["_heldout_mask"]
    if held.any() and len(fit["_heldout_residuals"]):
        for kind in KINDS:
            k = s.kind[held] == kind
            if k.any():
                right.scatter(s.x[held][k], fit["_heldout_residuals"][k], s=8, alpha=0.6, color=colours[kind],
                              label=kind)
        right.legend(loc="upper left", fontsize=8)
    else:
        right.text(0.5, 0.5, fit["heldout"]["note"] or "no held-out prompts", ha="center", va="center",
                   transform=right.transAxes, wrap=True)
    right.axhline(0, color="black", lw=1)
    right.set_xlabel("x")
    right.set_ylabel("held-out residual (y - fit on the other prompts)")
    heldout_r2 = fmt_number(fit["heldout"]["r2"], ".3f", missing="n/a")
    right.set_title(f"{fit['heldout']['prompts']} held-out prompts, R² {heldout_r2}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def fit_run(run_dir: Path, degree: int = 3, ret_steps: int | None = None) -> dict[str, Any]:
    """Merge the shards and write `fit.json` and `fit.png` for a finished recording. `ret_steps` of the skip
    limits: None is `DEFAULT_RET_STEPS`, or the run's steps when fewer."""
    meta_path = run_dir / "run.json"
    if not meta_path.exists():
        raise Flux2LabError(f"{run_dir} holds no calibration recording (no run.json); record one first.")
    meta = json.loads(meta_path.read_text())
    check_ret_steps(ret_steps, meta["steps"])
    ret_steps = min(DEFAULT_RET_STEPS, meta["steps"]) if ret_steps is None else ret_steps
    samples_path = merge_samples(run_dir, meta["steps"])
    if not samples_path.exists():
        raise Flux2LabError(f"{run_dir} has no samples yet; record first.")
    samples = Samples.from_rows(read_rows(samples_path))
    fit = fit_samples(samples, degree, steps=meta["steps"], ret_steps=ret_steps)
    plot_fit(samples, fit, run_dir / "fit.png", title=f"TeaCache calibration: {run_dir.name} ({meta['model']})")
    public = {k: v for k, v in fit.items() if not k.startswith("_")}
    atomic_write_text(run_dir / "fit.json", json.dumps({"run": meta, **public}, indent=2) + "\n")
    return public
