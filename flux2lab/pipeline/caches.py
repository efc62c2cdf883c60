"""The recipe's step cache: which method skips denoising work, and that method's own settings.

One field of the recipe, `cache`, holds the settings of exactly one method (JSON `{"method": ..., <settings>}`):

- `none`: every step computes.
- `teacache`: flux2lab's TeaCache (`TeaCacheSettings`; diffusers does not ship it).
- `taylorseer`, `magcache`, `first_block`, `seacache`: diffusers' own hooks (`StepCacheSettings`); their settings
  are the fields of diffusers' config classes and are checked by those classes (flux2lab.hooks.step_caches),
  so nothing of diffusers is copied here.

The TeaCache checks live here once: the recipe, the TeaCache hook's config and the search all call them.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from flux2lab.common.errors import Flux2LabError
from flux2lab.common.values import is_int, is_number

DIFFUSERS_METHODS = ("taylorseer", "magcache", "first_block", "seacache")
CACHE_METHODS = ("none", "teacache", *DIFFUSERS_METHODS)

# Published TeaCache coefficients for FLUX.2 [dev] (third degree, highest first; NVIDIA's code) and the
# settings NVIDIA used with them.
FLUX2_DEV_COEFFICIENTS = (1.04582360e02, -6.87605554e00, -8.61659379e-02, 5.37600252e-02)
FLUX2_DEV_THRESHOLD = 0.05
FLUX2_DEV_RET_STEPS = 10


class CacheSettingsError(Flux2LabError):
    """A cache setting has a value flux2lab does not accept (the recipe names it as a field of `cache`)."""


def _bad(name: str, value: Any, allowed: str, owner: str = "cache") -> CacheSettingsError:
    return CacheSettingsError(f"field '{owner}.{name}' = {value!r} is invalid; allowed: {allowed}.")


@dataclass(frozen=True)
class NoCache:
    """Every step computes."""

    method: ClassVar[str] = "none"

    def check(self, steps: int) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method}


@dataclass(frozen=True)
class TeaCacheSettings:
    """TeaCache's knobs. `coefficients` rescale the input distance (numpy.poly1d order); `residual_order` 0 reuses
    the last residual on a skipped step (NVIDIA's TeaCache), 1 follows the line through the last two, scaled by
    `residual_slope` (flux2lab.hooks.teacache.predict_residual)."""

    method: ClassVar[str] = "teacache"
    coefficients: tuple[float, ...] = FLUX2_DEV_COEFFICIENTS
    threshold: float = FLUX2_DEV_THRESHOLD
    ret_steps: int = FLUX2_DEV_RET_STEPS
    cutoff_steps: int | None = None  # steps from this index on always compute; None = no cutoff
    residual_order: int = 0
    residual_slope: float = 1.0

    def check(self, steps: int, owner: str = "cache") -> None:
        """Raise naming the first bad setting (as `owner.name`); step indices are checked against `steps`."""
        if (not isinstance(self.coefficients, tuple) or not self.coefficients
                or not all(is_number(c) for c in self.coefficients)):
            raise _bad("coefficients", self.coefficients, "a non-empty list of finite numbers, highest degree first", owner)
        if not is_number(self.threshold) or self.threshold < 0:
            raise _bad("threshold", self.threshold, "a finite number >= 0", owner)
        if not is_int(self.ret_steps) or not 0 <= self.ret_steps <= steps:
            raise _bad("ret_steps", self.ret_steps, f"an integer between 0 and steps ({steps})", owner)
        if self.cutoff_steps is not None and (not is_int(self.cutoff_steps)
                                              or not self.ret_steps <= self.cutoff_steps <= steps):
            raise _bad("cutoff_steps", self.cutoff_steps,
                       f"null or an integer between ret_steps ({self.ret_steps}) and steps ({steps})", owner)
        if not is_int(self.residual_order) or self.residual_order not in (0, 1):
            raise _bad("residual_order", self.residual_order, "0 (reuse the last residual) or 1 (extrapolate)", owner)
        if not is_number(self.residual_slope) or self.residual_slope < 0:
            raise _bad("residual_slope", self.residual_slope, "a finite number >= 0 (1 = the line, below 1 = damped)", owner)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"method": self.method, **d, "coefficients": list(self.coefficients)}


@dataclass(frozen=True)
class StepCacheSettings:
    """One of diffusers' step caches with the fields of its config class (JSON values; lists become tuples)."""

    method: str
    settings: tuple[tuple[str, Any], ...] = ()

    def __getattr__(self, name: str) -> Any:
        # Settings read as attributes (`cache.threshold`), like TeaCache's; only names the method was given. Only
        # reached when normal lookup fails, so it must not touch a missing field itself (copy/pickle ask first).
        fields_ = self.__dict__
        for key, value in fields_.get("settings", ()):
            if key == name:
                return value
        raise AttributeError(f"step cache '{fields_.get('method')}' has no setting {name!r} (not given: diffusers' "
                             "default)")

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.settings}

    def check(self, steps: int) -> None:
        """diffusers' config class judges the settings (lazy import: diffusers is heavy)."""
        from flux2lab.hooks.step_caches import cache_config

        given = self.as_dict()
        if self.method == "magcache" and given.get("mag_ratios") is None and not given.get("calibrate"):
            raise CacheSettingsError("field 'cache': magcache needs 'mag_ratios' from a calibration of this model "
                                     "(python -m flux2lab.calibrate records them; preset magcache@FIT.json).")
        try:
            cache_config(self.method, self.as_dict(), steps)
        except Flux2LabError as e:
            raise CacheSettingsError(f"field 'cache': {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.as_dict()}


CacheSettings = NoCache | TeaCacheSettings | StepCacheSettings


def _frozen_value(v: Any) -> Any:
    return tuple(_frozen_value(x) for x in v) if isinstance(v, (list, tuple)) else v


def cache_from_dict(data: Mapping[str, Any], current: CacheSettings | None = None) -> CacheSettings:
    """Settings from JSON-like `data`. Without a `method` (or with the current one) the given settings change the
    `current` method's; with another method, that method's defaults plus the given settings."""
    if not isinstance(data, Mapping):
        raise CacheSettingsError(f"field 'cache' must be an object such as {{\"method\": \"teacache\"}}, got {data!r}.")
    given = dict(data)
    method = given.pop("method", None if current is None else current.method)
    if method is None:
        method = "none"
    if method not in CACHE_METHODS:
        raise _bad("method", method, " | ".join(CACHE_METHODS))
    merge = current is not None and current.method == method
    if method == "none":
        if given:
            raise CacheSettingsError(f"field 'cache': method 'none' takes no settings, got {', '.join(sorted(given))}."
                                     " Choose a method: " + " | ".join(CACHE_METHODS[1:]) + ".")
        return NoCache()
    if method == "teacache":
        allowed = {f.name for f in fields(TeaCacheSettings)}
        unknown = sorted(set(given) - allowed)
        if unknown:
            raise CacheSettingsError(f"field 'cache': unknown teacache setting(s) {', '.join(unknown)}; allowed: "
                                     f"{', '.join(sorted(allowed))}.")
        if "coefficients" in given and not isinstance(given["coefficients"], (list, tuple)):
            raise _bad("coefficients", given["coefficients"], "a list of numbers, highest degree first")
        base = current if merge else TeaCacheSettings()
        values = {f.name: getattr(base, f.name) for f in fields(TeaCacheSettings)}
        return TeaCacheSettings(**{**values, **{k: _frozen_value(v) for k, v in given.items()}})
    old = dict(current.settings) if merge else {}
    merged = {**old, **{k: _frozen_value(v) for k, v in given.items()}}
    return StepCacheSettings(method, tuple(sorted(merged.items())))


def migrate_v1_teacache(teacache: Any) -> dict[str, Any]:
    """A schema-1 recipe's `teacache` object as a schema-2 `cache`: enabled -> method teacache with its settings,
    disabled -> none (its settings did nothing)."""
    if not isinstance(teacache, Mapping):
        raise CacheSettingsError(f"field 'teacache' must be an object, got {teacache!r}.")
    settings = dict(teacache)
    enabled = settings.pop("enabled", False)
    if not isinstance(enabled, bool):
        raise CacheSettingsError(f"field 'teacache.enabled' = {enabled!r} is invalid; allowed: true | false.")
    # Version 1 checked a disabled TeaCache's settings too (not against the step count): a file it refused stays
    # refused, with the field named as that file names it.
    unknown = sorted(set(settings) - {f.name for f in fields(TeaCacheSettings)})
    if unknown:
        raise CacheSettingsError(f"unknown field(s) {', '.join('teacache.' + u for u in unknown)}.")
    cache_from_dict({"method": "teacache", **settings}).check(sys.maxsize, owner="teacache")
    return {"method": "teacache", **settings} if enabled else {"method": "none"}
