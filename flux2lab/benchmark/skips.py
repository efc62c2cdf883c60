"""Which steps the cache rung skips on random weights, how the output names that choice, and how it is replayed.

A threshold method (TeaCache, FirstBlockCache, SeaCache) decides from the tensors, so on random weights its
decisions mean nothing: there the rung replays a compute pattern instead: the frozen point's (its recorded
fraction of the block stack computed, spread evenly), a count given by the user, NVIDIA's measured TeaCache average
of 16 skipped steps in 50, or the decisions a fitted TeaCache polynomial makes on a recorded distance trace. The
method still measures and decides every step (so what it costs is timed); only the outcome is the plan's.
TaylorSeer and MagCache decide from the step alone (a schedule, MagCache's from calibrated ratios): they run as
they are. On real weights every method decides for itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flux2lab.common.errors import Flux2LabError
from flux2lab.pipeline.recipe import Recipe

NVIDIA_SKIPS = (16, 50)  # NVIDIA's measured TeaCache average for FLUX.2 [dev]: 16 of 50 steps skipped
RANDOM_WEIGHTS = ("tiny", "full-random")  # models whose cache decisions mean nothing (see flux2lab.pipeline.models)
SCHEDULED = ("taylorseer", "magcache")  # decide from the step index alone: the same on any weights
NAMES = {"teacache": "TeaCache", "first_block": "FirstBlockCache", "seacache": "SeaCache", "taylorseer": "TaylorSeer",
         "magcache": "MagCache"}


@dataclass(frozen=True)
class SkipPlan:
    """How the cache rung decides which steps to skip, and how the output describes it."""

    skip_steps: tuple[int, ...] | None  # replayed (the method's outcome forced to these); None: its own decisions
    describe: str
    spec: str = "auto"  # the --teacache-schedule value that makes this plan again (for a torchrun child)
    meaningless: bool = False  # the method's own decisions on random weights: marked in the output


def skip_window(recipe: Recipe) -> tuple[int, int]:
    """[first, end): the steps the recipe's cache may skip. Step 0 has nothing cached, and the last step makes the
    image; TeaCache computes its first `ret_steps` and from `cutoff_steps` on, SeaCache its `retention_steps` and
    its last `cache_end_steps`."""
    cache, steps = recipe.cache, recipe.steps
    first, end = 1, steps - 1
    if cache.method == "teacache":
        first = max(cache.ret_steps, 1)
        end = min(end, steps if cache.cutoff_steps is None else cache.cutoff_steps)
    elif cache.method == "seacache":
        from flux2lab.hooks.step_caches import cache_config

        config = cache_config("seacache", cache.as_dict(), steps)
        first, end = max(config.retention_steps, 1), min(end, steps - config.cache_end_steps)
    return first, end


def spread_skips(steps: int, n_skip: int, ret_steps: int, end: int | None = None) -> tuple[int, ...]:
    """`n_skip` step indices spread evenly over the steps a cache may skip: from `ret_steps` (and after step 0,
    which has nothing cached) to before `end` (default: the last step, which makes the image)."""
    end = steps - 1 if end is None else end
    eligible = list(range(max(ret_steps, 1), end))
    if n_skip > len(eligible):
        raise Flux2LabError(
            f"--teacache-schedule asks for {n_skip} skipped steps, but with {steps} steps and ret_steps {ret_steps} "
            f"only {len(eligible)} can be skipped (steps {max(ret_steps, 1)}..{end - 1})."
        )
    return tuple(eligible[int((i + 0.5) * len(eligible) / n_skip)] for i in range(n_skip))


def traced_skips(fit_path: Path, trace_path: Path, steps: int, recipe: Recipe) -> SkipPlan:
    """The skips TeaCache's rule makes on recorded distances (a calibration run's samples.csv) with the
    coefficients of its fit.json, for the prompt whose skip count is the median of the trace."""
    from flux2lab.calibration import read_rows
    from flux2lab.hooks.teacache import TeaCacheConfig, plan_skips
    from flux2lab.pipeline.presets import coefficients_from_fit

    coefficients = coefficients_from_fit(fit_path)
    if not trace_path.is_file():
        raise Flux2LabError(f"--teacache-schedule: {trace_path} does not exist.")
    traces: dict[tuple[str, str], dict[int, float]] = {}
    for row in read_rows(trace_path):
        traces.setdefault((row["prompt_id"], row["seed"]), {})[int(row["step"])] = float(row["x"])
    config = TeaCacheConfig.from_recipe(recipe.replace(cache={"coefficients": coefficients}))
    plans = []
    for (prompt, _seed), by_step in sorted(traces.items()):
        if sorted(by_step) != list(range(1, steps)):
            raise Flux2LabError(
                f"--teacache-schedule: {trace_path} holds steps {min(by_step)}..{max(by_step)} for prompt "
                f"'{prompt}'; a {steps}-step benchmark needs a trace of steps 1..{steps - 1} (record it with "
                f"{steps} steps, or run the benchmark with the trace's step count)."
            )
        computed = plan_skips(config, [None] + [by_step[t] for t in range(1, steps)])
        plans.append((tuple(t for t, c in enumerate(computed) if not c), prompt))
    if not plans:
        raise Flux2LabError(f"--teacache-schedule: {trace_path} holds no samples.")
    plans.sort(key=lambda p: len(p[0]))
    skips, prompt = plans[len(plans) // 2]
    counts = [len(p[0]) for p in plans]
    return SkipPlan(skips, (
        f"replayed schedule: {len(skips)}/{steps} from {fit_path} + {trace_path} (threshold "
        f"{recipe.cache.threshold}; prompt '{prompt}', the median of {len(plans)}: {min(counts)}-{max(counts)} "
        "skipped)"), f"{len(skips)}/{steps}")


def skip_plan(spec: str, real_weights: bool, recipe: Recipe, point: Any = None) -> SkipPlan:
    """The plan of the recipe's cache: `auto` (real decisions on real weights; on random ones the frozen `point`'s
    recorded computed fraction, else NVIDIA's 16/50 for TeaCache, else the method's own decisions, marked), `real`,
    a replayed count `K/N` (K of every N steps) or `K` (K steps), or `FIT.json:SAMPLES.csv` (TeaCache's rule on a
    calibration's distances). `point`: a flux2lab.benchmark.cachepoint.CachePoint."""
    method, steps = recipe.cache.method, recipe.steps
    name = NAMES[method]
    if method in SCHEDULED:
        return SkipPlan(None, f"{name}'s own schedule (it decides from the step alone: the same on any weights)")
    if spec == "real" or (spec == "auto" and real_weights):
        return SkipPlan(None, f"real {name} decisions", "real", meaningless=not real_weights)
    if spec.count(":") == 1:
        if method != "teacache":
            raise Flux2LabError(f"--teacache-schedule {spec}: a calibration trace replays TeaCache's rule, but the "
                                f"cache rung runs {method}; give auto, real, K/N or K.")
        fit, trace = spec.split(":")
        return traced_skips(Path(fit), Path(trace), steps, recipe)
    first, end = skip_window(recipe)
    recorded = getattr(point, "recorded_fraction", None)
    if spec == "auto" and recorded is not None:
        count = min(round((1 - recorded) * steps), max(end - first, 0))
        note = (f" (the frozen point computed {recorded:.1%} of the block stack on {point.recorded_on}"
                + (f" at {point.frozen_steps} steps" if point.frozen_steps not in (None, steps) else "")
                + ("; its head block also runs on skipped steps, so this skips a little less" if method == "first_block"
                   else "") + ")")
    elif spec == "auto" and method != "teacache":
        return SkipPlan(None, f"{name}'s own decisions on random weights (they mean nothing here: give "
                              "--teacache-schedule K/N, or --cache with a frozen config that records its computed "
                              "fraction)", "real", meaningless=True)
    elif spec == "auto":
        k, n = NVIDIA_SKIPS
        count = round(k * steps / n)
        note = " (NVIDIA average)" if steps == n else f" (NVIDIA average {k}/{n}, scaled)"
    else:
        try:
            k, n = (int(x) for x in spec.split("/")) if "/" in spec else (int(spec), steps)
        except ValueError:
            raise Flux2LabError(
                f"--teacache-schedule {spec!r}: give auto, real, K/N (K of every N steps skipped, e.g. 16/50), "
                "K (skipped steps) or FIT.json:SAMPLES.csv (a calibration run's fit and distance trace)."
            ) from None
        if n < 1 or not 0 <= k <= n:
            raise Flux2LabError(f"--teacache-schedule {spec!r}: need 0 <= K <= N and N >= 1.")
        count = round(k * steps / n)
        note = ""
    return SkipPlan(spread_skips(steps, count, first, end), f"replayed schedule: {count}/{steps}{note}",
                    f"{count}/{steps}")


def replay_skip_plan(pipe: Any, recipe: Recipe, plan: SkipPlan | None) -> None:
    """Make the cache that `apply` attached skip exactly the plan's steps. TeaCache replays them itself (only its
    config is swapped, so nothing recompiles); FirstBlockCache and SeaCache still measure and decide every step,
    and their decision is then overridden with the plan's."""
    if plan is None or plan.skip_steps is None:
        return
    method = recipe.cache.method
    if method == "teacache":
        from flux2lab.hooks.teacache import TeaCacheConfig, apply_teacache

        apply_teacache(pipe.transformer, TeaCacheConfig.from_recipe(recipe, replay_skips=plan.skip_steps))
    elif method in ("first_block", "seacache"):
        force_decisions(pipe.transformer, method, plan.skip_steps)


def force_decisions(transformer: torch.nn.Module, method: str, skip_steps: tuple[int, ...]) -> None:
    """Override the decision of the FirstBlockCache or SeaCache attached by flux2lab.hooks.step_caches: each step
    it measures and decides as it would, then skips exactly at `skip_steps` (diffusers has no replay of its own;
    the decision functions are replaced on the hook instances, so removing the cache removes this too)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK
    from diffusers.hooks.sea_cache import _SEA_CACHE_ROOT_HOOK
    from diffusers.utils.torch_utils import unwrap_module

    from flux2lab.hooks.step_caches import CLOCK_HOOK

    t = unwrap_module(transformer)
    skips = frozenset(skip_steps)
    if method == "first_block":
        head = HookRegistry.check_if_exists_or_initialize(t.transformer_blocks[0]).get_hook(_FBC_LEADER_BLOCK_HOOK)
        clock = HookRegistry.check_if_exists_or_initialize(t).get_hook(CLOCK_HOOK)
        if head is None or clock is None:
            raise Flux2LabError("FirstBlockCache is not attached by flux2lab.hooks.step_caches; cannot replay a plan.")
        decide = type(head)._should_compute_remaining_blocks.__get__(head)

        @torch.compiler.disable
        def forced_head(residual: torch.Tensor) -> bool:
            decide(residual)  # its measurement and host sync, as they cost
            return clock.step not in skips

        head._should_compute_remaining_blocks = forced_head
    elif method == "seacache":
        root = HookRegistry.check_if_exists_or_initialize(t).get_hook(_SEA_CACHE_ROOT_HOOK)
        if root is None:
            raise Flux2LabError("SeaCache is not attached; cannot replay a plan.")
        shared = root.shared_state
        gate = type(shared).resolve_gate.__get__(shared)

        def forced_gate(state, metadata, indicator, config) -> bool:
            gate(state, metadata, indicator, config)  # its indicator distance, as it costs
            compute = metadata.step_index not in skips
            state.gate_should_compute = compute
            if compute:
                state.accumulated_distance = 0.0
            return compute

        shared.resolve_gate = forced_gate
    else:
        raise Flux2LabError(f"only first_block and seacache decisions are forced; {method} replays or schedules itself.")
