"""The step cache the ladder's `+cache` rung times (`bench --cache`): a frozen config, a recipe file or a preset.

A frozen point brings what it was measured with: its method and settings, and, where its provenance records it,
the fraction of the block stack it computed on the model it was frozen for. On random weights a threshold method's
own decisions mean nothing, so that fraction is what the rung replays (flux2lab.benchmark.skips).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flux2lab.common.errors import Flux2LabError
from flux2lab.common.values import is_number
from flux2lab.pipeline.recipe import CacheSettings, NoCache


@dataclass(frozen=True)
class CachePoint:
    """A step cache to time, and what was recorded about it where it was chosen."""

    cache: CacheSettings
    source: str  # where it came from, as the output names it
    recorded_fraction: float | None = None  # fraction of the block stack it computed on `recorded_on`
    recorded_on: str | None = None  # the model that fraction was measured on
    frozen_steps: int | None = None  # the step count it was chosen at

    def describe(self) -> str:
        settings = {k: v for k, v in self.cache.to_dict().items() if k != "method"}
        shown = ", ".join(f"{k}={_short(v)}" for k, v in sorted(settings.items()))
        return f"{self.cache.method}" + (f" ({shown})" if shown else "") + f" from {self.source}"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "method": self.cache.method, "settings": self.cache.to_dict(),
                "recorded_fraction": self.recorded_fraction, "recorded_on": self.recorded_on,
                "frozen_steps": self.frozen_steps}


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) > 4:
        return f"[{len(value)} values]"
    return str(value)


def _frozen_format(path: Path) -> bool:
    from flux2lab.pipeline.frozen import FORMAT

    if path.suffix != ".json" or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False  # the recipe loader says what is wrong with it
    return isinstance(data, dict) and data.get("format") == FORMAT


def load_cache_point(spec: str) -> CachePoint:
    """`spec`: a frozen config (its cache and recorded computed fraction), a recipe JSON file, or presets such as
    `taylorseer=3` or `magcache@FIT.json` (flux2lab.pipeline.presets). Only the recipe's cache is used."""
    from flux2lab.pipeline.presets import resolve_recipe

    path = Path(spec)
    if _frozen_format(path):
        from flux2lab.pipeline.frozen import load_frozen

        frozen = load_frozen(path)
        metrics = (frozen.provenance or {}).get("metrics") or {}
        fraction = metrics.get("computed_fraction")
        point = CachePoint(frozen.recipe.cache, f"frozen config {path} ({frozen.short_hash})",
                           float(fraction) if is_number(fraction) and 0 <= fraction <= 1 else None,
                           frozen.model.source, frozen.recipe.steps)
    else:
        recipe = resolve_recipe(spec)
        point = CachePoint(recipe.cache, f"recipe {spec}" if spec.endswith(".json") else f"preset '{spec}'")
    if isinstance(point.cache, NoCache):
        raise Flux2LabError(f"--cache {spec}: it has no step cache (method 'none'); give a frozen config, recipe or "
                            "preset with one (e.g. teacache, taylorseer=3, magcache@FIT.json).")
    return point
