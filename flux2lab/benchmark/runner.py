"""One run of the ladder on one card: load, apply each rung's recipe, warm up, time images, write as it goes.

Rungs run one after the other in one process; each one that changes the model gets a freshly loaded pipeline
(the previous one is freed first: two full-size transformers do not fit one card), and consecutive rungs that
differ only in their step cache share one (unless its blocks were compiled with fullgraph=True, where diffusers'
caches cannot decide). A rung that cannot run here (no CUDA, no FP8 kernels, one GPU, a feature this build lacks,
a combination the recipe's validation refuses) is reported as skipped with the reason, and its change is left out
of the rungs above it. Time per
image = the whole pipeline call; warm-up images (compilation, graph capture) are not timed. With `timed_steps`
below `steps`, a timed image runs that many steps and its time is extrapolated as measured wall + remaining
steps x median step. The `xN-gpus` rung runs this same benchmark under `torchrun` on one recipe (Ulysses
sequence parallelism of degree N) when N GPUs are visible, and otherwise names the command that would.
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flux2lab import parallel
from flux2lab.benchmark.cachepoint import CachePoint, load_cache_point
from flux2lab.benchmark.floor import measure_floor, step_workload
from flux2lab.benchmark.fullsize import build_whole_random
from flux2lab.benchmark.ladder import Rung, default_ladder, default_precision, rung_recipe, select_rungs
from flux2lab.benchmark.provenance import GIB, environment
from flux2lab.benchmark.skips import RANDOM_WEIGHTS, SkipPlan, replay_skip_plan, skip_plan
from flux2lab.benchmark.summary import summarize
from flux2lab.benchmark.timing import DeviceClock, StepMarks, spread
from flux2lab.common.errors import FeatureNotAvailable, Flux2LabError
from flux2lab.pipeline.caches import DIFFUSERS_METHODS
from flux2lab.pipeline.core import COMPILED_FULLGRAPH, applied_recipe, apply, generate, resolution
from flux2lab.pipeline.models import (
    default_device,
    default_dtype,
    dtype_of,
    free_memory,
    image_tokens,
    load_pipeline,
    model_info,
)
from flux2lab.pipeline.recipe import Recipe, RecipeError

PROMPT = "a red fox standing in fresh snow at golden hour, detailed fur, soft light"


@dataclass
class BenchConfig:
    """What `python -m flux2lab.bench` was asked to do (also rebuilds the command for a torchrun child)."""

    model: str = "tiny"
    device: str | None = None
    dtype: str | None = None
    ladder: str = "default"
    recipe: Path | None = None
    precision: str | None = None
    gpus: tuple[int, ...] | None = None  # multi-GPU rungs; None: all visible GPUs (at least 2)
    steps: int | None = None  # None: 50 for the ladder, the recipe's own with `recipe`
    height: int | None = None
    width: int | None = None
    reps: int = 3
    warmup: int = 1
    warmup_steps: int = 3
    timed_steps: int | None = None
    teacache_schedule: str = "auto"  # the cache rung's replayed schedule on random weights (skips.skip_plan)
    cache: str | None = None  # the cache rung's frozen point: frozen config, recipe or preset (cachepoint)
    floor: bool = True
    whole_pipeline: bool = False  # full-random with the full-size text encoder and VAE
    out: Path = Path("reports/benchmarks/bench")
    command: str = ""

    def check(self) -> None:
        for name, low in (("steps", 2), ("reps", 1), ("warmup", 0), ("warmup_steps", 1), ("timed_steps", 2)):
            value = getattr(self, name)
            if value is not None and value < low:
                why = " (step times are intervals between step ends)" if low == 2 else ""
                raise Flux2LabError(f"--{name.replace('_', '-')} {value}: give an integer >= {low}{why}.")
        if self.whole_pipeline and self.model != "full-random":
            raise Flux2LabError(f"--whole-pipeline adds the full-size text encoder and VAE to --model full-random; "
                                f"'{self.model}' has its own (or none).")
        if self.gpus is not None and (not self.gpus or min(self.gpus) < 2):
            raise Flux2LabError(f"--gpus {','.join(map(str, self.gpus))}: give GPU counts of 2 or more, e.g. 2,4.")
        if self.cache is not None and self.recipe is not None:
            raise Flux2LabError("--cache sets the ladder's cache rung; with --recipe, put the step cache in the "
                                "recipe's `cache` field instead.")

    def child_args(self, recipe_file: Path, out: Path, schedule: str = "auto") -> list[str]:
        """The bench arguments that time one recipe (the multi-GPU rung under torchrun); `schedule` the
        --teacache-schedule that makes the parent's skip plan again."""
        args = ["--model", self.model, "--recipe", str(recipe_file), "--out", str(out), "--no-floor",
                "--reps", str(self.reps), "--warmup", str(self.warmup), "--warmup-steps", str(self.warmup_steps)]
        if self.timed_steps:
            args += ["--timed-steps", str(self.timed_steps)]
        if schedule != "auto":
            args += ["--teacache-schedule", schedule]
        if self.dtype:
            args += ["--dtype", self.dtype]
        if self.whole_pipeline:
            args.append("--whole-pipeline")
        return args


def visible_gpus(device: torch.device) -> int:
    """How many CUDA GPUs this process sees (0 on CPU)."""
    return torch.cuda.device_count() if device.type == "cuda" else 0


def gpu_memory_gib(device: torch.device, peak: bool = False) -> float | None:
    """GiB of GPU memory allocated now (or at its peak since the last reset); None on CPU."""
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / GIB


def time_images(pipe: Any, recipe: Recipe, cfg: BenchConfig, device: torch.device,
                plan: SkipPlan | None = None) -> dict[str, Any]:
    """Warm up, then time `cfg.reps` images of the recipe, and record which steps reused the step cache and the
    fraction of the block stack computed (checking a replayed plan was followed). The block counter runs in every
    image, as in `generate` and `run` (compiled blocks only see hooks present when they were compiled); under CUDA
    graphs, where it cannot count, the blocks replayed per step are counted instead."""
    from flux2lab.hooks.cudagraphs import graphs_of

    clock = DeviceClock(device)
    cached = recipe.cache.method != "none"
    # A cache rung warms up on the full schedule so its skip path is compiled/captured as it will be timed.
    warm = recipe if cached else recipe.replace(steps=min(cfg.warmup_steps, recipe.steps))
    graphs = graphs_of(pipe.transformer)
    probe = (lambda: graphs.replays) if graphs is not None else None
    t0 = time.perf_counter()
    for i in range(cfg.warmup):
        generate(pipe, [PROMPT], [1000 + i], warm, count_blocks=probe is None)
    warmup_s = time.perf_counter() - t0
    timed_steps = recipe.steps if cached or not cfg.timed_steps else cfg.timed_steps
    timed = recipe.replace(steps=timed_steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    walls, intervals, fractions = [], [], []
    t0 = time.perf_counter()
    for rep in range(cfg.reps):
        with StepMarks(pipe, clock, probe) as marks:
            record = generate(pipe, [PROMPT], [rep], timed, count_blocks=probe is None).records[0]
        intervals.append(marks.intervals())
        fractions.append([n / len(graphs.hooks) for n in marks.per_step()] if probe else record.step_fractions)
        walls.append((record.wall_s, statistics.median(intervals[-1])))
    timed_s = time.perf_counter() - t0
    counted = {"computed_fraction_source": "block counter" if probe is None else (
        "blocks replayed per step (under CUDA graphs a replayed block runs no Python, so its work is not counted)")}
    fractions = [fr for fr in fractions if fr]
    skipped = [sorted(i for i, f in enumerate(fr) if f < 1) for fr in fractions] or [[]] * cfg.reps
    if cached and plan is not None and plan.skip_steps is not None:
        for steps in skipped:
            if steps != sorted(plan.skip_steps):
                raise RuntimeError(f"the {recipe.cache.method} cache skipped steps {steps}, not the replayed "
                                   f"{list(plan.skip_steps)}")
    if fractions:
        counted["computed_fraction"] = statistics.mean(sum(fr) / len(fr) for fr in fractions)
        counted["step_fractions"] = fractions[0]
    extra = recipe.steps - timed_steps
    images = [wall + extra * step for wall, step in walls]
    steps = [t for rep in intervals for t in rep]
    computed = [t for rep, skips in zip(intervals, skipped) for i, t in enumerate(rep, start=1) if i not in skips]
    result = {
        "warmup_images": cfg.warmup, "warmup_steps": warm.steps, "warmup_s": warmup_s, "timed_s": timed_s,
        "reps": cfg.reps, "steps": recipe.steps, "timed_steps": timed_steps,
        "image_s": spread(images), "image_values_s": images,
        "image_extrapolated": extra > 0,
        "step_s": spread(steps), "computed_step_s": spread(computed),
        "effective_step_s": statistics.median(images) / recipe.steps,
        "peak_mem_gib": gpu_memory_gib(device, peak=True),
        "skipped_steps": skipped[0] if skipped else [],
        "skipped_identical_in_all_reps": all(s == skipped[0] for s in skipped),
        **counted,
    }
    if extra:
        result["note"] = (f"timed {timed_steps}-step images; per-image time = measured wall + {extra} x "
                          "median step (extrapolated to the full schedule)")
    return result


class Bench:
    """Runs the ladder on one card; `result` is what bench.json holds, rewritten after every rung."""

    def __init__(self, cfg: BenchConfig, on_update: Callable[[dict[str, Any]], None] | None = None,
                 say: Callable[[str], None] = print):
        cfg.check()
        self.cfg, self.on_update, self.say = cfg, on_update or (lambda r: None), say
        self.world, self.rank = parallel.world_size(), parallel.rank()  # (1, 0) outside torchrun
        self.pipe = None
        self.plan: SkipPlan | None = None  # the cache rung's skip plan, set by run()
        self.point: CachePoint | None = None  # the cache rung's frozen point (--cache), set by run()
        self.touched = False  # whether the current rung got as far as applying its recipe to the pipeline
        self.load_s: float | None = None

    def _base(self) -> Recipe:
        """The ladder's first recipe, or the one recipe given, with --steps/--height/--width applied."""
        cfg = self.cfg
        recipe = Recipe.load(cfg.recipe) if cfg.recipe is not None else Recipe(steps=50)
        changes = {k: getattr(cfg, k) for k in ("steps", "height", "width") if getattr(cfg, k) is not None}
        return recipe.replace(**changes)

    def _ladder(self, base: Recipe, device: torch.device) -> tuple[list[Rung], set[str]]:
        precision = self.cfg.precision or default_precision(device)
        visible = visible_gpus(device)
        ladder = default_ladder(precision, self.cfg.gpus or (max(visible, 2),), base.steps, self.point)
        return ladder, select_rungs(ladder, self.cfg.ladder)

    def _plan(self, base: Recipe, rungs: list[Rung]) -> SkipPlan | None:
        """The skip plan for the ladder's (or the given recipe's) cache rung, if it has one."""
        recipe = Recipe(steps=base.steps, cache=base.cache)  # the cache alone: its combinations are the rungs' business
        for rung in rungs:
            if "cache" in rung.changes:
                recipe = recipe.replace(cache=rung.changes["cache"])
        if recipe.cache.method == "none":
            return None
        return skip_plan(self.cfg.teacache_schedule, self.cfg.model not in RANDOM_WEIGHTS, recipe, self.point)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.world > 1 and cfg.recipe is None:
            raise Flux2LabError(
                "under torchrun the benchmark times one recipe on all ranks: give --recipe FILE. (The single-"
                "process bench writes <out>/xN-gpus/recipe.json and runs or prints that command itself.)"
            )
        started = time.perf_counter()
        base = self._base()
        if cfg.timed_steps is not None and cfg.timed_steps > base.steps:
            raise Flux2LabError(f"--timed-steps {cfg.timed_steps} is more than the {base.steps} steps of an image.")
        # Everything the user can get wrong is checked before a (possibly 60 GiB) model is loaded.
        device = torch.device(cfg.device or default_device())
        self.point = load_cache_point(cfg.cache) if cfg.cache is not None else None
        if cfg.recipe is not None:
            rungs = [Rung(cfg.recipe.stem, {}, f"recipe {cfg.recipe}")]
            selected = {rungs[0].name}
        else:
            rungs, selected = self._ladder(base, device)
        self.plan = plan = self._plan(base, rungs)
        t0 = time.perf_counter()
        self.pipe = self._load(cfg.device)
        self.load_s = time.perf_counter() - t0  # reported by the first rung that uses this pipeline
        info = model_info(self.pipe)
        device = self.pipe.transformer.device
        height, width = resolution(self.pipe, base)
        self.result = result = {
            "schema": "flux2lab.bench/1",
            "command": cfg.command,
            "measured": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "environment": environment(device),
            "model": {"source": info.source, "kind": info.kind, "revision": info.revision},
            "coverage": ("transformer only: denoising loop on synthetic prompt embeddings, no text encoder or VAE"
                         if info.synthetic_text else "whole pipeline: text encoder, denoising loop and VAE decode"),
            "height": height, "width": width, "steps": base.steps,
            "settings": {"reps": cfg.reps, "warmup": cfg.warmup, "warmup_steps": cfg.warmup_steps,
                         "timed_steps": cfg.timed_steps or base.steps, "ladder": cfg.ladder,
                         "cache_schedule": plan.describe if plan else None,
                         "cache_schedule_meaningless": bool(plan and plan.meaningless),
                         "cache_point": self.point.to_dict() if self.point else None, "ranks": self.world},
            "timing": ("per step: CUDA events at the end of every denoising step (scheduler.step), interval "
                       "between consecutive ends, first step excluded; per image: the whole pipeline call "
                       "(synchronised wall clock); warm-up images excluded"
                       if device.type == "cuda" else "host clock (CPU run)"),
            "floor": None, "rungs": [], "targets": [],
        }
        if cfg.floor:
            self.say(f"floor: timing one step's GEMMs and attention on {result['environment']['device_name']}")
            work = step_workload(dict(self.pipe.transformer.config), image_tokens(self.pipe, height, width),
                                 info.max_sequence_length)
            result["floor"] = measure_floor(work, device, self.pipe.transformer.dtype)
        else:
            result["floor"] = {"skipped": "--no-floor"}
        self._update()

        # Every rung builds on the ones below it, timed or not; one that cannot run here drops out of the rest.
        current, dropped = base, []
        for rung in rungs:
            try:
                recipe, left_out = rung_recipe(current, rung)
            except RecipeError as e:  # a combination validation refuses (e.g. a cache deciding per rank, N GPUs)
                if rung.name in selected:
                    result["rungs"].append({"name": rung.name, "adds": rung.adds, "status": "skipped", "recipe": None,
                                            "reason": f"refused before any model work: {e}"})
                    self.say(f"rung {rung.name}: skipped: {e}")
                if rung.gpus == 1:
                    dropped.append(rung.name)
                continue
            if rung.name not in selected:
                if rung.gpus == 1:
                    try:
                        self._precheck(rung, recipe, device)
                        current = recipe
                    except Flux2LabError:  # FeatureNotAvailable, or a precision this dtype cannot take
                        dropped.append(rung.name)
                continue
            row = {"name": rung.name, "adds": rung.adds, "status": "ok", "recipe": recipe.to_dict()}
            if dropped or left_out:
                row["without"] = [*dropped, *(name for name, _ in left_out if name not in dropped)]
            if left_out:
                row["without_because"] = "; ".join(why for _, why in left_out)
            self.say(f"rung {rung.name}: {rung.adds}")
            self.touched = False
            try:
                row.update(self._run_rung(rung, recipe, device))
            except FeatureNotAvailable as e:
                row.update(status="skipped", reason=str(e))
            except (torch.OutOfMemoryError, Flux2LabError) as e:
                row.update(status="failed", reason=f"{type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 - a bug: keep its traceback, but let the other rungs run
                traceback.print_exc()
                row.update(status="failed", reason=f"{type(e).__name__}: {e} (a flux2lab bug; traceback above)")
            if row["status"] == "ok" and rung.gpus == 1:
                current = recipe
            elif row["status"] != "ok" and rung.gpus == 1:
                dropped.append(rung.name)
            if row["status"] != "ok" and self.touched:  # apply may have half-changed it
                self._discard()
            if row["status"] != "ok":
                self.say(f"  {row['status']}: {row['reason']}")
            result["rungs"].append(row)
            summarize(result)
            self._update()
        if self.pipe is not None:
            self._discard()
        result["wall_s"] = time.perf_counter() - started
        self._update()
        return result

    def _load(self, device: str | None) -> Any:
        if self.cfg.whole_pipeline:
            return build_whole_random(device, dtype_of(self.cfg.dtype))
        return load_pipeline(self.cfg.model, device=device, dtype=dtype_of(self.cfg.dtype))

    def _discard(self) -> None:
        """Drop the pipeline and everything compiled or captured for it, and give its memory back to the driver
        (the full-size loader checks the driver's free memory) before the next one is loaded."""
        if self.pipe is None:
            return
        self.pipe, self.load_s = None, None  # the only reference: nothing else here keeps the pipeline
        torch._dynamo.reset()  # stale compiled blocks would otherwise pile up against the recompile limit
        free_memory()

    def _run_rung(self, rung: Rung, recipe: Recipe, device: torch.device) -> dict[str, Any]:
        if recipe.ulysses_degree > 1 and self.world == 1:
            return self._run_under_torchrun(rung, recipe, device)
        self._precheck(rung, recipe, device)
        row: dict[str, Any] = {}
        if self.pipe is not None and (done := applied_recipe(self.pipe)) is not None and done.model_changes(recipe):
            self._discard()
        if (self.pipe is not None and recipe.cache.method in DIFFUSERS_METHODS
                and getattr(self.pipe.transformer, COMPILED_FULLGRAPH, False)):
            self._discard()  # its blocks were compiled with fullgraph=True, where diffusers' caches cannot decide
        if self.pipe is None:
            t0 = time.perf_counter()
            self.pipe = self._load(str(device))
            row["load_s"] = time.perf_counter() - t0
        elif self.load_s is not None:
            row["load_s"], self.load_s = self.load_s, None
        else:
            row["reused_pipeline"] = True
        if recipe.ulysses_degree > 1:
            parallel.check_sequence(self.pipe, *resolution(self.pipe, recipe),
                                    model_info(self.pipe).max_sequence_length, recipe.ulysses_degree)
        t0 = time.perf_counter()
        self.touched = True
        apply(self.pipe, recipe)
        row["apply_s"] = time.perf_counter() - t0
        row["weights_gib"] = gpu_memory_gib(device)
        if recipe.cache.method != "none":
            replay_skip_plan(self.pipe, recipe, self.plan)
            row.update(cache_method=recipe.cache.method, cache_settings=recipe.cache.to_dict(),
                       cache_schedule=self.plan.describe, cache_schedule_meaningless=self.plan.meaningless)
        row.update(time_images(self.pipe, recipe, self.cfg, device, self.plan))
        return row

    def _precheck(self, rung: Rung, recipe: Recipe, device: torch.device) -> None:
        """Raise FeatureNotAvailable for what is known not to run here before a pipeline is loaded for it (so
        the loaded one stays reusable)."""
        if recipe.cuda_graphs and device.type != "cuda":
            raise FeatureNotAvailable(f"CUDA graphs need a CUDA GPU; this run is on '{device}'.")
        if recipe.transformer_precision != "bf16":
            from flux2lab.quantizers import resolve_backend

            dtype = (self.pipe.transformer.dtype if self.pipe is not None
                     else dtype_of(self.cfg.dtype) or default_dtype(device))
            resolve_backend(recipe.transformer_precision, recipe.quant_backend, device, dtype)

    def _run_under_torchrun(self, rung: Rung, recipe: Recipe, device: torch.device) -> dict[str, Any]:
        n = recipe.ulysses_degree
        folder = self.cfg.out / rung.name
        recipe_file = folder / "recipe.json"
        child = self.cfg.child_args(recipe_file, folder, self.plan.spec if self.plan else "auto")
        shown = shlex.join(["torchrun", "--standalone", f"--nproc-per-node={n}", "-m", "flux2lab.bench", *child])
        visible = visible_gpus(device)
        if visible < n:
            recipe.save(recipe_file)
            raise FeatureNotAvailable(
                f"needs {n} GPUs, {visible} visible here. On a machine with {n} GPUs, run the whole ladder there, "
                f"or this rung alone: {shown}"
            )
        recipe.save(recipe_file)
        self._discard()  # every rank loads its own copy; this process's card is one of them
        self.say(f"  launching: {shown}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "flux2lab.bench", *child]
        (folder / "bench.json").unlink(missing_ok=True)
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        bench_json = folder / "bench.json"
        child_rungs = json.loads(bench_json.read_text())["rungs"] if bench_json.is_file() else []
        if not child_rungs:
            lines = proc.stderr.strip().splitlines()
            tail = [ln for ln in lines if ln.startswith("error: ")] or lines[-15:]
            raise Flux2LabError(f"the torchrun launch exited with status {proc.returncode}: " + " | ".join(tail))
        row = dict(child_rungs[0])
        for key in ("name", "adds"):
            row.pop(key, None)
        row["launched"] = shown
        if self.plan is not None and row.get("cache_schedule"):
            row["cache_schedule"] = self.plan.describe  # the child replays it by count; the parent knows its origin
        if row.get("status") == "skipped":
            raise FeatureNotAvailable(row.get("reason", "skipped under torchrun"))
        if row.get("status") == "failed":
            raise Flux2LabError(row.get("reason", "failed under torchrun"))
        return row

    def _update(self) -> None:
        if self.rank == 0:
            self.on_update(self.result)

