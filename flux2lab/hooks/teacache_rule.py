"""TeaCache's skip rule as pure functions: the settings, one step's decision, and the computed/skipped pattern a
sequence of input distances gives. The hooks in `flux2lab.hooks.teacache` apply it step by step; the calibration
notebook and the benchmark use it to simulate skips from recorded distances."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from flux2lab.common.errors import Flux2LabError
from flux2lab.pipeline.caches import FLUX2_DEV_COEFFICIENTS, FLUX2_DEV_RET_STEPS, FLUX2_DEV_THRESHOLD, TeaCacheSettings
from flux2lab.pipeline.recipe import Recipe

# Reasons a step computed or skipped, as written in the log.
FIRST, RET_STEPS, CUTOFF, REACHED, BELOW, REPLAYED = (
    "first", "ret_steps", "cutoff", "threshold_reached", "below_threshold", "replayed")


@dataclass(frozen=True)
class TeaCacheConfig:
    """TeaCache settings for one transformer.

    - `num_inference_steps`: the pipeline's step count (ret/cutoff are step indices; a longer run is an error).
    - `cutoff_steps`: steps from this index on always compute; None = no cutoff.
    - `replay_skips`: skip exactly these step indices instead of deciding (distances are still measured and
      logged, so a replayed step costs what a decided one does). For speed measurements on random
      weights, where decisions mean nothing. Step 0 cannot be skipped: nothing is cached yet.
    - `residual_order`: what a skipped step adds to its embedding. 0 (NVIDIA's TeaCache): the last computed
      step's residual. 1: the line through the last two computed residuals, followed (in step count) to the
      skipped step (with only one residual cached yet, that one); `residual_slope` scales the change the line
      predicts (1 = the line; below 1, damped). See `flux2lab.hooks.teacache.predict_residual`.
    """

    num_inference_steps: int
    threshold: float = FLUX2_DEV_THRESHOLD
    coefficients: tuple[float, ...] = FLUX2_DEV_COEFFICIENTS
    ret_steps: int = FLUX2_DEV_RET_STEPS
    cutoff_steps: int | None = None
    replay_skips: tuple[int, ...] | None = None
    residual_order: int = 0
    residual_slope: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))
        if self.replay_skips is not None:
            object.__setattr__(self, "replay_skips", tuple(sorted({int(s) for s in self.replay_skips})))
        n = self.num_inference_steps

        def bad(name: str, allowed: str) -> Flux2LabError:
            return Flux2LabError(f"TeaCacheConfig.{name} = {getattr(self, name)!r} is invalid; allowed: {allowed}.")

        if not isinstance(n, int) or n < 1:
            raise bad("num_inference_steps", "an integer >= 1")
        # The settings' checks are the recipe's (flux2lab.pipeline.caches): one place says what is allowed.
        TeaCacheSettings(self.coefficients, self.threshold, self.ret_steps, self.cutoff_steps, self.residual_order,
                         self.residual_slope).check(n, owner="TeaCacheConfig")
        if self.replay_skips is not None and any(not 0 < s < n for s in self.replay_skips):
            raise bad("replay_skips", f"step indices between 1 and {n - 1} (step 0 has nothing cached to reuse)")

    @classmethod
    def from_recipe(cls, recipe: Recipe, **changes: Any) -> TeaCacheConfig:
        """The config of a recipe whose cache is TeaCache."""
        tc = recipe.cache
        if not isinstance(tc, TeaCacheSettings):
            raise Flux2LabError(f"the recipe's cache is '{tc.method}', not teacache.")
        settings = {f.name: getattr(tc, f.name) for f in fields(TeaCacheSettings)}
        return cls(num_inference_steps=recipe.steps, **{**settings, **changes})


# ---------------------------------------------------------------------------------------------------------
# The rule, as pure functions (the hook uses them; so can anyone simulating skips from recorded distances)


class Decision(NamedTuple):
    computed: bool
    rescaled: float | None  # poly(rel_l1), or None where the distance was not measured
    accumulator: float  # the value compared with the threshold (0 on forced steps)
    carry: float  # the accumulator the next step starts from
    reason: str


def rescale(coefficients: Sequence[float], rel_l1: float) -> float:
    """`poly(rel_l1)` clamped at 0; a distance that is not finite rescales to +inf (forces a compute).

    The clamp: a fitted polynomial can dip below zero near the edge of its data, and a negative value would
    let the accumulator shrink and skip steps even at threshold 0; a change is never negative.
    """
    if not math.isfinite(rel_l1):
        return math.inf
    value = 0.0
    for c in coefficients:  # Horner, highest degree first (numpy.poly1d order)
        value = value * rel_l1 + c
    return max(value, 0.0)


def forced_reason(config: TeaCacheConfig, step: int) -> str | None:
    """Why `step` computes whatever the distance says, or None if the distance decides."""
    if step == 0:
        return FIRST
    if step < config.ret_steps:
        return RET_STEPS
    if config.cutoff_steps is not None and step >= config.cutoff_steps:
        return CUTOFF
    return None


def decide(config: TeaCacheConfig, step: int, rel_l1: float | None, accumulator: float) -> Decision:
    """One step of the rule; `accumulator` is the previous step's `carry` (0 at step 0)."""
    if config.replay_skips is not None and step > 0:
        rescaled = None if rel_l1 is None else rescale(config.coefficients, rel_l1)
        acc = accumulator + (rescaled or 0.0)
        computed = step not in config.replay_skips
        return Decision(computed, rescaled, acc, 0.0 if computed else acc, REPLAYED)
    reason = forced_reason(config, step)
    if reason is not None:
        return Decision(True, None, 0.0, 0.0, reason)
    if rel_l1 is None:
        raise ValueError(f"step {step} is decided by the distance, but no rel_l1 was given")
    rescaled = rescale(config.coefficients, rel_l1)
    acc = accumulator + rescaled
    if acc < config.threshold:
        return Decision(False, rescaled, acc, acc, BELOW)
    return Decision(True, rescaled, acc, 0.0, REACHED)


def plan_skips(config: TeaCacheConfig, rel_l1s: Iterable[float | None]) -> list[bool]:
    """The computed/skipped pattern TeaCache produces for a sequence of distances (index = step)."""
    computed, carry = [], 0.0
    for step, rel in enumerate(rel_l1s):
        d = decide(config, step, rel, carry)
        computed.append(d.computed)
        carry = d.carry
    return computed
