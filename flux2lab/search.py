"""`python -m flux2lab.search`: search every step cache's settings with Optuna, show one Pareto front, freeze.

    python -m flux2lab.search --model M --calibration fit.json --prompts FILE --study NAME   # create / resume
    python -m flux2lab.search --study NAME --storage URL                                   # join as a worker
    python -m flux2lab.search --study NAME --freeze --max-lpips 0.1                        # pick and freeze

The library is `flux2lab.study`; this module only turns flags into its calls and prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flux2lab.cli import (
    DEFAULT_MODEL,
    MODEL_HELP,
    add_model_args,
    command_parser,
    finite_float,
    folder_name,
    non_negative_int,
    positive_int,
    run_main,
    sampler_seed_int,
    seed_int,
    shape_overrides,
)
from flux2lab.common.errors import Flux2LabError

# Options that define a study (stored in it). Given on a rerun, they must match; left out, the stored ones hold.
DEFINING = ("model", "prompts", "seed", "recipe", "steps", "height", "width", "calibration", "methods", "grid",
            "threshold", "ret_steps", "cutoff_steps", "space", "precision", "sampler", "n_trials", "sampler_seed",
            "quality_metric", "speed_metric")


def build_parser() -> argparse.ArgumentParser:
    from flux2lab.metrics import add_weight_arguments

    p = command_parser(
        "search",
        description="Search step caches (TeaCache, TaylorSeer, MagCache, FirstBlockCache, SeaCache: the method and "
                    "its own settings; optionally the transformer precision) with Optuna: each trial generates the "
                    "prompt set, is timed, counts the share of the block stack computed and is scored against an "
                    "uncached reference; one Pareto front of speed vs quality across the methods is printed and "
                    "plotted. --freeze picks the fastest point of any method within a quality budget. Interrupted "
                    "studies resume where they stopped; several processes or machines can share one study through "
                    "its storage.",
    )
    p.add_argument("--study", type=folder_name, required=True,
                   help="study name (also its folder under EXPERIMENTS/studies/)")
    p.add_argument("--storage", help="SQLAlchemy URL of the Optuna storage (default: sqlite:///EXPERIMENTS/studies.db)")
    p.add_argument("--experiments", type=Path, default=Path("experiments"),
                   help="folder for the default storage, study folders and frozen configs")

    d = p.add_argument_group("study definition (stored in the study: give them to create it; on a rerun give the "
                             "same ones, or none to resume it as stored)")
    # --model None: not given (a new study uses DEFAULT_MODEL, a rerun the stored one)
    add_model_args(d, model_default=None, model_help=f"{MODEL_HELP} (a new study's default: {DEFAULT_MODEL})")
    d.add_argument("--prompts", type=Path, help="prompt file (.jsonl manifest or one prompt a line); required for a "
                                                "new study")
    d.add_argument("--seed", type=seed_int,
                   help="seed of the first prompt without its own seed; the next get +1 (default: 0)")
    d.add_argument("--recipe", type=Path, help="base recipe JSON (default: plain BF16); its cache is replaced by each "
                                               "trial's")
    d.add_argument("--steps", type=positive_int, help="denoising steps (overrides the base recipe)")
    d.add_argument("--height", type=int, help="image height (overrides the base recipe)")
    d.add_argument("--width", type=int, help="image width (overrides the base recipe)")
    d.add_argument("--calibration", type=Path, help="calibration fit.json: TeaCache's coefficients and MagCache's "
                                                    "ratios (default: the published FLUX.2 [dev] coefficients, and "
                                                    "no MagCache)")
    d.add_argument("--methods", help="comma-separated step caches to search: teacache, taylorseer, magcache, "
                                     "first_block, seacache (default: every one that can run; magcache needs a "
                                     "--calibration with its ratios)")
    d.add_argument("--grid", type=Path, help="YAML/JSON file {teacache: {threshold: [...], ret_steps: [...]}, "
                                             "taylorseer: {cache_interval: [...]}, ..., transformer_precision: "
                                             "[...]}; flat threshold, ret_steps, cutoff_steps are TeaCache's")
    d.add_argument("--threshold", help="comma-separated TeaCache thresholds (default: 0.02,0.05,0.1,0.2)")
    d.add_argument("--ret-steps", help="comma-separated TeaCache ret_steps (default: 0, 10%% and 20%% of the steps)")
    d.add_argument("--cutoff-steps", help="comma-separated TeaCache cutoff_steps; 'none' = no cutoff (default: not "
                                          "searched)")
    d.add_argument("--space", action="append", metavar="METHOD.SETTING=V1,V2",
                   help="values of any method's setting, e.g. taylorseer.cache_interval=2,3 or "
                        "teacache.residual_order=0 (repeat for more; wins over --grid)")
    d.add_argument("--precision", help="comma-separated transformer precisions, e.g. bf16,fp8 (default: not searched)")
    d.add_argument("--sampler", choices=["grid", "tpe"], help="grid (every point of every method; the default) or tpe "
                                                              "(--n-trials trials: a method, then its settings "
                                                              "within the grid's ranges)")
    d.add_argument("--n-trials", type=positive_int, help="number of trials for --sampler tpe")
    d.add_argument("--sampler-seed", type=sampler_seed_int, help="seed of the grid order / TPE (default: 0)")
    d.add_argument("--quality-metric", choices=["auto", "lpips", "psnr", "ssim"],
                   help="quality objective (default: auto, i.e. lpips when its weights are found, else ssim)")
    d.add_argument("--speed-metric", choices=["time", "computed"],
                   help="speed objective: measured time per image (the default) or the fraction of the block stack "
                        "computed (steadier where timings are noisy, e.g. a busy CPU)")

    r = p.add_argument_group("running")
    r.add_argument("--workers", type=positive_int, default=1, help="local worker processes, each on its own GPU where there "
                                                          "are several (1: run in this process)")
    r.add_argument("--keep-pipelines", type=positive_int, default=1,
                   help="pipelines kept loaded when transformer precision is searched (each is a whole model)")
    r.add_argument("--retry-failed", action="store_true",
                   help="run again the grid points whose trials failed with an error")
    r.add_argument("--quiet", action="store_true", help="no progress bar or summary (for worker processes)")
    r.add_argument("--worker-index", type=non_negative_int, default=0, help=argparse.SUPPRESS)
    add_weight_arguments(r)

    f = p.add_argument_group("freeze")
    f.add_argument("--freeze", action="store_true", help="write the fastest trial within the quality budget as a "
                                                         "frozen config")
    f.add_argument("--max-lpips", type=finite_float, help="quality budget: LPIPS at most X")
    f.add_argument("--min-psnr", type=finite_float, help="quality budget: PSNR at least X dB")
    f.add_argument("--min-ssim", type=finite_float, help="quality budget: SSIM at least X")
    f.add_argument("--out", type=Path, help="frozen config path (default: EXPERIMENTS/frozen/STUDY.json)")
    return p


# ----------------------------------------------------------------------------------------------- helpers


def _study_dir(args) -> Path:
    return args.experiments / "studies" / args.study


def _metric_weights(args, quality_metric: str | None):
    from flux2lab import metrics
    from flux2lab import study as st

    return st.trial_weights(metrics.weight_paths(args), device=args.device, skip_missing=args.skip_missing,
                            quality_metric=quality_metric)


def _config_from_args(args, weights):
    from flux2lab import study as st

    return st.make_config(
        model=args.model or DEFAULT_MODEL, prompts=args.prompts, weights=weights, seed=args.seed, recipe=args.recipe,
        overrides=shape_overrides(args),
        calibration=args.calibration, grid=args.grid, methods=args.methods, space_overrides=args.space or (),
        flags={"threshold": args.threshold, "ret_steps": args.ret_steps, "cutoff_steps": args.cutoff_steps,
               "transformer_precision": args.precision},
        sampler=args.sampler, n_trials=args.n_trials, sampler_seed=args.sampler_seed,
        quality_metric=args.quality_metric, speed_metric=args.speed_metric)


def _best(study, config) -> str:
    from flux2lab import study as st

    out = []
    for t in st.pareto_front(study, config)[:3]:
        speed = (f"{t.user_attrs['time_per_image']:.2f}s" if config.speed_metric == "time"
                 else f"{t.user_attrs['computed_fraction']:.0%}computed")
        out.append(f"{speed}/{config.quality_metric} {float(t.user_attrs['metrics'][config.quality_metric]):.3g}")
    return "best: " + " | ".join(out) if out else ""


def _summary(study, config, args, storage_url: str, status) -> str:
    from flux2lab import study as st

    unit = "grid points" if config.sampler == "grid" else "trials"
    lines = [(f"study {args.study}: {status.done}/{status.total} {unit} done ({status.complete} complete, "
              f"{len(status.failed)} failed); storage {st.display_url(storage_url)}")]
    for t in status.failed:
        lines.append(f"  failed: trial {t.number} ({st.describe_point(config.trial_point(t))}): "
                     f"{t.user_attrs['fail_reason']}")
    if status.failed:
        lines.append("  (rerun with --retry-failed to try failed points again)")
    if status.done < status.total:
        lines.append(f"  {status.total - status.done} {unit} not done: rerun the command to finish the study.")
    front = st.pareto_front(study, config)
    if front:
        speed = "time per image" if config.speed_metric == "time" else "share of the block stack computed"
        lines += ["", f"Pareto front ({speed} vs {config.quality_metric}, against the uncached reference):",
                  st.format_table(front, config)]
        plot = st.plot_pareto(study, config, _study_dir(args) / "pareto.png")
        lines += ["", f"plot: {plot}",
                  f"freeze: python -m flux2lab.search --study {args.study}"
                  + (f" --storage {st.display_url(storage_url)}" if args.storage else "")
                  + (f" --experiments {args.experiments}" if args.experiments != Path("experiments") else "")
                  + f" --freeze --{st.BUDGETS[config.quality_metric]}-{config.quality_metric} X"]
    return "\n".join(lines)


def _spawn(args, storage_url: str) -> tuple[list, str | None]:
    """The other `--workers` processes (this one is the first): this command as a quiet worker of the study.
    Returns the processes and the device for this process."""
    from flux2lab import metrics
    from flux2lab import study as st

    common = [sys.executable, "-m", "flux2lab.search", "--study", args.study, "--storage", storage_url,
              "--experiments", str(args.experiments), "--quiet", "--keep-pipelines", str(args.keep_pipelines)]
    if args.dtype:
        common += ["--dtype", args.dtype]
    for name, path in metrics.weight_paths(args).items():
        common += [metrics.METRICS[name].weights.flag, str(path)]
    if args.skip_missing:
        common.append("--skip-missing")
    return st.start_workers(args.workers, args.device, lambda index, device: [
        *common, "--worker-index", str(index), *(["--device", device] if device else [])])


# -------------------------------------------------------------------------------------------------- main


def _freeze(args, storage, storage_url: str) -> int:
    from flux2lab import study as st
    from flux2lab.common.files import check_output_file

    study, config = st.load_study(args.study, storage)
    bounds = {k: getattr(args, f"{side}_{k}") for k, side in st.BUDGETS.items()}  # --max-lpips, --min-psnr...
    budgets = {k: v for k, v in bounds.items() if v is not None}
    trial = st.select(study, config, budgets)
    out = check_output_file(args.out or args.experiments / "frozen" / f"{args.study}.json", "--out")
    if out.exists():
        raise Flux2LabError(f"{out} exists; frozen configs are not overwritten. Give another --out PATH.")
    path = st.freeze_trial(study, config, trial, out, storage_url=storage_url, budgets=budgets)
    print(f"trial {trial.number} ({st.describe_point(config.trial_point(trial))}) is the fastest within "
          f"{st.describe_budgets(budgets)}:")
    print(st.format_table([trial], config))
    print(f"frozen config: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import optuna
    from tqdm.auto import tqdm

    from flux2lab import study as st
    from flux2lab.pipeline.models import check_source

    if args.model is not None:
        check_source(args.model)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported by this command, once each
    storage_url = args.storage or st.default_storage(args.experiments)
    storage = st.open_storage(storage_url)
    if args.freeze:
        return _freeze(args, storage, storage_url)

    defining = any(getattr(args, k) is not None for k in DEFINING)
    weights = _metric_weights(args, args.quality_metric)
    config = _config_from_args(args, weights) if defining else None
    study, config = st.create_or_load(args.study, storage, config)
    if config.quality_metric not in weights:
        _metric_weights(args, config.quality_metric)  # the study's objective needs its weights on every worker
    study.sampler = config.make_sampler(config.sampler_seed + args.worker_index)

    bar = tqdm(total=config.total, desc=f"study {args.study}", unit="pt" if config.sampler == "grid" else "trial",
               disable=args.quiet)
    say = (lambda m: None) if args.quiet else bar.write
    reported: set[int] = set()

    def update(status) -> None:
        for t in status.failed:
            if t.number not in reported:
                reported.add(t.number)
                say(f"trial {t.number} ({st.describe_point(config.trial_point(t))}) failed: "
                    f"{t.user_attrs['fail_reason']}")
        bar.n = status.done
        bar.set_postfix_str(_best(study, config), refresh=True)

    if args.retry_failed:
        st.recover(study, config, retry_failed=True, notify=say)
    procs, device = _spawn(args, storage_url) if args.workers > 1 else ([], args.device)
    try:
        runner = st.TrialRunner(study, config, _study_dir(args), device=device, dtype=args.dtype,
                                weights=weights, keep_pipelines=args.keep_pipelines, progress=not args.quiet)
        st.run_worker(study, config, runner, on_update=update, notify=say)
        st.wait_for_workers(procs, study, config, on_update=update)  # they finish their last trials
    finally:
        st.stop_workers(procs)
    for i, p in enumerate(procs, start=1):
        if p.returncode:
            say(f"worker {i} exited with status {p.returncode} (its messages are above).")
    status = st.status(study, config)
    update(status)
    bar.close()
    if not args.quiet:
        print(_summary(study, config, args, storage_url, status))
    return 0


if __name__ == "__main__":
    run_main(main)
