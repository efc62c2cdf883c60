"""The recipe: one immutable description of an accelerated FLUX.2 run.

Search proposes recipes, compare runs two, the runner runs one frozen recipe and the benchmark runs a
ladder of them, so this is the only place that says what a run is and which values are allowed. JSON is
the exchange format; `schema_version` lets a later flux2lab refuse (or migrate) files it does not know.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flux2lab.common.errors import Flux2LabError

SCHEMA_VERSION = 1

PRECISIONS = ("bf16", "fp8", "nvfp4")
QUANT_BACKENDS = ("auto", "native", "emulated")
# Where weights wait while another component runs (diffusers' offloading): none (all on the card), model (one
# component on the card at a time, enable_model_cpu_offload), group (one block at a time, streamed).
OFFLOADS = ("none", "model", "group")

# Published TeaCache coefficients for FLUX.2 [dev] (third degree, highest first; NVIDIA's code) and the
# settings NVIDIA used with them.
FLUX2_DEV_COEFFICIENTS = (1.04582360e02, -6.87605554e00, -8.61659379e-02, 5.37600252e-02)
FLUX2_DEV_THRESHOLD = 0.05
FLUX2_DEV_RET_STEPS = 10


class RecipeError(Flux2LabError):
    """A recipe field has a value flux2lab does not accept."""


@dataclass(frozen=True)
class TeaCacheSettings:
    """TeaCache's knobs. `coefficients` rescale the input distance (numpy.poly1d order)."""

    enabled: bool = False
    coefficients: tuple[float, ...] = FLUX2_DEV_COEFFICIENTS
    threshold: float = FLUX2_DEV_THRESHOLD
    ret_steps: int = FLUX2_DEV_RET_STEPS
    cutoff_steps: int | None = None  # steps from this index on always compute; None = no cutoff


@dataclass(frozen=True)
class Recipe:
    """Everything that decides how a FLUX.2 image is produced, apart from the model, prompt and seed.

    `height`/`width` of None mean the model's native resolution (1024x1024 for FLUX.2 [dev]).
    """

    transformer_precision: str = "bf16"
    text_encoder_precision: str = "bf16"
    quant_backend: str = "auto"
    teacache: TeaCacheSettings = field(default_factory=TeaCacheSettings)
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
        """A copy with some fields changed; `teacache` may be given as a dict of its own fields."""
        tc = changes.get("teacache")
        if isinstance(tc, dict):
            changes["teacache"] = dataclasses.replace(self.teacache, **tc)
        return dataclasses.replace(self, **changes)

    def model_changes(self, other: Recipe) -> list[str]:
        """Fields that change the model itself (so they need a freshly loaded pipeline to switch)."""
        return [f for f in _MODEL_FIELDS if getattr(self, f) != getattr(other, f)]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["teacache"]["coefficients"] = list(self.teacache.coefficients)
        return {"schema_version": SCHEMA_VERSION, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe must be a JSON object, got {type(data).__name__}.")
        data = dict(data)
        version = data.pop("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise RecipeError(
                f"{source}: schema_version {version!r} is not supported by this flux2lab (it reads version "
                f"{SCHEMA_VERSION}). Upgrade flux2lab, or re-create the recipe with this version."
            )
        _reject_unknown(data, {f.name for f in dataclasses.fields(cls)}, source, "")
        tc = data.get("teacache", {})
        if not isinstance(tc, dict):
            raise RecipeError(f"{source}: field 'teacache' must be an object, got {tc!r}.")
        _reject_unknown(tc, {f.name for f in dataclasses.fields(TeaCacheSettings)}, source, "teacache.")
        if "coefficients" in tc:
            if not isinstance(tc["coefficients"], (list, tuple)):
                raise RecipeError(
                    f"{source}: field 'teacache.coefficients' must be a list of numbers (highest degree "
                    f"first), got {tc['coefficients']!r}."
                )
            tc = {**tc, "coefficients": tuple(tc["coefficients"])}
        try:
            return cls(**{**data, "teacache": TeaCacheSettings(**tc)})
        except RecipeError as e:
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
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist.")
        return cls.from_json(path.read_text(), source=str(path))

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


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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

    tc = recipe.teacache
    if not isinstance(tc, TeaCacheSettings):
        raise bad("teacache", tc, "a TeaCacheSettings object")
    if not isinstance(tc.enabled, bool):
        raise bad("teacache.enabled", tc.enabled, "true | false")
    if (not isinstance(tc.coefficients, tuple) or not tc.coefficients
            or not all(is_number(c) for c in tc.coefficients)):
        raise bad("teacache.coefficients", tc.coefficients, "a non-empty list of finite numbers, highest degree first")
    if not is_number(tc.threshold) or tc.threshold < 0:
        raise bad("teacache.threshold", tc.threshold, "a finite number >= 0")
    if not is_int(tc.ret_steps) or tc.ret_steps < 0:
        raise bad("teacache.ret_steps", tc.ret_steps, "an integer >= 0")
    if tc.cutoff_steps is not None and (not is_int(tc.cutoff_steps) or tc.cutoff_steps < tc.ret_steps):
        raise bad("teacache.cutoff_steps", tc.cutoff_steps, f"null or an integer >= ret_steps ({tc.ret_steps})")
    # Step counts are only checked against `steps` when TeaCache is on, so the published defaults
    # (ret_steps 10) do not forbid a short uncached run.
    if tc.enabled and tc.ret_steps > recipe.steps:
        raise bad("teacache.ret_steps", tc.ret_steps, f"an integer between 0 and steps ({recipe.steps})")
    if tc.enabled and tc.cutoff_steps is not None and tc.cutoff_steps > recipe.steps:
        raise bad("teacache.cutoff_steps", tc.cutoff_steps,
                  f"null or an integer between ret_steps ({tc.ret_steps}) and steps ({recipe.steps})")
