"""Score a model on the mini world: attribute accuracy on held-out captions, domain FID against real images.

`evaluate(pipe, recipe)` generates one image per held-out caption (seeds 0..n-1 unless told) and reads them
with the yardstick; `compare(baseline, candidate)` puts two runs on the same prompts and seeds side by side
(accuracy drop with its CI, LPIPS, PSNR, SSIM, domain FID between the sets, the fraction of the block stack
computed). The command does the same (recipes are JSON files or presets, as in `python -m flux2lab.compare`):

    python -m flux2lab.zoo.evaluate --model mini --n 200                       # mini at 50 steps
    python -m flux2lab.zoo.evaluate --model mini --baseline bf16 --recipe nvfp4 --out cmp.json

Domain FID is biased upward at small n (a 128-d feature covariance estimated from few images), so each
evaluation also reports the *floor*: the domain FID of n real images against the same reference, what a
perfect model would score at this n. Read a model's domain FID next to it, never against numbers at another n.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flux2lab.cli import add_model_args, command_parser, positive_int, run_main, seed_int, shape_overrides
from flux2lab.common.errors import Flux2LabError
from flux2lab.pipeline.core import Generation, ImageRecord, Prompt, applied_recipe, apply, generate, resolution
from flux2lab.pipeline.models import model_info
from flux2lab.pipeline.presets import PRESET_HELP, resolve_recipe
from flux2lab.pipeline.recipe import Recipe
from flux2lab.zoo import world, yardstick

if TYPE_CHECKING:
    from diffusers import Flux2Pipeline

REAL_SEED = 10_000  # real images come from seeds no evaluation prompt uses
FLOOR_SEED = 20_000  # the floor's real draws: seeds FLOOR_SEED, FLOOR_SEED + 1, ...
FLOOR_DRAWS = 10


@dataclass
class Evaluation:
    """One model + recipe on n held-out captions."""

    prompts: list[str]
    seeds: list[int]
    images: list[Any] = field(repr=False)
    per_image_accuracy: np.ndarray = field(repr=False)
    domain_fid: float
    domain_fid_floor: float | None = None  # real images at the same n (see the module docstring)
    generation: Generation | None = field(default=None, repr=False)

    @property
    def accuracy(self) -> float:
        return float(self.per_image_accuracy.mean())

    def to_dict(self) -> dict:
        g = self.generation
        return {
            "n": len(self.prompts),
            "attribute_accuracy": self.accuracy,
            "domain_fid": self.domain_fid,
            "domain_fid_floor": self.domain_fid_floor,
            "computed_fraction": g.computed_fraction if g else None,
            "mean_wall_s": g.mean_wall_s if g else None,
        }


def heldout_prompts(n: int, seed: int = 0) -> list[str]:
    return [s.caption for s in world.sample_scenes(n, seed, split="heldout")]


def real_images(n: int, seed: int = REAL_SEED) -> torch.Tensor:
    """n renders of scenes drawn from the whole world (the reference distribution of domain FID)."""
    return world.render(world.sample_scenes(n, seed, split="all"), seed)


def real_floor(
    model: yardstick.Yardstick, ref: np.ndarray, n: int, draws: int = FLOOR_DRAWS, seed: int = FLOOR_SEED
) -> float:
    """Mean domain FID of `draws` sets of n fresh real images against the real images whose yardstick features
    are `ref`: the score of a perfect model at this n (~360 at n=200, ~4400 at n=16 against 300-500 real
    images, with the shipped yardstick)."""
    fresh = yardstick.features(model, real_images(n * draws, seed))
    return float(np.mean([yardstick.frechet_distance(ref, fresh[k * n : (k + 1) * n]) for k in range(draws)]))


def sample(
    pipe: Flux2Pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    recipe: Recipe,
    batch_size: int = 1,
    cache: str | Path | None = None,
) -> Generation:
    """`core.generate` (through the image cache `flux2lab.compare` uses, when given one: a baseline is made
    once for every candidate), or, with batch_size > 1, the same pipeline call on batches (faster on a GPU;
    images match one-by-one generation up to float rounding). TeaCache decides per batch: it needs batch_size 1."""
    if batch_size <= 1 and cache is not None:
        from flux2lab.pipeline.imagecache import ImageCache, generate_cached

        return generate_cached(pipe, [Prompt(p) for p in prompts], list(seeds), recipe, ImageCache(cache))[0]
    if batch_size <= 1:
        return generate(pipe, list(prompts), list(seeds), recipe)
    if cache is not None:
        raise Flux2LabError("the image cache holds one-by-one images: use batch_size 1 with a cache.")
    if recipe.cache.method != "none":
        raise Flux2LabError(f"step caches ({recipe.cache.method}) decide per batch, not per image: evaluate them with "
                            "batch_size 1.")
    if applied_recipe(pipe) != recipe:
        apply(pipe, recipe)
    info = model_info(pipe)
    height, width = resolution(pipe, recipe)
    images, records = [], []
    for i in range(0, len(prompts), batch_size):
        chunk, chunk_seeds = list(prompts[i : i + batch_size]), list(seeds[i : i + batch_size])
        start = time.perf_counter()
        out = pipe(
            prompt=chunk,
            height=height,
            width=width,
            num_inference_steps=recipe.steps,
            guidance_scale=recipe.guidance,
            generator=[torch.Generator(device="cpu").manual_seed(s) for s in chunk_seeds],
            max_sequence_length=info.max_sequence_length,
            text_encoder_out_layers=info.text_encoder_out_layers,
            output_type="pil",
        ).images
        share = (time.perf_counter() - start) / len(chunk)  # per image: its share of the batch's time
        images += out
        records += [ImageRecord(prompt=p, seed=s, wall_s=share) for p, s in zip(chunk, chunk_seeds)]
    return Generation(images=images, records=records)


def evaluate(
    pipe: Flux2Pipeline,
    recipe: Recipe | None = None,
    *,
    n: int = 200,
    seed: int = 0,
    batch_size: int = 1,
    real: torch.Tensor | None = None,
    model: yardstick.Yardstick | None = None,
    floor_draws: int = FLOOR_DRAWS,
    cache: str | Path | None = None,
) -> Evaluation:
    """Generate for n held-out captions (seeds seed..seed+n-1) and score them with the yardstick; the real
    floor of domain FID at this n from `floor_draws` sets of real images (0: not computed)."""
    recipe = recipe or Recipe()
    model = model or yardstick.load()
    prompts = heldout_prompts(n, seed)
    seeds = list(range(seed, seed + n))
    gen = sample(pipe, prompts, seeds, recipe, batch_size, cache)
    real = real if real is not None else real_images(max(n, 500))
    ref = yardstick.features(model, real)  # once, for the score and the floor
    return Evaluation(
        prompts=prompts,
        seeds=seeds,
        images=gen.images,
        per_image_accuracy=yardstick.attribute_accuracy(model, gen.images, prompts),
        domain_fid=yardstick.frechet_distance(ref, yardstick.features(model, gen.images)),
        domain_fid_floor=real_floor(model, ref, n, floor_draws) if floor_draws else None,
        generation=gen,
    )


def compare(
    baseline: Evaluation,
    candidate: Evaluation,
    *,
    lpips_weights: str | Path | None = None,
    model: yardstick.Yardstick | None = None,
) -> dict:
    """Candidate against baseline on the same prompts and seeds: what the acceleration cost."""
    from flux2lab import metrics

    if (baseline.prompts, baseline.seeds) != (candidate.prompts, candidate.seeds):
        raise Flux2LabError("compare needs two evaluations of the same prompts and seeds.")
    model = model or yardstick.load()
    drop = metrics.bootstrap_ci(baseline.per_image_accuracy - candidate.per_image_accuracy)  # paired per image
    psnr = metrics.bootstrap_ci(metrics.psnr(baseline.images, candidate.images, device="cpu"))
    out = {
        "n": len(baseline.prompts),
        "accuracy_baseline": baseline.accuracy,
        "accuracy_candidate": candidate.accuracy,
        "accuracy_drop": drop.mean,
        "accuracy_drop_ci95": [drop.low, drop.high],
        "domain_fid_baseline": baseline.domain_fid,
        "domain_fid_candidate": candidate.domain_fid,
        "domain_fid_floor": baseline.domain_fid_floor,
        "domain_fid_between": yardstick.domain_fid(model, baseline.images, candidate.images),
        "psnr": psnr.mean,  # over the pairs that differ; identical pairs (infinite PSNR) are counted apart
        "identical_images": psnr.n_inf,
        "ssim": float(np.mean(metrics.ssim(baseline.images, candidate.images, device="cpu"))),
        "computed_fraction": candidate.generation.computed_fraction if candidate.generation else None,
    }
    if lpips_weights is not None:
        out["lpips"] = float(np.mean(metrics.lpips(baseline.images, candidate.images, lpips_weights)))
    return out


# ------------------------------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "zoo.evaluate",
        description="Attribute accuracy and domain FID of a model on held-out captions of the mini world; "
        "with --baseline, what a recipe costs against another on the same prompts and seeds.",
    )
    add_model_args(p)
    p.add_argument("--recipe", help=f"recipe to evaluate (default: plain BF16, 50 steps): {PRESET_HELP}")
    p.add_argument("--baseline", help="recipe to compare against (same model, prompts, seeds), as --recipe")
    p.add_argument("--steps", type=positive_int, help="denoising steps (overrides both recipes)")
    p.add_argument("--n", type=int, default=200, help="held-out captions")
    p.add_argument("--seed", type=seed_int, default=0, help="first caption/seed index")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="images per pipeline call; >1 is faster on a GPU, not allowed with TeaCache",
    )
    p.add_argument(
        "--cache",
        type=Path,
        help="image cache folder (e.g. experiments/image_cache, shared with flux2lab.compare): images already "
        "made for the same model, recipe, prompt and seed are read back (default: no cache)",
    )
    p.add_argument("--yardstick-weights", type=Path, help="yardstick weights (default: the shipped ones)")
    p.add_argument("--lpips-weights", type=Path, help="LPIPS AlexNet checkpoint (for --baseline; optional)")
    p.add_argument("--out", type=Path, help="write the numbers as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flux2lab.common.files import check_output_file, check_weight_file
    from flux2lab.pipeline.models import check_source, load_pipeline

    if args.n < 2:
        raise Flux2LabError("--n must be at least 2 (domain FID needs two images).")
    check_source(args.model)
    if args.lpips_weights is not None:
        check_weight_file(args.lpips_weights, "--lpips-weights")
    if args.out is not None:
        check_output_file(args.out, "--out")

    def recipe_of(spec: str | None) -> Recipe:
        r = resolve_recipe(spec) if spec else Recipe()
        return r.replace(**shape_overrides(args))

    model = yardstick.load(args.yardstick_weights)
    real = real_images(max(args.n, 500))
    runs = {"candidate": recipe_of(args.recipe)}
    if args.baseline:
        runs = {"baseline": recipe_of(args.baseline), **runs}
    results, evals = {}, {}
    for name, recipe in runs.items():
        # A fresh pipeline per recipe: model-changing fields (precision) cannot be undone in place.
        pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
        evals[name] = evaluate(
            pipe,
            recipe,
            n=args.n,
            seed=args.seed,
            batch_size=args.batch_size,
            real=real,
            model=model,
            cache=args.cache,
        )
        results[name] = {"recipe": recipe.to_dict(), **evals[name].to_dict()}
        print(
            f"{name}: attribute accuracy {evals[name].accuracy:.3f}, domain FID {evals[name].domain_fid:.2f} "
            f"(real images at n={args.n}: {evals[name].domain_fid_floor:.2f})"
        )
    if args.baseline:
        results["comparison"] = compare(
            evals["baseline"], evals["candidate"], lpips_weights=args.lpips_weights, model=model
        )
        print(
            "comparison: "
            + ", ".join(f"{k} {v:.4g}" for k, v in results["comparison"].items() if isinstance(v, float))
        )
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "seed": args.seed, **results}, indent=2) + "\n")
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
