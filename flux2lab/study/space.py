"""A study's search space: the candidate values per TeaCache parameter, where they come from (defaults, a grid
file, command-line lists) and their checks, and the recipe a grid point stands for."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from flux2lab.common.errors import Flux2LabError
from flux2lab.common.values import is_int, is_number
from flux2lab.pipeline.recipe import PRECISIONS, Recipe, RecipeError

PARAMS = ("threshold", "ret_steps", "cutoff_steps", "transformer_precision")


@dataclass(frozen=True)
class SearchSpace:
    """Candidate values per parameter (grid points are their product; TPE searches between min and max)."""

    values: Mapping[str, tuple]

    @property
    def size(self) -> int:
        return math.prod(len(v) for v in self.values.values())

    def points(self) -> list[dict[str, Any]]:
        names = list(self.values)
        return [dict(zip(names, combo)) for combo in itertools.product(*self.values.values())]

    def to_dict(self) -> dict[str, list]:
        return {k: list(v) for k, v in self.values.items()}

    def suggest(self, trial: optuna.Trial, sampler: str) -> dict[str, Any]:
        """Ask the trial for every parameter: the listed values for the grid, their range for TPE."""
        params = {}
        for name, values in self.values.items():
            numeric = all(isinstance(v, (int, float)) for v in values) and len(set(values)) > 1
            if sampler == "grid" or not numeric:
                params[name] = trial.suggest_categorical(name, list(values))
            elif name == "threshold":
                params[name] = trial.suggest_float(name, min(values), max(values))
            else:
                params[name] = trial.suggest_int(name, min(values), max(values))
        return params


def recipe_for(base: Recipe, params: Mapping[str, Any]) -> Recipe:
    """The base recipe with TeaCache on and the trial's parameters set."""
    teacache = {k: params[k] for k in ("threshold", "ret_steps", "cutoff_steps") if k in params}
    changes: dict[str, Any] = {"teacache": {"enabled": True, **teacache}}
    if "transformer_precision" in params:
        changes["transformer_precision"] = params["transformer_precision"]
    return base.replace(**changes)


def default_space(steps: int) -> dict[str, list]:
    """Thresholds around NVIDIA's 0.05, and ret_steps of 0, 10% and 20% of the steps (NVIDIA: 10 of 50)."""
    return {"threshold": [0.02, 0.05, 0.1, 0.2], "ret_steps": sorted({0, steps // 10, steps // 5})}


def _parse_list(text: str, flag: str) -> list[Any]:
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in items):
        raise Flux2LabError(f"{flag} {text!r}: give comma-separated values, e.g. {flag} 0.05,0.1.")
    out: list[Any] = []
    for s in items:
        if s.lower() in ("none", "null"):
            out.append(None)
            continue
        try:
            out.append(json.loads(s))
        except json.JSONDecodeError:
            out.append(s)  # a precision name
    return out


def read_grid_file(path: str | Path) -> dict[str, list]:
    """A YAML or JSON mapping {parameter: [values]}."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise Flux2LabError(f"grid file {path} does not exist.")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise Flux2LabError(
            f"grid file {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({e})."
        ) from None
    if not isinstance(data, dict):
        raise Flux2LabError(f"grid file {path}: expected a mapping like {{threshold: [0.05, 0.1], ret_steps: [0, 5]}}.")
    return data


def build_space(base: Recipe, grid: Mapping[str, Any] | None = None, grid_source: str = "grid",
                flags: Mapping[str, str | None] | None = None) -> SearchSpace:
    """Merge a grid file's values with command-line lists (which win per parameter) and check them all.

    `flags` maps a parameter to its comma-separated text and the flag's name is derived from the parameter.
    Without any values for threshold and ret_steps, `default_space(base.steps)` supplies them.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, vals in (grid or {}).items():
        if name not in PARAMS:
            raise Flux2LabError(f"{grid_source}: unknown parameter {name!r}; allowed: {', '.join(PARAMS)}.")
        values[name], sources[name] = vals, f"{grid_source}, {name}"
    for name, text in (flags or {}).items():
        if text is not None:
            flag = FLAG_OF[name]
            values[name], sources[name] = _parse_list(text, flag), flag
    for name, vals in default_space(base.steps).items():
        if name not in values:
            values[name], sources[name] = vals, f"default {name}"
    ordered = {name: values[name] for name in PARAMS if name in values}
    space = SearchSpace({k: tuple(v) if isinstance(v, list) else v for k, v in ordered.items()})
    validate_space(space, base, sources)
    return space


FLAG_OF = {"threshold": "--threshold", "ret_steps": "--ret-steps", "cutoff_steps": "--cutoff-steps",
           "transformer_precision": "--precision"}


def validate_space(space: SearchSpace, base: Recipe, sources: Mapping[str, str] | None = None) -> None:
    """Every value in range and every grid point a valid recipe; errors name the flag or file and the value."""
    sources = sources or {}
    steps = base.steps
    for name, vals in space.values.items():
        where = sources.get(name, name)
        if not isinstance(vals, tuple) or not vals:
            raise Flux2LabError(f"{where}: give a non-empty list of values, got {vals!r}.")
        repeated = sorted({repr(v) for v in vals if list(vals).count(v) > 1})
        if repeated:
            raise Flux2LabError(f"{where}: value(s) {', '.join(repeated)} listed more than once.")
        for v in vals:
            if name == "threshold" and not (is_number(v) and v >= 0):
                raise Flux2LabError(f"{where}: threshold {v!r} is invalid; TeaCache thresholds are numbers >= 0.")
            if name == "ret_steps" and not (is_int(v) and 0 <= v <= steps):
                raise Flux2LabError(f"{where}: ret_steps {v!r} is invalid; give integers from 0 to the step count "
                                    f"({steps} steps; see --steps).")
            if name == "cutoff_steps" and v is not None and not (is_int(v) and 0 <= v <= steps):
                raise Flux2LabError(f"{where}: cutoff_steps {v!r} is invalid; give none or integers from 0 to the "
                                    f"step count ({steps} steps; see --steps).")
            if name == "transformer_precision" and v not in PRECISIONS:
                raise Flux2LabError(f"{where}: precision {v!r} is unknown; allowed: {', '.join(PRECISIONS)}.")
    for point in space.points():
        try:
            recipe_for(base, point)
        except RecipeError as e:
            raise Flux2LabError(f"grid point {point} is not a valid recipe: {e}") from None
