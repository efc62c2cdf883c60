"""`python -m flux2lab.demo`: the whole toolkit, start to finish, in one command.

    python -m flux2lab.demo                                          # built-in model, CPU, a few minutes
    python -m flux2lab.demo --model black-forest-labs/FLUX.2-dev     # the real thing on a GPU (50 steps, 1024 px)

Stages, in one process through the library, each writing under --out (default experiments/demo):
calibrate TeaCache -> fit the polynomial -> search across step caches (TeaCache at thresholds derived from the
fit, TaylorSeer, SeaCache: one Pareto front) -> compare BF16 vs NVFP4 -> freeze the fastest trial of any method
within the quality budget -> run the frozen config ->
benchmark the speed ladder -> report. `demo.json` records every stage with the command that repeats it on its
own; the report is OUT/report/index.html.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flux2lab.cli import add_model_args, command_parser, non_negative_float, run_main
from flux2lab.workflow.plan import (
    BUDGETS,
    PLANS,
    STUDY,
    Plan,
    default_model,
    prepare_out,
    prompt_sets,
    space_flags,
    thresholds_from_fit,
    write_manifest,
)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "demo",
        description="Run every flux2lab stage in order on one model: TeaCache calibration and fit, a search across "
                    "step caches (TeaCache, TaylorSeer, SeaCache), BF16 vs NVFP4 quality, freeze, run, speed "
                    "benchmark and the report. "
                    "Without --model it uses the built-in model on this machine (no weights, no GPU needed).",
    )
    add_model_args(p, model_default=None,
                   model_help="mini (when its trained weights are installed, else tiny) | a hub id such as "
                              "black-forest-labs/FLUX.2-dev | a local diffusers folder (the real model needs a GPU)")
    p.add_argument("--out", type=Path, default=Path("experiments/demo"),
                   help="where every stage writes; the report is OUT/report/index.html. A previous demo there is "
                        "replaced; any other non-empty folder is refused")
    p.add_argument("--quick", action="store_true",
                   help="the least work that fills every report section (tests; numbers are not meaningful)")
    p.add_argument("--budget", type=non_negative_float,
                   help="quality budget of the freeze on the study's quality metric: max LPIPS (default: "
                        f"{BUDGETS['lpips']}) when LPIPS weights are found, else min SSIM (default: {BUDGETS['ssim']})")
    return p


def choose_plan(model: str, device: str, quick: bool) -> Plan:
    """The plan for this model and device; a model the demo cannot run here fails before any work."""
    from flux2lab.common.errors import Flux2LabError
    from flux2lab.pipeline.models import BUILTIN, check_source

    check_source(model)
    if model == "full-random":
        raise Flux2LabError("model 'full-random' has no VAE, so quality cannot be measured; the demo needs a model "
                            "that makes images: tiny, mini, or the real weights (--model black-forest-labs/FLUX.2-dev).")
    if quick:
        return PLANS["quick"]
    if model in BUILTIN:
        return PLANS["builtin"]
    if not device.startswith("cuda"):
        raise Flux2LabError(f"model {model!r} is the full-size FLUX.2 (32B parameters); it needs a CUDA GPU with "
                            "about 80 GB. Run the demo there, or leave out --model to use the built-in model here.")
    return PLANS["full"]


# ------------------------------------------------------------------------------------------------ the demo


class Demo:
    """The stages, in order; each records itself in demo.json (rewritten after every stage)."""

    def __init__(self, args: argparse.Namespace, model: str, device: str, plan: Plan, say: Callable[[str], None]):
        self.args, self.model, self.device, self.plan, self.say = args, model, device, plan, say
        self.out: Path = args.out
        self.dtype = args.dtype
        self.common = ["--model", model] + (["--device", args.device] if args.device else []) + (
            ["--dtype", args.dtype] if args.dtype else [])
        size = ["--height", str(plan.size), "--width", str(plan.size)] if plan.size else []
        self.shape = ["--steps", str(plan.steps), *size]
        self.record: dict[str, Any] = {
            "schema": "flux2lab.demo/1", "command": "python -m flux2lab.demo " + shlex.join(args.argv),
            "model": model, "device": device, "plan": asdict(plan), "stages": [], "skipped_metrics": {},
            "notes": [],
        }
        self.started = time.perf_counter()

    # -- bookkeeping

    def stage(self, name: str, command: list[str], fn: Callable[[], str]) -> None:
        """Run one stage, print one line about it, and record it with the command that repeats it alone."""
        t0 = time.perf_counter()
        line = fn()
        wall = time.perf_counter() - t0
        self.record["stages"].append({"name": name, "command": shlex.join(command), "wall_s": wall})
        self.record["wall_s"] = time.perf_counter() - self.started
        self.save()
        self.say(f"[{len(self.record['stages'])}/8] {name:<9} {wall:6.1f} s  {line}")

    def save(self) -> None:
        (self.out / "demo.json").write_text(json.dumps(self.record, indent=2) + "\n")

    @contextlib.contextmanager
    def log(self, name: str) -> Iterator[None]:
        """Stage libraries that print (progress bars, per-rung lines) write to OUT/logs/NAME.log instead."""
        path = self.out / "logs" / f"{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            yield

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    # -- the stages

    def run(self) -> Path:
        self.sets = prompt_sets(self.model, self.plan)
        self.manifests = {}
        from flux2lab.pipeline.prompts import seeds_for

        for name, entries in self.sets.items():
            seeds = seeds_for(entries, 0)
            self.manifests[name] = (write_manifest(self.path("prompts", f"{name}.jsonl"), entries, seeds), seeds)
        self.metric_weights()
        self.stage("calibrate", ["python", "-m", "flux2lab.calibrate", *self.common, "--prompts",
                                 str(self.manifests["calibration"][0]), "--out", str(self.path("calibration")),
                                 "--name", STUDY, *self.shape, "--ret-steps", str(self.ret_steps[0])],
                   self.calibrate)
        self.stage("fit", ["python", "-m", "flux2lab.calibrate", "--out", str(self.path("calibration")), "--name",
                           STUDY, "--fit-only", "--ret-steps", str(self.ret_steps[0])], self.fit)
        self.stage("search", self.search_command(), self.search)
        self.stage("compare", ["python", "-m", "flux2lab.compare", *self.common, "--a", "bf16", "--b", "nvfp4",
                               "--prompts", str(self.manifests["quality"][0]), *self.shape, "--metrics",
                               ",".join(self.weights), "--cache", str(self.path("image_cache")), "--out",
                               str(self.path("compare", "bf16-vs-nvfp4")), "--skip-missing"], self.compare)
        self.stage("freeze", ["python", "-m", "flux2lab.search", "--study", STUDY, "--experiments", str(self.out),
                              "--freeze", f"--{self.budget_flag}", f"{self.budget:g}", "--out",
                              str(self.path("frozen", f"{STUDY}.json"))], self.freeze)
        self.stage("run", self.run_argv(prefix=True), self.run_frozen)
        self.stage("bench", self.bench_command(), self.bench)
        self.stage("report", ["python", "-m", "flux2lab.report", "--experiments", str(self.out), "--out",
                              str(self.path("report"))], self.report)
        return self.path("report", "index.html")

    @property
    def ret_steps(self) -> list[int]:
        return sorted({max(1, round(f * self.plan.steps)) for f in self.plan.ret_steps_fractions})

    def recipe(self):
        from flux2lab.pipeline.recipe import Recipe

        return Recipe(steps=self.plan.steps, height=self.plan.size, width=self.plan.size)

    def metric_weights(self) -> None:
        """Which metrics can run here. Those whose weights are not found offline are skipped (never downloaded),
        and the reason is printed and kept for the report."""
        from flux2lab.common.errors import Flux2LabError
        from flux2lab.metrics import MetricOptions, check_weights
        from flux2lab.quality.comparison import DEFAULT_METRICS
        from flux2lab.study import BUDGETS as BUDGET_SIDES

        options = MetricOptions(device=self.device)
        names = list(DEFAULT_METRICS) + (["yardstick"] if self.model == "mini" else [])
        self.weights: dict[str, Path | None] = {}
        for name in names:  # one at a time, so each missing file gets its own reason
            try:
                self.weights.update(check_weights([name], options=options))
            except Flux2LabError as e:
                self.record["skipped_metrics"][name] = str(e).splitlines()[0]
        skipped = self.record["skipped_metrics"]
        self.say(f"metrics: {', '.join(self.weights)}"
                 + (f"; skipped (weights not found offline, nothing is downloaded): {', '.join(skipped)}"
                    if skipped else ""))
        for name, why in skipped.items():
            self.say(f"  {name}: {why}")
        self.quality_metric = "lpips" if "lpips" in self.weights else "ssim"
        self.budget_flag = f"{BUDGET_SIDES[self.quality_metric]}-{self.quality_metric}"
        self.budget = self.args.budget if self.args.budget is not None else BUDGETS[self.quality_metric]

    def calibrate(self) -> str:
        from flux2lab import calibration
        from flux2lab.pipeline.models import free_memory, load_pipeline

        entries, seeds = self.sets["calibration"], self.manifests["calibration"][1]
        recipe = calibration.recording_recipe(self.plan.steps, self.plan.size, self.plan.size)
        pipe = load_pipeline(self.model, device=self.args.device, dtype=self.dtype)
        with self.log("calibrate"):
            result = calibration.record(pipe, entries, seeds, self.path("calibration", STUDY), recipe,
                                        model=self.model, manifest=self.manifests["calibration"][0])
        del pipe
        free_memory()
        kinds = sorted({e.kind for e in entries})
        return (f"recorded {result.recorded} prompts ({', '.join(kinds)}) x {self.plan.steps} steps "
                f"-> {self.path('calibration', STUDY, 'samples.csv')}")

    def fit(self) -> str:
        from flux2lab import calibration
        from flux2lab.common.formatting import fmt_number

        run_dir = self.path("calibration", STUDY)
        self.fit_json = calibration.fit_run(run_dir, ret_steps=self.ret_steps[0])
        self.thresholds = thresholds_from_fit(self.fit_json, self.plan.threshold_multiples)
        heldout = self.fit_json["heldout"]["r2"]
        self.say(f"      {self.fit_json['skip_limits']['advice'][0]}")
        return (f"R² {fmt_number(self.fit_json['r2'], '.3f', missing='undefined')}, held-out R² "
                f"{fmt_number(heldout, '.3f', missing='n/a')}; "
                f"search thresholds from the fit: {', '.join(f'{t:g}' for t in self.thresholds)} "
                f"-> {run_dir / 'fit.png'}")

    def search_space(self) -> dict[str, Any]:
        """The search's methods and values as the search command's flags take them: TeaCache's thresholds read
        off the fit and its ret_steps, the plan's other settings as `--space` items."""
        return {"methods": ",".join(self.plan.cache_space),
                "flags": {"threshold": ",".join(f"{t:g}" for t in self.thresholds),
                          "ret_steps": ",".join(map(str, self.ret_steps))},
                "space_overrides": space_flags(self.plan)}

    def search_command(self) -> list[str]:
        space = self.search_space()
        return ["python", "-m", "flux2lab.search", "--study", STUDY, "--experiments", str(self.out), *self.common,
                "--prompts", str(self.manifests["search"][0]), "--calibration",
                str(self.path("calibration", STUDY, "fit.json")), *self.shape, "--methods", space["methods"],
                "--threshold", space["flags"]["threshold"], "--ret-steps", space["flags"]["ret_steps"],
                *(a for item in space["space_overrides"] for a in ("--space", item)),
                "--quality-metric", self.quality_metric, "--speed-metric", self.speed_metric, "--skip-missing"]

    @property
    def speed_metric(self) -> str:
        # On a CPU that other work shares, time per image of a toy model is mostly noise; the share of the block
        # stack computed is what the speed follows there. On a GPU, time is measured and meaningful.
        return "time" if self.device.startswith("cuda") else "computed"

    def search(self) -> str:
        import optuna

        from flux2lab import study as st
        from flux2lab.pipeline.models import free_memory

        # The configuration `python -m flux2lab.search` makes from the same flags (search_command).
        config = st.make_config(
            model=self.model, prompts=self.manifests["search"][0], weights=self.weights,
            overrides={"steps": self.plan.steps, "height": self.plan.size, "width": self.plan.size},
            calibration=self.path("calibration", STUDY, "fit.json"), **self.search_space(),
            quality_metric=self.quality_metric, speed_metric=self.speed_metric)
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # trials are summarised below, failures in notes
        self.storage_url = st.default_storage(self.out)
        storage = st.open_storage(self.storage_url)
        self.study, self.config = st.create_or_load(STUDY, storage, config)
        # What `python -m flux2lab.search` scores trials with (FID of a handful of images would say nothing).
        paired = {k: v for k, v in self.weights.items() if k in ("lpips", "psnr", "ssim", "clip")}
        runner = st.TrialRunner(self.study, self.config, self.path("studies", STUDY), device=self.args.device,
                                dtype=self.dtype, weights=paired)
        with self.log("search"):
            status = st.run_worker(self.study, self.config, runner)
        del runner
        free_memory()
        st.plot_pareto(self.study, self.config, self.path("studies", STUDY, "pareto.png"))
        front = st.pareto_front(self.study, self.config)
        if status.failed:
            self.record["notes"].append(f"search: {len(status.failed)} trial(s) failed: "
                                        + "; ".join(t.user_attrs["fail_reason"] for t in status.failed))
        methods = ", ".join(f"{t.number} ({self.config.trial_point(t)['method']})" for t in front)
        return (f"{status.complete}/{status.total} grid points of {len(self.config.search_space.methods)} methods, "
                f"{len(status.failed)} failed; Pareto front: trials {methods} "
                f"-> {self.storage_url.removeprefix('sqlite:///')}")

    def compare(self) -> str:
        from flux2lab.metrics import MetricOptions
        from flux2lab.pipeline.models import free_memory
        from flux2lab.quality.comparison import compare

        base = self.recipe()
        entries, seeds = self.sets["quality"], self.manifests["quality"][1]
        with self.log("compare"):
            result = compare(self.model, base, base.replace(transformer_precision="nvfp4"), entries, seeds,
                             self.weights, self.path("image_cache"), labels=("bf16", "nvfp4"),
                             device=self.args.device, dtype=self.dtype,
                             options=MetricOptions(device=self.device), progress=False)
        free_memory()
        paths = result.write(self.path("compare", "bf16-vs-nvfp4"))
        shown = [f"{n} {m.value:.4g}" for n, m in result.metrics.items() if n in ("psnr", "ssim", "lpips",
                                                                                  "accuracy_delta")]
        return f"{len(entries)} prompts: {', '.join(shown)} -> {paths['grid']}"

    def freeze(self) -> str:
        from flux2lab import study as st
        from flux2lab.common.errors import Flux2LabError

        budgets = {self.quality_metric: self.budget}
        try:
            trial = st.select(self.study, self.config, budgets)
        except Flux2LabError as e:
            raise Flux2LabError(f"{e}\nThe demo's budget is {st.describe_budgets(budgets)}; give a looser one "
                                "with --budget X.") from None
        self.frozen = st.freeze_trial(self.study, self.config, trial, self.path("frozen", f"{STUDY}.json"),
                                      storage_url=self.storage_url, budgets=budgets)
        from flux2lab.common.formatting import fmt_percent

        q = trial.user_attrs["metrics"][self.quality_metric]
        computed = fmt_percent(trial.user_attrs.get("computed_fraction"), missing="n/a")
        return (f"trial {trial.number} ({st.describe_point(self.config.trial_point(trial))}): {self.quality_metric} "
                f"{float(q):.4g}, {computed} of the block stack computed (fastest of any method within "
                f"{st.describe_budgets(budgets)}) -> {self.frozen}")

    def run_argv(self, prefix: bool = False) -> list[str]:
        argv = ["--config", str(self.path("frozen", f"{STUDY}.json")), "--prompts", str(self.manifests["run"][0]),
                "--out", str(self.path("run"))]
        argv += (["--device", self.args.device] if self.args.device else []) + (
            ["--dtype", self.args.dtype] if self.args.dtype else [])
        return ["python", "-m", "flux2lab.run", *argv] if prefix else argv

    def run_frozen(self) -> str:
        from flux2lab import run
        from flux2lab.pipeline.models import free_memory

        # The runner's library is its main(): called in this process, not as a subprocess.
        with self.log("run"):
            run.main(self.run_argv())
        free_memory()
        from flux2lab.common.formatting import fmt_percent

        summary = json.loads(self.path("run", "summary.json").read_text())
        return (f"{summary['images_made']} images, {summary['mean_wall_s']:.2f} s/image, {summary['cache_method']}: "
                f"{fmt_percent(summary['computed_fraction'], missing='n/a')} of the block stack computed "
                f"-> {self.path('run')}")

    def bench_command(self) -> list[str]:
        return ["python", "-m", "flux2lab.bench", *self.common, *self.shape, "--reps", str(self.plan.bench_reps),
                "--warmup", str(self.plan.bench_warmup), "--out", str(self.path("bench"))]

    def bench(self) -> str:
        from flux2lab.benchmark import Bench, BenchConfig, write_report
        from flux2lab.pipeline.models import free_memory

        out = self.path("bench")
        cfg = BenchConfig(model=self.model, device=self.args.device, dtype=self.args.dtype, steps=self.plan.steps,
                          height=self.plan.size, width=self.plan.size, reps=self.plan.bench_reps,
                          warmup=self.plan.bench_warmup, out=out, command=shlex.join(self.bench_command()))
        with self.log("bench"):
            result = Bench(cfg, on_update=lambda r: write_report(r, out), say=print).run()
        free_memory()
        ok = [r for r in result["rungs"] if r["status"] == "ok"]
        rungs = ", ".join(f"{r['name']} {r['speedup']:.2f}x" for r in ok)
        others = len(result["rungs"]) - len(ok)
        return (f"{rungs} on {result['environment']['device_name']}"
                + (f" ({others} rungs cannot run here; the report says why)" if others else "")
                + f" -> {out / 'bench.md'}")

    def report(self) -> str:
        from flux2lab.reporting import build, write

        self.save()  # the report reads demo.json: commands, skipped metrics
        report = build(self.out, title=f"flux2lab demo: {self.model}",
                       command=f"python -m flux2lab.report --experiments {self.out} --out {self.path('report')}")
        self.paths = write(report, self.path("report"))
        return "sections: " + ", ".join(s.id for s in report.sections)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    import torch

    from flux2lab.pipeline.models import BUILTIN, default_device

    model = args.model or default_model()
    device = args.device or default_device()
    plan = choose_plan(model, device, args.quick)
    if device == "cpu" and model in BUILTIN:
        # The built-in models' matrices are tiny: on a CPU, threads spend more time synchronising than computing.
        torch.set_num_threads(1)
    prepare_out(args.out)
    say = print
    say(f"flux2lab demo: model {model} on {device}, {plan.steps} steps"
        + (f", {plan.size}x{plan.size}" if plan.size else ", native size") + (" (--quick)" if args.quick else "")
        + f"; writing to {args.out}")
    if model == "tiny":
        say("  (tiny has random weights: every stage runs for real, but its quality numbers mean nothing; the "
            "trained 'mini' model is used once its weights are installed)")
    demo = Demo(args, model, device, plan, say)
    report = demo.run()
    say(f"done in {demo.record['wall_s']:.0f} s")
    say(f"report: {report}")
    return 0


if __name__ == "__main__":
    run_main(main)
