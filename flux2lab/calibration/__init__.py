"""TeaCache calibration: record how input change predicts output change, fit the polynomial, diagnose it.

Recording runs the pipeline with TeaCache attached at threshold 0 (it measures every step exactly as it
will at inference, and never skips: the images are those of the uncached pipeline) plus `OutputRecorder`, a
hook that measures how much the model output changed. Each step t >= 1 of each prompt gives one sample:
x = rel-L1 of the modulated input (TeaCache's own number), y = rel-L1 of the model output, both between
consecutive steps and over the generated image's tokens (reference-image tokens left out).

A run lives in one folder (`experiments/calibration/<name>/`): `run.json` (what was recorded), samples
(`samples.csv`, or one `samples.shard<i>of<n>.csv` per shard), and, once every prompt is in, `fit.json`
and `fit.png`. Samples are appended prompt by prompt, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook

from flux2lab.common.errors import Flux2LabError
from flux2lab.hooks import teacache
from flux2lab.pipeline.prompts import PromptEntry
from flux2lab.pipeline.recipe import FLUX2_DEV_COEFFICIENTS, Recipe, TeaCacheSettings

FIELDS = ("prompt_id", "kind", "seed", "step", "timestep", "x", "y")
KINDS = ("t2i", "multi-reference")
RECORDER_HOOK = "flux2lab_calibration_recorder"
DEFAULT_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
HELDOUT_FRACTION = 0.2


# ---------------------------------------------------------------------------------------------------------
# Recording


class OutputRecorder(ModelHook):
    """On the transformer: rel-L1 of the model output between consecutive calls, generated tokens only.

    Not stateful on purpose: diffusers resets stateful hooks at the end of every pipeline call, before the
    values could be read; call `start_image` before each image instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self.start_image()

    def start_image(self) -> None:
        self.values: list[float | None] = []
        self._previous: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    def pre_forward(self, module, *args, **kwargs):
        if not self.values:
            self._mask = teacache.generated_token_mask(teacache.forward_argument(module, "img_ids", args, kwargs))
        return args, kwargs

    def post_forward(self, module, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        current = sample if self._mask is None else sample[:, self._mask]
        self.values.append(None if self._previous is None else teacache.relative_l1(current, self._previous))
        self._previous = current
        return output


def attach_recorder(transformer: torch.nn.Module) -> OutputRecorder:
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    hook = registry.get_hook(RECORDER_HOOK)
    if hook is None:
        hook = OutputRecorder()
        registry.register_hook(hook, RECORDER_HOOK)
    return hook


def detach_recorder(transformer: torch.nn.Module) -> None:
    HookRegistry.check_if_exists_or_initialize(transformer).remove_hook(RECORDER_HOOK, recurse=False)


def recording_recipe(steps: int, height: int | None = None, width: int | None = None) -> Recipe:
    """TeaCache that measures every step and never skips: threshold 0, no retained steps, identity rescale."""
    return Recipe(steps=steps, height=height, width=width, teacache=TeaCacheSettings(
        enabled=True, coefficients=(1.0, 0.0), threshold=0.0, ret_steps=0, cutoff_steps=None))


def record_prompt(pipe, entry: PromptEntry, seed: int, recipe: Recipe) -> list[dict[str, Any]]:
    """Generate one image uncached and return its samples (one row per step after the first)."""
    from flux2lab.pipeline.core import generate

    recorder = attach_recorder(pipe.transformer)
    recorder.start_image()
    log = generate(pipe, [entry.prompt], [seed], recipe).records[0].teacache
    ys = recorder.values
    if len(log) != recipe.steps or len(ys) != recipe.steps:
        raise RuntimeError(f"recorded {len(log)} inputs and {len(ys)} outputs for {recipe.steps} steps")
    return [{"prompt_id": entry.id, "kind": entry.kind, "seed": seed, "step": e["step"],
             "timestep": e["timestep"], "x": e["rel_l1"], "y": y} for e, y in zip(log[1:], ys[1:])]


# ---------------------------------------------------------------------------------------------------------
# Samples on disk


@dataclass
class Samples:
    """Recorded (x, y) pairs with the prompt and kind each came from."""

    prompt_id: np.ndarray
    kind: np.ndarray
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    def select(self, keep: np.ndarray) -> Samples:
        return Samples(self.prompt_id[keep], self.kind[keep], self.x[keep], self.y[keep])

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]]) -> Samples:
        def num(v):
            return math.nan if v is None or v == "" else float(v)

        return cls(np.array([str(r["prompt_id"]) for r in rows], dtype=object),
                   np.array([str(r["kind"]) for r in rows], dtype=object),
                   np.array([num(r["x"]) for r in rows], dtype=float),
                   np.array([num(r["y"]) for r in rows], dtype=float))


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a samples file; a last line cut short by an interrupted write is dropped."""
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and set(rows[0]) != set(FIELDS):
        raise Flux2LabError(f"{path} is not a flux2lab samples file: columns {sorted(rows[0])}, "
                            f"expected {list(FIELDS)}.")
    return rows


def _write_rows(path: Path, rows: Sequence[dict[str, Any]], append: bool) -> None:
    new = not append or not path.exists() or path.stat().st_size == 0
    with path.open("a" if append else "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerows({k: ("" if r[k] is None else r[k]) for k in FIELDS} for r in rows)
        f.flush()
        os.fsync(f.fileno())


def _complete_rows(path: Path, steps: int, repair: bool = False) -> dict[str, list[dict[str, str]]]:
    """Rows per prompt id, for prompts whose `steps - 1` samples are all there. With `repair` (only for the
    file this process writes: other shards may be mid-write), a prompt an interruption left half-written is
    dropped from the file, to be recorded again."""
    by_id: dict[str, list[dict[str, str]]] = {}
    rows = read_rows(path)
    for r in rows:
        by_id.setdefault(r["prompt_id"], []).append(r)
    done = {k: v for k, v in by_id.items() if len(v) == steps - 1}
    if repair and (sum(len(v) for v in done.values()) != len(rows) or not path.read_text().endswith("\n")):
        _write_rows(path, [r for v in done.values() for r in v], append=False)
    return done


def shard_file(run_dir: Path, shard: tuple[int, int]) -> Path:
    i, n = shard
    return run_dir / ("samples.csv" if n == 1 else f"samples.shard{i}of{n}.csv")


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise Flux2LabError(f"--shard {text!r}: write it as i/n, e.g. 0/4 for the first of four shards.") from None
    if n < 1 or not 0 <= i < n:
        raise Flux2LabError(f"--shard {text!r}: need 0 <= i < n (shards are numbered from 0).")
    return i, n


# What makes samples comparable; the prompt set may grow between resumes (a prompt's samples do not
# depend on which other prompts are in the run).
_COMPARED = ("model", "steps", "height", "width", "guidance")


def _check_run(run_dir: Path, meta: dict[str, Any]) -> None:
    path = run_dir / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = [k for k in _COMPARED if old.get(k) != meta[k]]
        if changed:
            raise Flux2LabError(
                f"{run_dir} holds a calibration recorded with different settings ({', '.join(changed)}: "
                f"{[old.get(k) for k in changed]} there, {[meta[k] for k in changed]} now). Samples of different "
                "settings do not belong in one fit: use another --name, or the original settings to resume.")
        meta = {**old, **meta, "prompts": max(old.get("prompts", 0), meta["prompts"])}
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(meta, indent=2) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_metadata(pipe, model: str, entries: Sequence[PromptEntry], manifest: Path | str,
                 recipe: Recipe) -> dict[str, Any]:
    """What was recorded (run.json); `_COMPARED` fields must match when resuming or adding a shard."""
    from flux2lab.pipeline.core import resolution
    from flux2lab.pipeline.models import model_info

    height, width = resolution(pipe, recipe)
    return {"model": model, "revision": model_info(pipe).revision, "steps": recipe.steps,
            "height": height, "width": width,
            "guidance": recipe.guidance, "manifest": str(manifest), "prompts": len(entries)}


@dataclass
class RecordResult:
    recorded: int  # prompts recorded by this call
    skipped: int  # prompts of this shard already done before
    missing: list[str]  # prompt ids of the whole set still missing (all shards)


def record(pipe, entries: Sequence[PromptEntry], seeds: Sequence[int], run_dir: Path, recipe: Recipe, *,
           model: str, manifest: Path | str, shard: tuple[int, int] = (0, 1), progress: bool = False) -> RecordResult:
    """Record this shard's prompts into `run_dir`, skipping those already recorded; resumable at any point."""
    from tqdm.auto import tqdm

    if recipe.steps < 2:
        raise Flux2LabError("calibration needs --steps >= 2: samples compare consecutive steps.")
    _check_run(run_dir, run_metadata(pipe, model, entries, manifest, recipe))
    path = shard_file(run_dir, shard)
    if path.exists():
        _complete_rows(path, recipe.steps, repair=True)
    done = _done_ids(run_dir, recipe.steps)
    i, n = shard
    mine = [(e, s) for k, (e, s) in enumerate(zip(entries, seeds)) if k % n == i]
    todo = [(e, s) for e, s in mine if e.id not in done]
    for entry, seed in tqdm(todo, desc=f"calibrating (shard {i}/{n})", unit="prompt", disable=not progress):
        _write_rows(path, record_prompt(pipe, entry, seed, recipe), append=True)
    detach_recorder(pipe.transformer)
    done = _done_ids(run_dir, recipe.steps)
    return RecordResult(len(todo), len(mine) - len(todo), [e.id for e in entries if e.id not in done])


def _sample_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("samples*.csv"))


def _done_ids(run_dir: Path, steps: int) -> set[str]:
    return {pid for p in _sample_files(run_dir) for pid in _complete_rows(p, steps)}


def merge_samples(run_dir: Path, steps: int) -> Path:
    """Gather every file's complete prompts into `samples.csv` (written whole, so shards that finish at
    the same moment can both merge; the shard files stay as they are)."""
    target = run_dir / "samples.csv"
    merged: dict[str, list[dict[str, str]]] = {}
    for p in _sample_files(run_dir):
        for pid, rows in _complete_rows(p, steps).items():
            merged.setdefault(pid, rows)
    if merged:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(r for rows in merged.values() for r in rows)
        _atomic_write(target, out.getvalue())
    return target


# ---------------------------------------------------------------------------------------------------------
# Fitting and diagnostics


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
    if not isinstance(degree, int) or not 1 <= degree <= 6:
        raise Flux2LabError(f"--degree {degree!r}: use an integer from 1 to 6 (TeaCache uses 3).")
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
        "recipe": {"teacache": {"coefficients": [float(c) for c in coefficients]}},
        "_heldout_residuals": heldout_residual, "_heldout_mask": is_held,  # for the figure; not written
    }


def plot_fit(samples: Samples, fit: dict[str, Any], path: Path, title: str = "") -> Path:
    """The calibration figure: samples by kind with the fitted curve; held-out residuals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = samples.select(np.isfinite(samples.x) & np.isfinite(samples.y))
    colours = {"t2i": "tab:blue", "multi-reference": "tab:orange"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for kind in KINDS:
        k = s.kind == kind
        if k.any():
            left.scatter(s.x[k], s.y[k], s=8, alpha=0.5, color=colours[kind], label=f"{kind} ({k.sum()})")
    xs = np.linspace(*fit["x_range"], 200)
    left.plot(xs, np.polyval(fit["coefficients"], xs), color="black", lw=2,
              label=f"degree-{fit['degree']} fit, R² {_fmt(fit['r2'])}")
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
    right.set_title(f"{fit['heldout']['prompts']} held-out prompts, R² {_fmt(fit['heldout']['r2'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def fit_run(run_dir: Path, degree: int = 3, ret_steps: int = 10) -> dict[str, Any]:
    """Merge the shards and write `fit.json` and `fit.png` for a finished recording."""
    meta_path = run_dir / "run.json"
    if not meta_path.exists():
        raise Flux2LabError(f"{run_dir} holds no calibration recording (no run.json); record one first.")
    meta = json.loads(meta_path.read_text())
    samples_path = merge_samples(run_dir, meta["steps"])
    if not samples_path.exists():
        raise Flux2LabError(f"{run_dir} has no samples yet; record first.")
    samples = Samples.from_rows(read_rows(samples_path))
    fit = fit_samples(samples, degree, steps=meta["steps"], ret_steps=ret_steps)
    plot_fit(samples, fit, run_dir / "fit.png", title=f"TeaCache calibration: {run_dir.name} ({meta['model']})")
    public = {k: v for k, v in fit.items() if not k.startswith("_")}
    _atomic_write(run_dir / "fit.json", json.dumps({"run": meta, **public}, indent=2) + "\n")
    return public
