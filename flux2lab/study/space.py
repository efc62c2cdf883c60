"""A study's search space: the step-cache methods it tries, each with its own candidate settings, and optionally
the transformer precision; where the values come from (defaults scaled by the step count, a grid file,
command-line lists), the points they make, and the recipe a point stands for.

A point is one flat mapping `{"method": M, <M's settings>, "transformer_precision": P}` (the precision only when
it is searched). Values are judged by the recipe's own validation (`Recipe.replace(cache=...)`), never here.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import optuna

from flux2lab.common.errors import Flux2LabError
from flux2lab.common.files import read_text
from flux2lab.common.values import is_int, is_number
from flux2lab.pipeline.caches import CACHE_METHODS, DIFFUSERS_METHODS, TeaCacheSettings
from flux2lab.pipeline.recipe import Recipe, RecipeError

METHOD = "method"
PRECISION = "transformer_precision"
GRID_PARAM = "point"  # the grid sampler's one parameter: the index of a point in SearchSpace.points()
SEARCHED_METHODS = tuple(m for m in CACHE_METHODS if m != "none")
# A flat grid file's keys and these flags set TeaCache's values (all they meant before the search knew other
# methods).
TEACACHE_FLAGS = {"threshold": "--threshold", "ret_steps": "--ret-steps", "cutoff_steps": "--cutoff-steps"}
# Settings a study takes from its calibration, never from the space.
CALIBRATED = {"teacache": ("coefficients",), "magcache": ("mag_ratios", "calibrate")}


def default_space(steps: int) -> dict[str, dict[str, list]]:
    """Each method's candidate settings for a `steps`-step study, around what measured well on mini (30 steps; the
    fraction of the block stack computed / PSNR against uncached): TeaCache thresholds around NVIDIA's 0.05 with
    ret_steps of 0, 10% and 20% of the steps, with and without the residual extrapolation (order 1 at slope 0.75:
    .397/51.7 against .397/39.5 at threshold 0.05); TaylorSeer predicting whole blocks (lite mode, interval 3:
    .400/51.4); MagCache .600/46.7 at 0.06; FirstBlockCache .551/43.1 at 0.1; SeaCache .367/52.9 at 0.5."""
    return {
        "teacache": {"threshold": [0.02, 0.05, 0.1, 0.2], "ret_steps": sorted({0, steps // 10, steps // 5}),
                     "residual_order": [0, 1], "residual_slope": [0.75]},
        "taylorseer": {"cache_interval": [2, 3, 4, 5], "use_lite_mode": [True]},
        "magcache": {"threshold": [0.03, 0.06, 0.12, 0.24]},
        "first_block": {"threshold": [0.05, 0.1, 0.2]},
        "seacache": {"threshold": [0.25, 0.5, 1.0], "max_consecutive_cached": [2, 4]},
    }


def method_settings(method: str) -> list[str]:
    """The settings of `method` a space may search (its recipe settings, less those a calibration supplies)."""
    if method == "teacache":
        names = [f.name for f in fields(TeaCacheSettings)]
    else:
        from flux2lab.hooks.step_caches import settings_allowed

        names = settings_allowed(method)
    return [n for n in names if n not in CALIBRATED.get(method, ())]


def _applies(method: str, name: str, point: Mapping[str, Any]) -> bool:
    """Whether setting `name` shapes a point that has the settings in `point` so far: TeaCache's residual_slope
    scales the order-1 extrapolation alone, so an order-0 point has no slope (and the grid holds it once)."""
    return not (method == "teacache" and name == "residual_slope" and not point.get("residual_order"))


def _format(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else json.dumps(v) if v is None or isinstance(v, bool) else str(v)


def settings_text(point: Mapping[str, Any]) -> str:
    """A point's settings (and precision) as `name=value` words, e.g. `threshold=0.05 ret_steps=3`."""
    return " ".join(f"{k}={_format(v)}" for k, v in point.items() if k != METHOD)


def describe_point(point: Mapping[str, Any] | None) -> str:
    """A point in one line: its method, then its settings."""
    return "(no point)" if point is None else f"{point[METHOD]} {settings_text(point)}".strip()


@dataclass(frozen=True)
class SearchSpace:
    """Candidate values per setting of each method, and the transformer precisions searched (none: the base
    recipe's). Grid points are the union of each method's own grid (the product of its values), times the
    precisions; TPE picks a method, then its settings between each setting's listed extremes."""

    methods: Mapping[str, Mapping[str, tuple]]
    precisions: tuple[str, ...] = ()

    def method_points(self, method: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        values = self.methods[method]
        for combo in itertools.product(*values.values()):
            point: dict[str, Any] = {METHOD: method}
            for name, value in zip(values, combo):
                if _applies(method, name, point):
                    point[name] = value
            if point not in out:
                out.append(point)
        return out

    @cached_property
    def _points(self) -> tuple[dict[str, Any], ...]:
        return tuple({**p, **({PRECISION: q} if q is not None else {})}
                     for m in self.methods for p in self.method_points(m) for q in (self.precisions or (None,)))

    def points(self) -> list[dict[str, Any]]:
        return [dict(p) for p in self._points]

    @property
    def size(self) -> int:
        return len(self._points)

    def grid(self) -> dict[str, list[int]]:
        """GridSampler's search space: one categorical, the index of a point (see `suggest`)."""
        return {GRID_PARAM: list(range(self.size))}

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"methods": {m: {k: list(v) for k, v in s.items()} for m, s in self.methods.items()}}
        if self.precisions:
            d[PRECISION] = list(self.precisions)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        return cls({m: {k: tuple(v) for k, v in s.items()} for m, s in data["methods"].items()},
                   tuple(data.get(PRECISION, ())))

    def suggest(self, trial: optuna.Trial, sampler: str) -> dict[str, Any]:
        """The trial's point. TPE asks define-by-run: the method, then that method's settings under names
        `METHOD.SETTING` (so each method's settings are their own parameters), then the precision."""
        if sampler == "grid":
            # Optuna's GridSampler cannot grid a conditional space (each trial must suggest every parameter of
            # one fixed grid), so it grids one categorical, the index of a point in `points()` (the union of
            # each method's own grid). Its machinery stays as it is: grid ids, interrupted points retried, no
            # point run twice. The objective records the decoded point (method and settings) in the trial's
            # user attributes.
            return self.points()[trial.suggest_categorical(GRID_PARAM, list(range(self.size)))]
        method = trial.suggest_categorical(METHOD, list(self.methods))
        point: dict[str, Any] = {METHOD: method}
        for name, values in self.methods[method].items():
            if _applies(method, name, point):
                point[name] = _suggest(trial, f"{method}.{name}", values)
        if self.precisions:
            point[PRECISION] = trial.suggest_categorical(PRECISION, list(self.precisions))
        return point

    def decode(self, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """The point a trial's parameters stand for (None: the trial never got one)."""
        if GRID_PARAM in params:
            return self.points()[params[GRID_PARAM]]
        if METHOD not in params:
            return None
        prefix = f"{params[METHOD]}."
        point = {METHOD: params[METHOD], **{k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}}
        return {**point, **({PRECISION: params[PRECISION]} if PRECISION in params else {})}


def _suggest(trial: optuna.Trial, name: str, values: tuple) -> Any:
    """TPE searches a number's range between the listed extremes (integers as integers, thresholds as floats),
    anything else among the listed values."""
    if not (all(is_number(v) for v in values) and len(set(values)) > 1):
        return trial.suggest_categorical(name, list(values))
    if all(is_int(v) for v in values) and not name.endswith("threshold"):
        return trial.suggest_int(name, min(values), max(values))
    return trial.suggest_float(name, min(values), max(values))


def recipe_for(base: Recipe, point: Mapping[str, Any], calibration: Mapping[str, Any] | None = None) -> Recipe:
    """The base recipe with the point's cache method and settings (and precision, where searched). A TeaCache
    point takes the `calibration` record's coefficients (the published ones without), a MagCache point its
    magnitude ratios."""
    method = point[METHOD]
    calibrated = {k: calibration[k] for k in CALIBRATED.get(method, ()) if calibration and k in calibration}
    settings = {k: v for k, v in point.items() if k not in (METHOD, PRECISION)}
    changes: dict[str, Any] = {"cache": {"method": method, **calibrated, **settings}}
    if PRECISION in point:
        changes[PRECISION] = point[PRECISION]
    return base.replace(**changes)


# --------------------------------------------------------------------------------------- building a space


def method_refusal(method: str, base: Recipe, calibration: Mapping[str, Any] | None) -> str | None:
    """Why `method` cannot run in a study on `base` (None: it can), known before any model work: MagCache needs
    calibrated ratios; diffusers' methods are refused where the set-up forbids them (`step_cache_refusal`; the
    pipeline compiles blocks with fullgraph=False under those caches, so compiling is no reason)."""
    if method == "magcache" and not (calibration or {}).get("mag_ratios"):
        return ("magcache needs MagCache's magnitude ratios from a calibration of this model: give --calibration "
                "FIT.json from python -m flux2lab.calibrate (it records them)")
    if method in DIFFUSERS_METHODS:
        from flux2lab.hooks.step_caches import step_cache_refusal

        return step_cache_refusal(method, context_parallel=base.ulysses_degree > 1, cuda_graphs=base.cuda_graphs)
    return None


def choose_methods(methods: str | Sequence[str] | None, base: Recipe,
                   calibration: Mapping[str, Any] | None) -> list[str]:
    """The methods a study searches: those listed (`--methods a,b`), each refused with its reason where it cannot
    run; none listed, every method that can run (MagCache only with calibrated ratios)."""
    if methods is None:
        return [m for m in SEARCHED_METHODS if method_refusal(m, base, calibration) is None]
    names = [s.strip() for s in methods.split(",")] if isinstance(methods, str) else list(methods)
    if not names or any(not n for n in names):
        raise Flux2LabError(f"--methods {methods!r}: give comma-separated methods, e.g. --methods teacache,taylorseer.")
    for name in names:
        if name == "none":
            raise Flux2LabError("--methods none: the uncached run is not a point of the search; every trial is scored "
                                f"against it anyway. Choose from {', '.join(SEARCHED_METHODS)}.")
        if name not in SEARCHED_METHODS:
            raise Flux2LabError(f"--methods: unknown method {name!r}; choose from {', '.join(SEARCHED_METHODS)}.")
        if names.count(name) > 1:
            raise Flux2LabError(f"--methods: {name} is listed more than once.")
        reason = method_refusal(name, base, calibration)
        if reason is not None:
            raise Flux2LabError(f"--methods {name}: {reason}.")
    return names


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


def read_grid_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping {method: {setting: [values]}} (flat keys threshold, ret_steps, cutoff_steps are
    TeaCache's; transformer_precision: [values] searches the precision)."""
    import yaml

    path = Path(path)
    text = read_text(path, "grid file")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise Flux2LabError(
            f"grid file {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({e})."
        ) from None
    if not isinstance(data, dict):
        raise Flux2LabError(f"grid file {path}: expected a mapping like {{teacache: {{threshold: [0.05, 0.1]}}, "
                            "taylorseer: {cache_interval: [2, 3]}}.")
    return data


class _Values:
    """Candidate lists being gathered per method and setting, each with where it came from (for messages)."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {}
        self.sources: dict[tuple[str, str], str] = {}

    def set(self, method: str, name: str, values: Any, source: str, replace: bool = True) -> None:
        if name in CALIBRATED.get(method, ()):
            raise Flux2LabError(f"{source}: {method}'s {name} come from the calibration (--calibration FIT.json), "
                                "not from the search space.")
        if name not in method_settings(method):
            raise Flux2LabError(f"{source}: {method} has no setting {name!r}; it takes: "
                                f"{', '.join(method_settings(method))}.")
        if not replace and name in self.values.get(method, {}):
            raise Flux2LabError(f"{source}: {method} {name} is given twice ({self.sources[method, name]}).")
        self.values.setdefault(method, {})[name] = values
        self.sources[method, name] = source


def _from_grid(grid: Mapping[str, Any], source: str, given: _Values) -> list | None:
    """Read a grid file's mapping into `given`; returns its precisions (None: not given)."""
    precisions = None
    for key, vals in grid.items():
        if key in TEACACHE_FLAGS:
            given.set("teacache", key, vals, f"{source}, {key}", replace=False)
        elif key == PRECISION:
            precisions = vals
        elif key in SEARCHED_METHODS:
            if not isinstance(vals, Mapping):
                raise Flux2LabError(f"{source}, {key}: give a mapping of settings to lists, e.g. {key}: "
                                    f"{{{method_settings(key)[0]}: [...]}}.")
            for name, v in vals.items():
                given.set(key, name, v, f"{source}, {key}.{name}", replace=False)
        else:
            raise Flux2LabError(f"{source}: unknown parameter {key!r}; allowed: {', '.join(SEARCHED_METHODS)}, "
                                f"{PRECISION}, and TeaCache's {', '.join(TEACACHE_FLAGS)}.")
    return precisions


def _from_overrides(overrides: Sequence[str], given: _Values) -> None:
    """`--space METHOD.SETTING=V1,V2` items into `given` (they win over a grid file)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        method, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise Flux2LabError(f"--space {item!r}: write METHOD.SETTING=V1,V2, e.g. --space taylorseer.cache_interval=2,3.")
        if method not in SEARCHED_METHODS:
            raise Flux2LabError(f"--space {item!r}: unknown method {method!r}; choose from {', '.join(SEARCHED_METHODS)}.")
        given.set(method, name, _parse_list(text, f"--space {key}="), f"--space {key}")


def build_space(base: Recipe, grid: Mapping[str, Any] | None = None, grid_source: str = "grid",
                flags: Mapping[str, str | None] | None = None, *, methods: str | Sequence[str] | None = None,
                overrides: Sequence[str] = (), calibration: Mapping[str, Any] | None = None) -> SearchSpace:
    """The space of a study on `base`: the `methods` (see `choose_methods`), each with its values from, by rising
    precedence, `default_space(base.steps)`, the `grid` file's mapping, the comma-separated `flags` (TeaCache's
    threshold, ret_steps, cutoff_steps; transformer_precision) and the `--space` `overrides`. Every point must be
    a valid recipe (`recipe_for` with the `calibration` record); errors name the file or flag and the value."""
    chosen = choose_methods(methods, base, calibration)
    given = _Values()
    precisions, precision_source = None, None
    if grid:
        precisions = _from_grid(grid, grid_source, given)
        precision_source = f"{grid_source}, {PRECISION}"
    for name, text in (flags or {}).items():
        if text is None:
            continue
        if name == PRECISION:
            precisions, precision_source = _parse_list(text, "--precision"), "--precision"
        else:
            given.set("teacache", name, _parse_list(text, TEACACHE_FLAGS[name]), TEACACHE_FLAGS[name])
    _from_overrides(overrides, given)
    for method in given.values:
        if method not in chosen:
            source = next(s for (m, _), s in given.sources.items() if m == method)
            reason = method_refusal(method, base, calibration)
            raise Flux2LabError(f"{source}: values for {method}, " + (
                f"which cannot run here: {reason}." if reason else
                f"which this study does not search (--methods {','.join(chosen)}); add it to --methods."))
    defaults = default_space(base.steps)
    space: dict[str, dict[str, tuple]] = {}
    for method in chosen:
        values = {**defaults[method], **given.values.get(method, {})}  # in the defaults' order, then the rest
        space[method] = {n: _checked(v, given.sources.get((method, n), f"default {method}.{n}"))
                         for n, v in values.items()}
    checked = SearchSpace(space, _checked(precisions, precision_source) if precisions is not None else ())
    _check_points(checked, base, calibration, given.sources, precision_source)
    return checked


def _checked(vals: Any, where: str) -> tuple:
    if not isinstance(vals, (list, tuple)) or not vals:
        raise Flux2LabError(f"{where}: give a non-empty list of values, got {vals!r}.")
    repeated = sorted({repr(v) for v in vals if list(vals).count(v) > 1})
    if repeated:
        raise Flux2LabError(f"{where}: value(s) {', '.join(repeated)} listed more than once.")
    return tuple(vals)


def _check_points(space: SearchSpace, base: Recipe, calibration: Mapping[str, Any] | None,
                  sources: Mapping[tuple[str, str], str], precision_source: str | None) -> None:
    """Every point a valid recipe, judged by the recipe's own validation; the error names where the value that
    the recipe refuses came from (all of the method's sources when its message names no one setting)."""
    for point in space.points():
        try:
            recipe_for(base, point, calibration)
        except RecipeError as e:
            method = point[METHOD]
            named = [s for (m, n), s in sources.items() if m == method and f"'cache.{n}'" in str(e)]
            if precision_source and f"'{PRECISION}'" in str(e):
                named = [precision_source]
            where = ", ".join(named or [s for (m, _), s in sources.items() if m == method] or [f"default {method}"])
            raise Flux2LabError(f"{where}: grid point {describe_point(point)} is not a valid recipe: {e}") from None
