"""A trial's work: load the pipeline for a candidate recipe, make the uncached reference once, generate the
prompt set, time it and score it against the reference; a trial whose images are not finite fails."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna

from flux2lab.common.errors import Flux2LabError
from flux2lab.pipeline.recipe import Recipe
from flux2lab.study.config import SPEED_METRICS, StudyConfig
from flux2lab.study.recovery import duplicate_of, this_worker


def trial_weights(paths: Mapping[str, str | Path], *, device: str | None, skip_missing: bool,
                  quality_metric: str | None = None) -> dict[str, Path | None]:
    """The metric weights trials are scored with, resolved before any model work: LPIPS as the metrics module
    decides (an error, or skipped with `skip_missing`), PSNR/SSIM always, CLIP only when its weights are there.
    A `quality_metric` (other than "auto") whose weights are missing is an error naming them."""
    from flux2lab import metrics

    options = metrics.MetricOptions(device=device)
    weights = metrics.check_weights(["lpips", "psnr", "ssim"], paths, skip_missing=skip_missing, options=options)
    clip = metrics.check_weights(["clip"], paths, skip_missing=True, options=options)
    weights.update(clip)
    weights.skipped.update(clip.skipped)
    if quality_metric not in (None, "auto") and quality_metric not in weights:
        metrics.check_weights([quality_metric], paths, options=options)  # raises the module's message
    return weights


class NonFiniteImages(RuntimeError):
    """The decoder produced NaN or infinite values: the image is garbage, whatever PIL shows."""


class _FiniteCheck:
    """Watches the VAE decoder's output during generation (PIL conversion would hide NaNs as black)."""

    def __init__(self, pipe):
        self.bad = 0
        decoder = getattr(getattr(pipe, "vae", None), "decoder", None)
        self.handle = decoder.register_forward_hook(self._check) if decoder is not None else None

    def _check(self, module, args, output):
        import torch

        sample = getattr(output, "sample", output)
        if isinstance(sample, torch.Tensor) and not torch.isfinite(sample).all():
            self.bad += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()


class TrialRunner:
    """Loads pipelines lazily (one per transformer precision, up to `keep_pipelines`), makes the reference
    once, and scores each trial's recipe. Its `objective` is what `Study.optimize` calls."""

    def __init__(self, study: optuna.Study, config: StudyConfig, study_dir: Path, *, device: str | None = None,
                 dtype=None, weights: Mapping[str, Path | None], keep_pipelines: int = 1, progress: bool = False):
        self.study, self.config, self.study_dir = study, config, Path(study_dir)
        self.device, self.dtype = device, dtype
        self.weights = dict(weights)
        self.keep = max(1, keep_pipelines)
        self.progress = progress
        self.pipes: list = []
        self.reference: list | None = None
        self.ref_time: float | None = None
        self.worker = this_worker()

    # -- model and reference

    def pipeline(self, recipe: Recipe):
        """A loaded pipeline whose model-changing fields match `recipe` (loading one if needed)."""
        from flux2lab.pipeline import core
        from flux2lab.pipeline.models import free_memory, load_pipeline

        for pipe in self.pipes:
            if not core.applied_recipe(pipe).model_changes(recipe):
                return pipe
        if len(self.pipes) >= self.keep:
            self.pipes.pop(0)
            free_memory()
        pipe = load_pipeline(self.config.model, device=self.device, dtype=self.dtype)
        prompts, seeds = self.prompts()
        # One untimed one-step image (generate applies the recipe's model changes first): first-call costs
        # (allocation, kernels, compilation) stay out of timings.
        core.generate(pipe, prompts[:1], seeds[:1], recipe.replace(steps=1, cache={"method": "none"}))
        self.pipes.append(pipe)
        return pipe

    def prompts(self):
        """The study's prompts and seeds, as `generate` takes them (the inverse of `prompt_records`)."""
        from flux2lab.pipeline.core import Prompt

        entries = self.config.prompts
        return [Prompt(p["text"], tuple(p["images"])) for p in entries], [p["seed"] for p in entries]

    def ensure_reference(self) -> None:
        """The uncached reference images, from the study folder's cache (made there once, under a file lock so
        workers sharing the folder make them once)."""
        if self.reference is not None:
            return
        from filelock import FileLock

        from flux2lab.pipeline.imagecache import ImageCache, generate_cached

        base = self.config.base
        pipe = self.pipeline(base)
        prompts, seeds = self.prompts()
        self.study_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.study_dir / "reference.lock")):
            gen, _ = generate_cached(pipe, prompts, seeds, base, ImageCache(self.study_dir / "reference"),
                                     progress=self.progress)
        self.reference = gen.images
        self.ref_time = gen.mean_wall_s

    # -- one trial

    def measure(self, recipe: Recipe) -> dict[str, Any]:
        """Generate the prompt set with `recipe` and score it; the user attributes of the trial. Speed is both
        the time per image and the fraction of the block stack that really ran (`Generation.computed_fraction`:
        what a cache skipped, whatever its method; None where nothing could count it)."""
        from flux2lab import metrics
        from flux2lab.pipeline import core
        from flux2lab.pipeline.models import model_info

        pipe = self.pipeline(recipe)
        prompts, seeds = self.prompts()
        with _FiniteCheck(pipe) as check:
            gen = core.generate(pipe, prompts, seeds, recipe)
        if check.bad:
            raise NonFiniteImages(f"{check.bad} of {len(prompts)} image(s) decoded to NaN/inf values")
        results = metrics.evaluate(self.reference, gen.images, self.weights, prompts=[p.text for p in prompts],
                                   options=metrics.MetricOptions(device=self.device))
        values = {name: r.to_dict()["value"] for name, r in results.items()}
        bad = [n for n, v in values.items() if math.isnan(float(v))]
        if bad:
            raise NonFiniteImages(f"metric(s) {', '.join(bad)} are NaN")
        time_per_image = gen.mean_wall_s
        info = model_info(pipe)
        return {
            "recipe": recipe.to_dict(), "metrics": values, "time_per_image": time_per_image,
            "computed_fraction": gen.computed_fraction, "ref_time_per_image": self.ref_time,
            "speedup": self.ref_time / time_per_image if time_per_image > 0 else None,
            "model": {"source": info.source, "kind": info.kind, "revision": info.revision},
            "device": str(pipe.transformer.device),
        }

    def objective(self, trial: optuna.Trial) -> tuple[float, float]:
        trial.set_user_attr("worker", self.worker)
        point = self.config.search_space.suggest(trial, self.config.sampler)
        trial.set_user_attr("point", point)  # method and settings (a grid trial's one parameter is an index)
        owner = duplicate_of(self.study, trial.number)
        if owner is not None:
            trial.set_user_attr("duplicate_of", owner)
            raise optuna.TrialPruned(f"grid point already taken by trial {owner}")
        try:
            attrs = self.measure(self.config.recipe_for(point))
            values = objective_values(self.config, attrs)
        except Exception as e:
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}"[:2000])
            raise
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        return values


def objective_values(config: StudyConfig, attrs: Mapping[str, Any]) -> tuple[float, float]:
    speed = attrs[SPEED_METRICS[config.speed_metric][0]]
    if speed is None:
        raise Flux2LabError(f"this trial's {SPEED_METRICS[config.speed_metric][0]} was not measured (blocks replayed "
                            "by CUDA graphs cannot be counted); use --speed-metric time.")
    quality = attrs["metrics"].get(config.quality_metric)
    if quality is None:
        raise Flux2LabError(f"this worker did not measure {config.quality_metric}, the study's quality objective.")
    return float(speed), float(quality)  # metric values are stored JSON-safe: "inf" for identical images
