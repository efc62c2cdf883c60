"""Which steps the TeaCache rung skips, and how the output names that choice.

TeaCache on random weights makes meaningless skip decisions, so there the rung replays a skip schedule (NVIDIA's
measured average of 16 skipped steps in 50 by default, a count given by the user, or the decisions a fitted
polynomial makes on a recorded distance trace); on real weights TeaCache decides for itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flux2lab.common.errors import Flux2LabError
from flux2lab.pipeline.recipe import Recipe

NVIDIA_SKIPS = (16, 50)  # NVIDIA's measured TeaCache average for FLUX.2 [dev]: 16 of 50 steps skipped
RANDOM_WEIGHTS = ("tiny", "full-random")  # models whose TeaCache decisions mean nothing (see flux2lab.pipeline.models)


@dataclass(frozen=True)
class SkipPlan:
    """How the TeaCache rung decides which steps to skip, and how the output describes it."""

    skip_steps: tuple[int, ...] | None  # replayed through TeaCache's replay_skips; None: its own decisions
    describe: str


def spread_skips(steps: int, n_skip: int, ret_steps: int) -> tuple[int, ...]:
    """`n_skip` step indices spread evenly over the steps TeaCache may skip: after the first `ret_steps`
    (and step 0, which has nothing cached), and before the last step (it makes the image)."""
    eligible = list(range(max(ret_steps, 1), steps - 1))
    if n_skip > len(eligible):
        raise Flux2LabError(
            f"--teacache-schedule asks for {n_skip} skipped steps, but with {steps} steps and ret_steps {ret_steps} "
            f"only {len(eligible)} can be skipped (steps {max(ret_steps, 1)}..{steps - 2})."
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
        "skipped)"))


def skip_plan(spec: str, real_weights: bool, recipe: Recipe) -> SkipPlan:
    """`auto` (real decisions on real weights, NVIDIA's 16/50 replayed on random ones), `real`, a replayed
    count `K/N` (K of every N steps) or `K` (K steps), or `FIT.json:SAMPLES.csv` (a calibration's decisions)."""
    steps, ret_steps = recipe.steps, recipe.cache.ret_steps
    if spec == "real" or (spec == "auto" and real_weights):
        return SkipPlan(None, "real TeaCache decisions")
    if spec.count(":") == 1:
        fit, trace = spec.split(":")
        return traced_skips(Path(fit), Path(trace), steps, recipe)
    if spec == "auto":
        k, n = NVIDIA_SKIPS
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
        note = ""
    count = round(k * steps / n)
    return SkipPlan(spread_skips(steps, count, ret_steps), f"replayed schedule: {count}/{steps}{note}")


def replay_skip_plan(pipe: Any, recipe: Recipe, plan: SkipPlan | None) -> None:
    """Make the TeaCache that `apply` attached skip exactly the plan's steps (the hooks stay, only the config
    is swapped, so nothing recompiles)."""
    if plan is None or plan.skip_steps is None or not recipe.cache.method == "teacache":
        return
    from flux2lab.hooks.teacache import TeaCacheConfig, apply_teacache

    apply_teacache(pipe.transformer, TeaCacheConfig.from_recipe(recipe, replay_skips=plan.skip_steps))
