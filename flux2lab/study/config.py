"""What a study is: its model, prompts and seeds, base recipe, calibration, search space (step-cache methods and
their settings), sampler and objectives, stored in the study itself so every worker and a later freeze read the
same definition."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from flux2lab.common.errors import Flux2LabError
from flux2lab.common.values import is_int
from flux2lab.pipeline.recipe import Recipe
from flux2lab.study.space import SearchSpace, build_space, read_grid_file, recipe_for

if TYPE_CHECKING:
    from flux2lab.pipeline.prompts import PromptEntry

CONFIG_VERSION = 2  # 1: TeaCache alone (threshold, ret_steps, ... as the grid's own parameters)
QUALITY_METRICS = {"lpips": "minimize", "psnr": "maximize", "ssim": "maximize"}  # usable as objective/budget
# Speed objectives: the trial attribute and its direction. "computed" is the fraction of the transformer's block
# stack that really ran (steadier than time where timings are noisy, e.g. a busy CPU).
SPEED_METRICS = {"time": ("time_per_image", "minimize"), "computed": ("computed_fraction", "minimize")}


@dataclass(frozen=True)
class StudyConfig:
    """What a study is; stored in the study so every worker and a later --freeze see the same thing."""

    model: str
    prompts: tuple[dict, ...]  # {"id", "text", "images", "seed"}
    base_recipe: dict  # Recipe.to_dict(), cache none: each trial sets its point's method and settings
    space: dict  # SearchSpace.to_dict()
    sampler: str = "grid"  # grid | tpe
    n_trials: int | None = None  # TPE only
    sampler_seed: int = 0
    quality_metric: str = "ssim"
    speed_metric: str = "time"
    # frozen.calibration_record of the fit: TeaCache's coefficients, MagCache's ratios where the fit has them.
    # None: the published FLUX.2 [dev] coefficients, and no MagCache.
    calibration: dict | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.sampler not in ("grid", "tpe"):
            raise Flux2LabError(f"sampler {self.sampler!r} is unknown; use grid or tpe.")
        if self.sampler == "tpe" and not (is_int(self.n_trials) and self.n_trials > 0):
            raise Flux2LabError("the TPE sampler needs --n-trials N (N >= 1).")
        if self.quality_metric not in QUALITY_METRICS:
            raise Flux2LabError(f"quality metric {self.quality_metric!r} is unknown; use {', '.join(QUALITY_METRICS)}.")
        if self.speed_metric not in SPEED_METRICS:
            raise Flux2LabError(f"speed metric {self.speed_metric!r} is unknown; use {', '.join(SPEED_METRICS)}.")

    @property
    def base(self) -> Recipe:
        return Recipe.from_dict(self.base_recipe, source="study base recipe")

    @cached_property
    def search_space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.space)

    def recipe_for(self, point: Mapping[str, Any]) -> Recipe:
        """The recipe of a point of this study's space, with the study's calibration."""
        return recipe_for(self.base, point, self.calibration)

    def trial_point(self, trial: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
        """The point (method and settings) a trial ran, decoded from its parameters."""
        return self.search_space.decode(trial.params)

    @property
    def directions(self) -> list[str]:
        return [SPEED_METRICS[self.speed_metric][1], QUALITY_METRICS[self.quality_metric]]

    @property
    def total(self) -> int:
        """Grid points, or the TPE trial budget."""
        return self.search_space.size if self.sampler == "grid" else int(self.n_trials)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # plain JSON types, as the storage returns them

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudyConfig:
        if data.get("version") == 1:
            raise Flux2LabError("this study was made by an older flux2lab that searched TeaCache alone (study "
                                "configuration version 1); this one searches every step cache and cannot resume, "
                                "show or freeze it. Start a new study under another --study name.")
        if data.get("version") != CONFIG_VERSION:
            raise Flux2LabError(f"study configuration version {data.get('version')!r} is not supported by this "
                                f"flux2lab (it reads {CONFIG_VERSION}).")
        return cls(**{**data, "prompts": tuple(data["prompts"])})

    def make_sampler(self, seed: int | None = None) -> optuna.samplers.BaseSampler:
        """GridSampler with the study's seed (every worker must see the same grid order); TPE seeded per worker."""
        if self.sampler == "grid":
            return optuna.samplers.GridSampler(self.search_space.grid(), seed=self.sampler_seed)
        return optuna.samplers.TPESampler(seed=self.sampler_seed if seed is None else seed)


def prompt_records(entries: Sequence[PromptEntry], seeds: Sequence[int]) -> tuple[dict[str, Any], ...]:
    """Prompts and seeds as a study's configuration stores them (JSON, so every worker reads the same set)."""
    return tuple({"id": e.id, "text": e.prompt.text, "images": list(e.prompt.images), "seed": s}
                 for e, s in zip(entries, seeds))


def make_config(*, model: str, prompts: Path | None, weights: Mapping[str, Any], seed: int | None = None,
                recipe: Path | None = None, overrides: Mapping[str, Any] | None = None,
                calibration: Path | None = None, grid: Path | None = None,
                flags: Mapping[str, str | None] | None = None, methods: str | Sequence[str] | None = None,
                space_overrides: Sequence[str] = (), sampler: str | None = None,
                n_trials: int | None = None, sampler_seed: int | None = None, quality_metric: str | None = None,
                speed_metric: str | None = None) -> StudyConfig:
    """A new study's configuration from the search command's options (None: the default).

    The base recipe is `recipe` (plain BF16 without) with `overrides` (steps, height, width) and no cache; the
    `calibration` fit's TeaCache coefficients and MagCache ratios are recorded for the trials (`recipe_for`). The
    space holds the `methods` (default: every one that can run), their values merged from the defaults, `grid`,
    the comma-separated `flags` and the `space_overrides` (see `build_space`). Quality metric "auto": LPIPS where
    `weights` has it.
    """
    from flux2lab.pipeline.frozen import calibration_record
    from flux2lab.pipeline.presets import coefficients_from_fit
    from flux2lab.pipeline.prompts import load_prompts, seeds_for

    if prompts is None:
        raise Flux2LabError("give --prompts FILE: the prompts each trial generates (and the reference is made of).")
    if model == "full-random":
        raise Flux2LabError("model 'full-random' has no VAE (it returns latents), so quality against the reference "
                            "cannot be measured; search on the real model (or tiny to try the tool).")
    entries = load_prompts(prompts)
    seeds = seeds_for(entries, seed or 0)
    base = Recipe.load(recipe) if recipe else Recipe()
    base = (base.replace(**overrides) if overrides else base).replace(cache={"method": "none"})
    if speed_metric == "computed" and base.cuda_graphs:
        raise Flux2LabError("--speed-metric computed counts the blocks that run, which CUDA graphs replay unseen; "
                            "use --speed-metric time, or a base recipe without cuda_graphs.")
    record = None
    if calibration is not None:
        record = calibration_record(calibration, coefficients_from_fit(calibration),
                                    mag_ratios=_mag_ratios(calibration))
    space = build_space(base, read_grid_file(grid) if grid else None, str(grid), flags=flags, methods=methods,
                        overrides=space_overrides, calibration=record)
    quality = quality_metric or "auto"
    if quality == "auto":
        quality = "lpips" if "lpips" in weights else "ssim"
    return StudyConfig(
        model=model, base_recipe=base.to_dict(), space=space.to_dict(), calibration=record,
        prompts=prompt_records(entries, seeds),
        sampler=sampler or "grid", n_trials=n_trials, sampler_seed=sampler_seed or 0,
        quality_metric=quality, speed_metric=speed_metric or "time",
    )


def _mag_ratios(fit: Path) -> list[float] | None:
    """MagCache's magnitude ratios recorded beside a calibration fit; None where there are none (a calibration made
    before calibrate recorded them): MagCache is then not searched. Ratios there that cannot be read are an error."""
    from flux2lab.calibration import MAG_RATIOS, mag_ratios_from_fit

    return mag_ratios_from_fit(fit) if (Path(fit).parent / MAG_RATIOS).is_file() else None
