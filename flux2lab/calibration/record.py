"""Recording a calibration run: one (x, y) sample per denoising step and MagCache's magnitude ratios, appended
prompt by prompt, resumable.

Recording runs the pipeline with TeaCache attached at threshold 0 (it measures every step exactly as it
will at inference, and never skips: the images are those of the uncached pipeline) plus the output recorder
(`flux2lab.hooks.recorder`). Each step t >= 1 of each prompt gives one sample: x = rel-L1 of the modulated
input (TeaCache's own number), y = rel-L1 of the model output, both between consecutive steps and over the
generated image's tokens (reference-image tokens left out). The same pass gives MagCache's ratio of every step
(diffusers' definition, see the recorder; 1.0 at step 0).

A run folder holds `run.json` (what was recorded), the samples (`samples.csv`, or one `samples.shard<i>of<n>.csv`
per shard, merged into `samples.csv` once every prompt is in) and the ratios (`mag_ratios.jsonl`, or one
`mag_ratios.shard<i>of<n>.jsonl` per shard: one line {"prompt_id", "seed", "ratios"} per prompt, written before
its samples), gathered into `mag_ratios.json` once every prompt is in (`write_mag_ratios`; `mag_ratios_from_fit`
reads it).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flux2lab.common.errors import Flux2LabError
from flux2lab.common.files import atomic_write_text, read_text
from flux2lab.common.values import is_number
from flux2lab.hooks.recorder import attach_recorder, detach_recorder
from flux2lab.pipeline.prompts import PromptEntry
from flux2lab.pipeline.recipe import Recipe, TeaCacheSettings

FIELDS = ("prompt_id", "kind", "seed", "step", "timestep", "x", "y")
KINDS = ("t2i", "multi-reference")
MAG_RATIOS = "mag_ratios.json"


def recording_recipe(steps: int, height: int | None = None, width: int | None = None) -> Recipe:
    """TeaCache that measures every step and never skips: threshold 0, no retained steps, identity rescale."""
    return Recipe(steps=steps, height=height, width=width, cache=TeaCacheSettings(
        coefficients=(1.0, 0.0), threshold=0.0, ret_steps=0, cutoff_steps=None))


def record_prompt(pipe, entry: PromptEntry, seed: int, recipe: Recipe) -> list[dict[str, Any]]:
    """Generate one image uncached and return its samples (one row per step after the first); each row also
    carries that step's MagCache ratio (`mag_ratio`, kept in the ratios file, not in the samples)."""
    from flux2lab.pipeline.core import generate

    recorder = attach_recorder(pipe.transformer)
    recorder.start_image()
    log = generate(pipe, [entry.prompt], [seed], recipe).records[0].teacache
    ys, ratios = recorder.values, recorder.mag_ratios
    if len(log) != recipe.steps or len(ys) != recipe.steps or len(ratios) != recipe.steps:
        raise RuntimeError(f"recorded {len(log)} inputs, {len(ys)} outputs and {len(ratios)} magnitude ratios for "
                           f"{recipe.steps} steps")
    return [{"prompt_id": entry.id, "kind": entry.kind, "seed": seed, "step": e["step"],
             "timestep": e["timestep"], "x": e["rel_l1"], "y": y, "mag_ratio": r}
            for e, y, r in zip(log[1:], ys[1:], ratios[1:])]


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


# ---------------------------------------------------------------------------------------------------------
# The run


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
    atomic_write_text(path, json.dumps(meta, indent=2) + "\n")


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
    recorded: int  # prompts recorded by this call (samples, ratios or both)
    skipped: int  # prompts of this shard already done before
    missing: list[str]  # prompt ids of the whole set still missing (all shards)


def record(pipe, entries: Sequence[PromptEntry], seeds: Sequence[int], run_dir: Path, recipe: Recipe, *,
           model: str, manifest: Path | str, shard: tuple[int, int] = (0, 1), progress: bool = False) -> RecordResult:
    """Record this shard's prompts into `run_dir`, skipping those already recorded; resumable at any point."""
    from tqdm.auto import tqdm

    if recipe.steps < 2:
        raise Flux2LabError("calibration needs --steps >= 2: samples compare consecutive steps.")
    check_resume(run_dir, entries, seeds, recipe.steps)
    _check_run(run_dir, run_metadata(pipe, model, entries, manifest, recipe))
    path = shard_file(run_dir, shard)
    if path.exists():
        _complete_rows(path, recipe.steps, repair=True)
    done = _done_ids(run_dir, recipe.steps)
    with_ratios = _recorded_ratios(run_dir, recipe.steps)
    i, n = shard
    mine = [(e, s) for k, (e, s) in enumerate(zip(entries, seeds)) if k % n == i]
    # A prompt is recorded again for what it lacks: samples, or ratios (a run from before they were recorded).
    todo = [(e, s) for e, s in mine if e.id not in done or (e.id, str(s)) not in with_ratios]
    for entry, seed in tqdm(todo, desc=f"calibrating (shard {i}/{n})", unit="prompt", disable=not progress):
        rows = record_prompt(pipe, entry, seed, recipe)
        if (entry.id, str(seed)) not in with_ratios:  # first: a prompt with its samples always has its ratios
            _append_ratios(ratios_file(run_dir, shard), entry.id, seed, [1.0] + [r["mag_ratio"] for r in rows])
        if entry.id not in done:
            _write_rows(path, rows, append=True)
    detach_recorder(pipe.transformer)
    done = _done_ids(run_dir, recipe.steps)
    missing = [e.id for e in entries if e.id not in done]
    if not missing:
        write_mag_ratios(run_dir)
    return RecordResult(len(todo), len(mine) - len(todo), missing)


def check_resume(run_dir: Path, entries: Sequence[PromptEntry], seeds: Sequence[int], steps: int) -> None:
    """Refuse to resume a run whose prompts were recorded with other seeds: their samples would stay, and the fit
    would mix seeds the user did not ask for."""
    recorded = {pid: rows[0]["seed"] for p in _sample_files(run_dir) for pid, rows in _complete_rows(p, steps).items()}
    changed = [(e.id, recorded[e.id], s) for e, s in zip(entries, seeds) if recorded.get(e.id, str(s)) != str(s)]
    if changed:
        pid, old, new = changed[0]
        raise Flux2LabError(f"{run_dir} recorded prompt {pid!r} with seed {old}, and {new} now ({len(changed)} prompt(s) "
                            "differ): resume with the original --seed (and manifest seeds), or use another --name.")


def _sample_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("samples*.csv"))


def _done_ids(run_dir: Path, steps: int) -> set[str]:
    return {pid for p in _sample_files(run_dir) for pid in _complete_rows(p, steps)}


# ---------------------------------------------------------------------------------------------------------
# MagCache's magnitude ratios on disk


def ratios_file(run_dir: Path, shard: tuple[int, int]) -> Path:
    i, n = shard
    return run_dir / ("mag_ratios.jsonl" if n == 1 else f"mag_ratios.shard{i}of{n}.jsonl")


def _recorded_ratios(run_dir: Path, steps: int) -> dict[tuple[str, str], list[float]]:
    """{(prompt id, seed): ratios} of every whole line with `steps` ratios in the run's ratio files (a last line
    an interruption cut short is left out)."""
    recorded: dict[tuple[str, str], list[float]] = {}
    for path in sorted(run_dir.glob("mag_ratios*.jsonl")):
        text = path.read_text(encoding="utf-8")
        for number, line in enumerate(text[: text.rfind("\n") + 1].splitlines(), 1):
            try:
                rec = json.loads(line)
                key, ratios = (str(rec["prompt_id"]), str(rec["seed"])), [float(r) for r in rec["ratios"]]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise Flux2LabError(f"{path}, line {number}: not a line of MagCache ratios; delete the file to record "
                                    "them again.") from None
            if len(ratios) == steps:
                recorded[key] = ratios
    return recorded


def _append_ratios(path: Path, prompt_id: str, seed: int, ratios: Sequence[float]) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if text and not text.endswith("\n"):  # a line an interruption cut short: dropped, as the samples' are
        atomic_write_text(path, text[: text.rfind("\n") + 1])
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"prompt_id": prompt_id, "seed": seed, "ratios": list(ratios)}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_mag_ratios(run_dir: Path) -> dict[str, Any] | None:
    """Gather the ratios of the run's recorded prompts (those with complete samples, at the seed of their samples)
    into `mag_ratios.json`: per prompt, and their mean and standard deviation per step. `mag_ratios` (the mean,
    step 0 first) is what `MagCacheConfig(mag_ratios=...)` takes. Returns what was written, or None when the run
    holds no ratios (recorded before flux2lab recorded them)."""
    meta = json.loads((run_dir / "run.json").read_text())
    steps = meta["steps"]
    seeds = {pid: rows[0]["seed"] for p in _sample_files(run_dir) for pid, rows in _complete_rows(p, steps).items()}
    recorded = _recorded_ratios(run_dir, steps)
    per_prompt = {pid: recorded[(pid, seed)] for pid, seed in seeds.items() if (pid, seed) in recorded}
    if not per_prompt:
        return None
    table = np.array(list(per_prompt.values()))
    summary = {
        "method": "magcache",
        "definition": "diffusers' MagCache calibration: ratio[t] = mean over tokens of |r_t| / (|r_(t-1)| + 1e-8), "
                      "r = last block's image-token output - first block's input; ratio[0] = 1",
        "steps": steps, "prompts": len(per_prompt),
        "mag_ratios": table.mean(axis=0).tolist(), "std": table.std(axis=0).tolist(),
        "per_prompt": per_prompt, "run": meta,
    }
    atomic_write_text(run_dir / MAG_RATIOS, json.dumps(summary, indent=2) + "\n")
    return summary


def mag_ratios_from_fit(path: str | Path) -> list[float]:
    """MagCache's magnitude ratios a calibration recorded (the mean over its prompts, step 0 first), for
    `MagCacheConfig(mag_ratios=...)` or a recipe's `{"method": "magcache", "mag_ratios": ...}`. `path`: the
    calibration folder, its fit.json or its mag_ratios.json. Ratios recorded at one step count serve another:
    diffusers' MagCache maps them to the pipeline's steps (nearest step), though calibrating at the step count
    you generate with is best."""
    path = Path(path)
    file = path / MAG_RATIOS if path.is_dir() else path if path.name == MAG_RATIOS else path.parent / MAG_RATIOS
    if not path.exists():
        raise Flux2LabError(f"calibration {path} does not exist; make one with python -m flux2lab.calibrate.")
    if not file.is_file():
        raise Flux2LabError(f"{file.parent} holds no MagCache ratios ({MAG_RATIOS}): its calibration was recorded "
                            "before flux2lab recorded them, or is not finished. Run python -m flux2lab.calibrate with "
                            "the same --name and settings: it records what is missing.")
    try:
        ratios = json.loads(read_text(file, "MagCache ratios file"))["mag_ratios"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise Flux2LabError(f"{file}: not a MagCache ratios file (no 'mag_ratios' list); re-run calibrate.") from None
    if not isinstance(ratios, list) or not ratios or not all(is_number(r) and r > 0 for r in ratios):
        raise Flux2LabError(f"{file}: 'mag_ratios' must be a non-empty list of positive numbers (step 0 first); "
                            "re-run calibrate.")
    return [float(r) for r in ratios]


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
        atomic_write_text(target, out.getvalue())
    return target
