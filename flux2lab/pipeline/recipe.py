"""The recipe: one immutable description of an accelerated FLUX.2 run.

Search proposes recipes, compare runs two, the runner runs one frozen recipe and the benchmark runs a
ladder of them, so this is the only place that says what a run is and which values are allowed. JSON is
the exchange format; `schema_version` lets a later flux2lab refuse (or migrate) files it does not know:
version 1 (TeaCache as the only cache, `teacache.enabled`) is read and migrated to version 2's `cache` field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flux2lab.common.errors import Flux2LabError
from flux2lab.common.files import read_text
from flux2lab.common.values import is_int, is_number
from flux2lab.pipeline.caches import (  # noqa: F401 (the TeaCache constants are read from here too)
    CACHE_METHODS,
    FLUX2_DEV_COEFFICIENTS,
    FLUX2_DEV_RET_STEPS,
    FLUX2_DEV_THRESHOLD,
    CacheSettings,
    CacheSettingsError,
    NoCache,
    StepCacheSettings,
    TeaCacheSettings,
    cache_from_dict,
    migrate_v1_teacache,
)

SCHEMA_VERSION = 2
READ_VERSIONS = (1, 2)

PRECISIONS = ("bf16", "fp8", "nvfp4")
QUANT_BACKENDS = ("auto", "native", "emulated")
# Where weights wait while another component runs (diffusers' offloading): none (all on the card), model (one
# component on the card at a time, enable_model_cpu_offload), group (one block at a time, streamed).
OFFLOADS = ("none", "model", "group")

class RecipeError(Flux2LabError):
    """A recipe field has a value flux2lab does not accept."""


@dataclass(frozen=True)
class Recipe:
    """Everything that decides how a FLUX.2 image is produced, apart from the model, prompt and seed.

    `height`/`width` of None mean the model's native resolution (1024x1024 for FLUX.2 [dev]).
    """

    transformer_precision: str = "bf16"
    text_encoder_precision: str = "bf16"
    quant_backend: str = "auto"
    cache: CacheSettings = field(default_factory=NoCache)  # the step cache: see flux2lab.pipeline.caches
    compile: bool = False
    cuda_graphs: bool = False
    ulysses_degree: int = 1
    offload: str = "none"
    height: int | None = None
    width: int | None = None
    steps: int = 50
    guidance: float = 4.0

    def __post_init__(self) -> None:
        validate(self)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some fields changed; `cache` may be given as a dict: settings of the current method, or
        `{"method": M, ...}` to switch to M (its defaults plus what is given)."""
        if isinstance(changes.get("cache"), dict):
            try:
                changes["cache"] = cache_from_dict(changes["cache"], self.cache)
            except CacheSettingsError as e:
                raise RecipeError(str(e)) from None
        return dataclasses.replace(self, **changes)

    def model_changes(self, other: Recipe) -> list[str]:
        """Fields that change the model itself (so they need a freshly loaded pipeline to switch)."""
        return [f for f in _MODEL_FIELDS if getattr(self, f) != getattr(other, f)]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"schema_version": SCHEMA_VERSION, **d, "cache": self.cache.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe must be a JSON object, got {type(data).__name__}.")
        data = dict(data)
        # A file without a version is read as the schema its fields belong to (`teacache` was version 1's).
        version = data.pop("schema_version", 1 if "teacache" in data else SCHEMA_VERSION)
        if version not in READ_VERSIONS:
            raise RecipeError(
                f"{source}: schema_version {version!r} is not supported by this flux2lab (it reads versions "
                f"{', '.join(map(str, READ_VERSIONS))}). Upgrade flux2lab, or re-create the recipe with this version."
            )
        try:
            if version == 1 and "teacache" in data:
                data["cache"] = migrate_v1_teacache(data.pop("teacache"))
            _reject_unknown(data, {f.name for f in dataclasses.fields(cls)}, source, "")
            cache = cache_from_dict(data.get("cache", {"method": "none"}))
            return cls(**{**data, "cache": cache})
        except (RecipeError, CacheSettingsError) as e:
            raise RecipeError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "recipe") -> Recipe:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{source}: not valid JSON ({e}).") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        return cls.from_json(read_text(path, "recipe file"), source=str(path))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path


# Fields applied to the model weights/graph by `apply`; everything else is read per call.
_MODEL_FIELDS = ("transformer_precision", "text_encoder_precision", "quant_backend", "compile", "cuda_graphs",
                 "ulysses_degree", "offload")


def _reject_unknown(data: dict, allowed: set[str], source: str, prefix: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RecipeError(
            f"{source}: unknown field(s) {', '.join(prefix + u for u in unknown)}; allowed: "
            f"{', '.join(prefix + a for a in sorted(allowed))}."
        )


def validate(recipe: Recipe) -> None:
    """Raise RecipeError naming the first bad field, its value and what is allowed."""

    def bad(name: str, value: Any, allowed: str) -> RecipeError:
        return RecipeError(f"field '{name}' = {value!r} is invalid; allowed: {allowed}.")

    for name in ("transformer_precision", "text_encoder_precision"):
        if getattr(recipe, name) not in PRECISIONS:
            raise bad(name, getattr(recipe, name), " | ".join(PRECISIONS))
    if recipe.quant_backend not in QUANT_BACKENDS:
        raise bad("quant_backend", recipe.quant_backend, " | ".join(QUANT_BACKENDS))
    for name in ("compile", "cuda_graphs"):
        if not isinstance(getattr(recipe, name), bool):
            raise bad(name, getattr(recipe, name), "true | false")
    if not is_int(recipe.ulysses_degree) or recipe.ulysses_degree < 1:
        raise bad("ulysses_degree", recipe.ulysses_degree, "an integer >= 1 (the number of GPUs)")
    if recipe.offload not in OFFLOADS:
        raise bad("offload", recipe.offload, " | ".join(OFFLOADS))
    if recipe.offload != "none" and (recipe.cuda_graphs or recipe.ulysses_degree > 1):
        raise bad("offload", recipe.offload, "'none' with cuda_graphs or ulysses_degree > 1 (CUDA graphs replay "
                  "fixed weight addresses and each parallel rank holds its own copy; offloading moves the weights)")
    for name in ("height", "width"):
        v = getattr(recipe, name)
        if v is not None and (not is_int(v) or v < 16 or v % 16):
            raise bad(name, v, "null (the model's default) or a positive multiple of 16")
    if not is_int(recipe.steps) or recipe.steps < 1:
        raise bad("steps", recipe.steps, "an integer >= 1")
    if not is_number(recipe.guidance) or recipe.guidance < 0:
        raise bad("guidance", recipe.guidance, "a finite number >= 0")

    if not isinstance(recipe.cache, (NoCache, TeaCacheSettings, StepCacheSettings)):
        raise bad("cache", recipe.cache, "step cache settings (flux2lab.pipeline.caches)")
    try:
        recipe.cache.check(recipe.steps)
    except CacheSettingsError as e:
        raise RecipeError(str(e)) from None
    if isinstance(recipe.cache, StepCacheSettings):  # combinations a diffusers cache cannot run in, before model work
        from flux2lab.hooks.step_caches import step_cache_refusal

        reason = step_cache_refusal(recipe.cache.method, context_parallel=recipe.ulysses_degree > 1,
                                    cuda_graphs=recipe.cuda_graphs)
        if reason is not None:
            raise RecipeError(f"field 'cache': {reason}")
