"""`python -m flux2lab.calibrate`: record TeaCache calibration samples and fit the rescaling polynomial."""

from __future__ import annotations

import argparse
from pathlib import Path

from flux2lab.cli import add_model_args, command_parser, run_main

DEFAULT_SET = Path("calibration_data/calibration.jsonl")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "calibrate",
        description="Run the pipeline uncached over a calibration set, record per step how much the modulated "
                    "input and the model output change, and fit TeaCache's polynomial. Writes samples.csv, "
                    "fit.json and fit.png under OUT/NAME/. Interrupted runs resume; --shard splits the prompts "
                    "over processes or GPUs (the last shard to finish writes the fit).",
    )
    add_model_args(p)
    p.add_argument("--prompts", type=Path, default=DEFAULT_SET, help="calibration set: a .jsonl manifest")
    p.add_argument("--name", required=True, help="run name: the folder under --out")
    p.add_argument("--out", type=Path, default=Path("experiments/calibration"), help="where runs live")
    p.add_argument("--steps", type=int, default=50,
                   help="denoising steps; calibrate with the step count you will generate with")
    p.add_argument("--height", type=int, help="image height (default: the model's)")
    p.add_argument("--width", type=int, help="image width (default: the model's)")
    p.add_argument("--limit", type=int, help="use only the first K prompts of the set")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt without its own seed; the next get +1")
    p.add_argument("--shard", default="0/1", help="record only shard i of n, written i/n")
    p.add_argument("--degree", type=int, default=3, help="polynomial degree")
    p.add_argument("--ret-steps", type=int, default=10, help="ret_steps assumed by the skip-limit table in fit.json")
    p.add_argument("--fit-only", action="store_true",
                   help="do not record: fit the samples already in OUT/NAME (e.g. with another --degree)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flux2lab import calibration
    from flux2lab.common.errors import Flux2LabError
    from flux2lab.pipeline.prompts import load_prompts, seeds_for

    run_dir = args.out / args.name
    if not args.fit_only:
        shard = calibration.parse_shard(args.shard)
        if args.limit is not None and args.limit < 1:
            raise Flux2LabError(f"--limit {args.limit}: give a positive number of prompts.")
        entries = load_prompts(args.prompts)[: args.limit]  # every line is checked before any model work
        seeds = seeds_for(entries, args.seed)
        recipe = calibration.recording_recipe(args.steps, args.height, args.width)

        from flux2lab.pipeline.models import load_pipeline

        pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
        result = calibration.record(pipe, entries, seeds, run_dir, recipe, model=args.model,
                                    manifest=args.prompts, shard=shard, progress=True)
        print(f"shard {shard[0]}/{shard[1]}: recorded {result.recorded} prompt(s), {result.skipped} already done.")
        if result.missing:
            print(f"{len(result.missing)} prompt(s) of the set are not recorded yet (other shards?); the fit is "
                  f"written when all are in: rerun the missing shards, then `--fit-only --name {args.name}`.")
            return 0
    fit = calibration.fit_run(run_dir, args.degree, ret_steps=args.ret_steps)
    heldout = fit["heldout"]["r2"]
    print(f"fit: degree {fit['degree']} on {fit['samples']} samples from {fit['prompts']} prompts; "
          f"R² {fit['r2']:.4f}, held-out R² {'n/a' if heldout is None else f'{heldout:.4f}'}")
    print("coefficients (highest degree first): " + ", ".join(f"{c:.6e}" for c in fit["coefficients"]))
    for line in fit["skip_limits"]["advice"][:2]:
        print(line)
    print(f"wrote {run_dir / 'samples.csv'}, {run_dir / 'fit.json'}, {run_dir / 'fit.png'}")
    return 0


if __name__ == "__main__":
    run_main(main)
