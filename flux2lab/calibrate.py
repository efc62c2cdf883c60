"""`python -m flux2lab.calibrate`: one uncached pass calibrates every calibrated step cache: TeaCache's samples and
rescaling polynomial, and MagCache's per-step magnitude ratios.

OUT/NAME/ holds `run.json`; TeaCache's `samples.csv`, `fit.json` and `fit.png`; MagCache's `mag_ratios.jsonl` (one
line {"prompt_id", "seed", "ratios"} per prompt, step 0 first) and, once every prompt is in, `mag_ratios.json`
({"mag_ratios": the mean per step, "std", "per_prompt", "steps", "prompts", "run", "definition"}). Presets read them
as `teacache@OUT/NAME/fit.json` and `magcache@OUT/NAME` (`calibration.mag_ratios_from_fit`). Without --prompts, the
model's own calibration set is used (mini: held-out captions of its world).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flux2lab.cli import add_model_args, command_parser, folder_name, non_negative_int, positive_int, run_main, seed_int


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "calibrate",
        description="Run the pipeline uncached over a calibration set, record per step how much the modulated "
                    "input and the model output change, and fit TeaCache's polynomial; the same pass records "
                    "MagCache's magnitude ratios. Writes samples.csv, fit.json, fit.png and mag_ratios.json under "
                    "OUT/NAME/. Interrupted runs resume; --shard splits the prompts "
                    "over processes or GPUs (the last shard to finish writes the fit).",
    )
    add_model_args(p)
    p.add_argument("--prompts", type=Path,
                   help="calibration set: a .jsonl manifest; default: the model's own (calibration_data/calibration.jsonl; "
                        "on mini, held-out captions of its world)")
    p.add_argument("--name", type=folder_name, required=True, help="run name: the folder under --out")
    p.add_argument("--out", type=Path, default=Path("experiments/calibration"), help="where runs live")
    p.add_argument("--steps", type=positive_int, default=50,
                   help="denoising steps; calibrate with the step count you will generate with")
    p.add_argument("--height", type=int, help="image height (default: the model's)")
    p.add_argument("--width", type=int, help="image width (default: the model's)")
    p.add_argument("--limit", type=positive_int, help="use only the first K prompts of the set")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the first prompt without its own seed; the next get +1")
    p.add_argument("--shard", default="0/1", help="record only shard i of n, written i/n")
    p.add_argument("--degree", type=int, default=3, help="polynomial degree")
    p.add_argument("--ret-steps", type=non_negative_int,
                   help="ret_steps assumed by the skip-limit table in fit.json (default: 10, at most the steps)")
    p.add_argument("--fit-only", action="store_true",
                   help="do not record: fit the samples already in OUT/NAME (e.g. with another --degree)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flux2lab import calibration
    from flux2lab.common.errors import Flux2LabError
    from flux2lab.common.files import prepare_output_dir
    from flux2lab.common.formatting import fmt_number
    from flux2lab.pipeline.prompt_sets import prompt_set
    from flux2lab.pipeline.prompts import seeds_for

    run_dir = args.out / args.name
    calibration.check_degree(args.degree)
    if not args.fit_only:
        from flux2lab.pipeline.models import check_source, load_pipeline

        check_source(args.model)
        shard = calibration.parse_shard(args.shard)
        if args.steps < 2:
            raise Flux2LabError(f"--steps {args.steps}: calibration needs at least 2 (samples compare consecutive "
                                "steps).")
        calibration.check_ret_steps(args.ret_steps, args.steps)
        prompts = prompt_set(args.model, "calibration", args.prompts, args.limit)  # checked before any model work
        entries = prompts.entries
        seeds = seeds_for(entries, args.seed)
        recipe = calibration.recording_recipe(args.steps, args.height, args.width)
        prepare_output_dir(run_dir, "--out")
        calibration.check_resume(run_dir, entries, seeds, args.steps)

        print(f"prompts: {prompts.source}")
        if prompts.warning:
            print(f"warning: {prompts.warning}")
        pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
        result = calibration.record(pipe, entries, seeds, run_dir, recipe, model=args.model,
                                    manifest=prompts.source, shard=shard, progress=True)
        print(f"shard {shard[0]}/{shard[1]}: recorded {result.recorded} prompt(s), {result.skipped} already done.")
        if result.missing:
            print(f"{len(result.missing)} prompt(s) of the set are not recorded yet (other shards?); the fit is "
                  f"written when all are in: rerun the missing shards, then `--fit-only --name {args.name}`.")
            return 0
    fit = calibration.fit_run(run_dir, args.degree, ret_steps=args.ret_steps)
    r2 = fmt_number(fit["r2"], ".4f", missing="undefined (y has no variance)")
    heldout = fmt_number(fit["heldout"]["r2"], ".4f", missing="n/a")
    print(f"fit: degree {fit['degree']} on {fit['samples']} samples from {fit['prompts']} prompts; "
          f"R² {r2}, held-out R² {heldout}")
    print("coefficients (highest degree first): " + ", ".join(f"{c:.6e}" for c in fit["coefficients"]))
    for line in fit["skip_limits"]["advice"][:2]:
        print(line)
    mags = calibration.write_mag_ratios(run_dir)
    if mags is None:
        print("MagCache: no ratios in this run (recorded before flux2lab recorded them); run again without --fit-only "
              "to record them.")
    else:
        ratios = mags["mag_ratios"]
        print(f"MagCache: magnitude ratios of {mags['prompts']} prompts x {mags['steps']} steps, step 1 {ratios[1]:.4f} "
              f"... last {ratios[-1]:.4f} (preset magcache@{run_dir})")
    print(f"wrote {run_dir / 'samples.csv'}, {run_dir / 'fit.json'}, {run_dir / 'fit.png'}"
          + ("" if mags is None else f", {run_dir / calibration.MAG_RATIOS}"))
    return 0


if __name__ == "__main__":
    run_main(main)
