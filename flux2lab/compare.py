"""`python -m flux2lab.compare`: does recipe B keep recipe A's images? Paired images, metrics, a grid."""

from __future__ import annotations

import argparse
from pathlib import Path

from flux2lab.cli import add_model_args, command_parser, positive_int, run_main, seed_int, shape_overrides


def build_parser() -> argparse.ArgumentParser:
    from flux2lab.metrics import add_weight_arguments
    from flux2lab.pipeline.presets import PRESET_HELP
    from flux2lab.quality.comparison import DEFAULT_METRICS

    p = command_parser(
        "compare",
        description="Generate the same prompts and seeds with recipe A and recipe B, then measure B against A "
                    "(LPIPS, PSNR, SSIM per image; FID and CLIP score per set) and draw A | B | difference.",
    )
    add_model_args(p)
    p.add_argument("--a", default="bf16", help=f"recipe A, the reference: {PRESET_HELP}")
    p.add_argument("--b", required=True, help=f"recipe B, the candidate: {PRESET_HELP}")
    p.add_argument("--prompts", type=Path,
                   help="prompt set (.jsonl manifest or one prompt a line); default: the model's own quality set "
                        "(calibration_data/quality_prompts.jsonl; on mini, held-out captions of its world)")
    p.add_argument("--limit", type=positive_int, help="use only the first N prompts")
    p.add_argument("--seed", type=seed_int, default=0, help="seed for prompts without their own")
    p.add_argument("--steps", type=positive_int, help="denoising steps for both recipes")
    p.add_argument("--height", type=int, help="image height for both recipes (default: the model's)")
    p.add_argument("--width", type=int, help="image width for both recipes (default: the model's)")
    p.add_argument("--metrics", help=f"comma-separated metrics (default: {','.join(DEFAULT_METRICS)}; on mini, "
                                      "yardstick too)")
    p.add_argument("--cache", type=Path, default=Path("experiments/image_cache"),
                   help="where generated images are cached")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    add_weight_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flux2lab.common.errors import Flux2LabError
    from flux2lab.common.files import prepare_output_dir
    from flux2lab.metrics import check_weights, weight_paths
    from flux2lab.pipeline.models import check_source
    from flux2lab.pipeline.presets import resolve_recipe
    from flux2lab.pipeline.prompt_sets import prompt_set
    from flux2lab.pipeline.prompts import seeds_for
    from flux2lab.quality.comparison import compare, default_metrics

    # Everything the user can get wrong is checked before the first image is generated (and weights are fetched).
    check_source(args.model)
    prompts = prompt_set(args.model, "quality", args.prompts, args.limit)
    entries = prompts.entries
    seeds = seeds_for(entries, args.seed)
    names = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else default_metrics(args.model)
    weights = check_weights(names, weight_paths(args), skip_missing=args.skip_missing)
    if not weights:
        raise Flux2LabError("no metric left to compute; give --metrics with at least one available metric.")
    a = resolve_recipe(args.a).replace(**shape_overrides(args))
    b = resolve_recipe(args.b).replace(**shape_overrides(args))
    prepare_output_dir(args.cache, "--cache")
    prepare_output_dir(args.out, "--out")

    print(f"prompts: {prompts.source}")
    if prompts.warning:
        print(f"warning: {prompts.warning}")
    result = compare(args.model, a, b, entries, seeds, weights, args.cache, labels=(args.a, args.b),
                     device=args.device, dtype=args.dtype, skipped_metrics=weights.skipped)
    paths = result.write(args.out)
    print(f"{args.model}: A = {args.a}, B = {args.b}, {len(entries)} prompts "
          f"({result.generated[0]} + {result.generated[1]} images generated, the rest from the cache)")
    for name, m in result.metrics.items():
        s = m.summary
        ci = f"  95% CI [{s.low:.4g}, {s.high:.4g}]" if s is not None and s.n_inf < s.n else ""
        inf = f"  ({s.n_inf} of {s.n} infinite: identical images)" if s is not None and s.n_inf else ""
        print(f"  {name:>14}: {m.value:.4g}{ci}{inf}")
    for name, why in result.skipped_metrics.items():
        print(f"  {name:>14}: skipped: {why}")
    print(f"wrote {paths['metrics']}, {paths['per_prompt']} and {paths['grid']}")
    return 0


if __name__ == "__main__":
    run_main(main)
