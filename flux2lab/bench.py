"""`python -m flux2lab.bench`: the layered speed benchmark (NVIDIA's Figure 4 ladder) on this machine's GPUs.

    python -m flux2lab.bench --model full-random --reps 3 --timed-steps 10 --out reports/benchmarks/h100/  # H100
    python -m flux2lab.bench --model full-random --whole-pipeline --out reports/benchmarks/h200/  # + text enc, VAE
    python -m flux2lab.bench --model tiny --steps 4 --out /tmp/bench                      # CPU smoke run
    python -m flux2lab.bench --model full-random --cache experiments/frozen/best.json --out reports/benchmarks/h200/

Rungs: eager-bf16, compile, +cuda-graphs, +fp8 (Hopper/Ada) or +nvfp4 (Blackwell), +teacache (or +cache: the step
cache of --cache), xN-gpus; each adds one acceleration to the rung below. Writes bench.json, bench.md and
bench.png to --out (rewritten after every rung, so an interrupted run keeps what it measured). See
flux2lab/benchmark/ for how it times.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from flux2lab.cli import add_model_args, command_parser, run_main


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "bench",
        description="Time the acceleration ladder (eager BF16 -> compile -> CUDA graphs -> FP8/NVFP4 -> a step "
                    "cache -> N GPUs) on one card, next to the card's arithmetic floor for one step.",
    )
    add_model_args(p)
    p.add_argument("--out", type=Path, required=True, help="output folder: bench.json, bench.md, bench.png")
    p.add_argument("--ladder", default="default",
                   help="'default' (every rung) or a comma-separated list of rung names, e.g. "
                        "'eager-bf16,+fp8'; each rung still includes the changes of the rungs below it")
    p.add_argument("--recipe", type=Path,
                   help="time this one recipe JSON instead of the ladder (how the multi-GPU rung runs under torchrun)")
    p.add_argument("--precision", choices=["fp8", "nvfp4"],
                   help="the low-precision rung (default: nvfp4 on Blackwell, fp8 elsewhere)")
    p.add_argument("--gpus", type=_counts, help="GPU counts of the multi-GPU rungs, e.g. 2 or 2,4 (default: all "
                                                "visible GPUs, at least 2)")
    p.add_argument("--steps", type=int, help="denoising steps per image (default: 50; with --recipe, the recipe's)")
    p.add_argument("--height", type=int, help="image height (default: the model's, 1024 for FLUX.2 [dev])")
    p.add_argument("--width", type=int, help="image width (default: the model's)")
    p.add_argument("--reps", type=int, default=3, help="timed images per rung")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up images per rung")
    p.add_argument("--warmup-steps", type=int, default=3,
                   help="steps of a warm-up image: enough to compile and capture, shapes do not depend on the "
                        "step count; cache rungs warm up on the full schedule")
    p.add_argument("--timed-steps", type=int,
                   help="run timed images of this many steps and extrapolate the per-image time to --steps "
                        "(measured wall + remaining steps x median step); cache rungs always time full images. "
                        "Default: time full images")
    p.add_argument("--cache", metavar="FROZEN.json|RECIPE.json|PRESET",
                   help="time the rung +cache (instead of +teacache) with this step cache and its settings: the "
                        "search's frozen point (its recorded computed fraction is replayed on random weights), a "
                        "recipe file, or presets such as taylorseer=3, seacache=0.5, magcache@FIT.json")
    p.add_argument("--teacache-schedule", default="auto",
                   help="which steps the cache rung skips (TeaCache, FirstBlockCache, SeaCache; TaylorSeer and "
                        "MagCache follow their own schedules): auto (real decisions on real weights; on random "
                        "weights the --cache frozen point's computed fraction, else for TeaCache NVIDIA's average "
                        "of 16 of 50 steps, else the method's own decisions, marked) | real | K/N (replay K skipped of "
                        "every N steps) | K (K skipped steps) | FIT.json:SAMPLES.csv (TeaCache's rule on a "
                        "calibration's distances)")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="do not time the step's GEMMs and attention (the floor)")
    p.add_argument("--whole-pipeline", action="store_true",
                   help="with --model full-random: also build the full-size Mistral text encoder and VAE (random "
                        "weights, ~105 GiB in BF16: an H200) and time whole images, as NVIDIA did")
    return p


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of GPU counts, e.g. 2,4") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flux2lab import parallel
    from flux2lab.benchmark import Bench, BenchConfig, console_lines, write_report
    from flux2lab.common.files import prepare_output_dir
    from flux2lab.pipeline.models import check_source

    check_source(args.model)
    prepare_output_dir(args.out, "--out")
    words = sys.argv[1:] if argv is None else argv
    env = parallel.init(args.device)
    world = env.world_size
    launcher = f"torchrun --nproc-per-node={world} -m" if world > 1 else "python -m"
    cfg = BenchConfig(
        model=args.model, device=str(env.device) if world > 1 else args.device, dtype=args.dtype,
        ladder=args.ladder, recipe=args.recipe, precision=args.precision, gpus=args.gpus, steps=args.steps,
        height=args.height, width=args.width, reps=args.reps, warmup=args.warmup, warmup_steps=args.warmup_steps,
        timed_steps=args.timed_steps, teacache_schedule=args.teacache_schedule, cache=args.cache, floor=args.floor,
        whole_pipeline=args.whole_pipeline, out=args.out,
        command=f"{launcher} flux2lab.bench {shlex.join(words)}",
    )

    def say(msg: str) -> None:
        if env.is_main:
            print(msg, file=sys.stderr, flush=True)

    try:
        result = Bench(cfg, on_update=lambda r: write_report(r, args.out), say=say).run()
    finally:
        parallel.shutdown()
    if not env.is_main:
        return 0
    print("\n".join(console_lines(result)))
    print(f"wrote {args.out / 'bench.json'}, bench.md, bench.png ({result['wall_s']:.0f} s)")
    return 1 if any(r["status"] == "failed" for r in result["rungs"]) else 0


if __name__ == "__main__":
    run_main(main)
