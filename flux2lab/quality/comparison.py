"""Recipe A against recipe B on the same prompts and seeds: paired images, metrics, a grid.

The paired metrics (LPIPS, PSNR, SSIM against A's image of the same prompt and seed) are the regression
gate; set-level ones (FID, CLIP score) are reported beside them. Images come from the image cache, so a
reference generated once serves every later comparison against it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flux2lab.metrics import MetricOptions, MetricResult, evaluate
from flux2lab.pipeline.core import Generation
from flux2lab.pipeline.imagecache import ImageCache, generate_cached
from flux2lab.pipeline.models import free_memory, load_pipeline, model_info
from flux2lab.pipeline.prompts import PromptEntry
from flux2lab.pipeline.recipe import Recipe
from flux2lab.quality.grid import comparison_grid
from flux2lab.zoo import yardstick  # noqa: F401 (registers the metric "yardstick" that comparisons on mini use)

# What a comparison measures unless told otherwise on any model (compare, the demo and the report use this list);
# `default_metrics` adds the model's own.
DEFAULT_METRICS = ("lpips", "psnr", "ssim", "fid", "clip")


def default_metrics(model: str) -> tuple[str, ...]:
    """What a comparison on `model` measures unless told otherwise: DEFAULT_METRICS, and on `mini` its yardstick
    (attribute accuracy and domain FID against the captions: the quality truth of the mini world)."""
    return DEFAULT_METRICS + (("yardstick",) if model == "mini" else ())


@dataclass
class Comparison:
    model: str
    revision: str | None
    recipes: tuple[Recipe, Recipe]
    labels: tuple[str, str]
    entries: list[PromptEntry]
    seeds: list[int]
    generations: tuple[Generation, Generation]  # A's and B's images with their records
    metrics: dict[str, MetricResult]
    generated: tuple[int, int]  # images newly made for A and B (the rest came from the cache)
    skipped_metrics: dict[str, str] = field(default_factory=dict)  # metrics asked for but not measured: why

    def write(self, out: str | Path) -> dict[str, Path]:
        """Images, metrics.json, per_prompt.csv and grid.png under `out`."""
        out = Path(out)
        for side, gen in zip("ab", self.generations):
            (out / side).mkdir(parents=True, exist_ok=True)
            for entry, img in zip(self.entries, gen.images):
                img.save(out / side / f"{entry.id}.png")
        summary = {
            "model": self.model, "revision": self.revision,
            "a": {"label": self.labels[0], "recipe": self.recipes[0].to_dict()},
            "b": {"label": self.labels[1], "recipe": self.recipes[1].to_dict()},
            "prompts": [{"id": e.id, "prompt": e.prompt.text, "seed": s} for e, s in zip(self.entries, self.seeds)],
            "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
            "seconds_per_image": {side: gen.mean_wall_s for side, gen in zip("ab", self.generations)},
            "computed_fraction": {side: gen.computed_fraction for side, gen in zip("ab", self.generations)},
            "generated": {"a": self.generated[0], "b": self.generated[1]},
            "skipped_metrics": self.skipped_metrics,
        }
        (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        per_image = {k: v.per_image for k, v in self.metrics.items() if v.per_image is not None}
        with open(out / "per_prompt.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "prompt", "seed", *per_image])
            for i, (e, s) in enumerate(zip(self.entries, self.seeds)):
                w.writerow([e.id, e.prompt.text, s, *(float(v[i]) for v in per_image.values())])
        grid = comparison_grid(list(zip(*(gen.images for gen in self.generations))), [e.prompt.text for e in self.entries],
                               (f"A: {self.labels[0]}", f"B: {self.labels[1]}"), out / "grid.png")
        return {"metrics": out / "metrics.json", "per_prompt": out / "per_prompt.csv", "grid": grid}


def compare(
    model: str, a: Recipe, b: Recipe, entries: list[PromptEntry], seeds: list[int],
    weights: dict[str, Path | None], cache_dir: str | Path, *, labels: tuple[str, str] = ("A", "B"),
    device: str | None = None, dtype: torch.dtype | None = None, options: MetricOptions | None = None,
    progress: bool = True, skipped_metrics: Mapping[str, str] | None = None,
) -> Comparison:
    """Generate A and B for every prompt and seed (reusing cached images), then measure B against A.

    A recipe that rewrites the model (precision, compile...) needs its own pipeline; the first is freed
    before the second is loaded, so two copies of a large model never share the GPU. `skipped_metrics`
    ({metric: why}, e.g. `check_weights(...).skipped`) is written to metrics.json beside the measured ones.
    """
    cache = ImageCache(cache_dir)
    prompts = [e.prompt for e in entries]
    pipe = load_pipeline(model, device=device, dtype=dtype)
    info = model_info(pipe)
    gen_a, new_a = generate_cached(pipe, prompts, seeds, a, cache, progress=progress)
    if a.model_changes(b):
        del pipe
        free_memory()
        pipe = load_pipeline(model, device=device, dtype=dtype)
    gen_b, new_b = generate_cached(pipe, prompts, seeds, b, cache, progress=progress)
    metrics = evaluate(gen_a.images, gen_b.images, weights, prompts=[p.text for p in prompts], options=options)
    return Comparison(
        model=model, revision=info.revision, recipes=(a, b), labels=labels, entries=entries, seeds=seeds,
        generations=(gen_a, gen_b), metrics=metrics,
        generated=(new_a, new_b), skipped_metrics=dict(skipped_metrics or {}),
    )
