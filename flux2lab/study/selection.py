"""Reading a finished study: its Pareto front across every method, a table of trials (method and settings),
quality budgets, the fastest trial of any method within them, and that trial written as a frozen config with the
study as its provenance."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from flux2lab.common.errors import Flux2LabError
from flux2lab.common.formatting import fmt_number, fmt_percent
from flux2lab.pipeline.recipe import Recipe
from flux2lab.study.config import QUALITY_METRICS, SPEED_METRICS, StudyConfig
from flux2lab.study.space import METHOD, describe_point, settings_text
from flux2lab.study.storage import display_url


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def speed_key(config: StudyConfig, t: FrozenTrial) -> float:
    """Smaller is faster, whichever speed metric the study optimises."""
    name, direction = SPEED_METRICS[config.speed_metric]
    v = float(t.user_attrs[name])
    return v if direction == "minimize" else -v


def quality_key(config: StudyConfig, t: FrozenTrial) -> float:
    """Smaller is better, whichever quality metric the study optimises."""
    v = float(t.user_attrs["metrics"][config.quality_metric])
    return v if QUALITY_METRICS[config.quality_metric] == "minimize" else -v


def pareto_front(study: optuna.Study, config: StudyConfig) -> list[FrozenTrial]:
    """Optuna's Pareto-optimal trials, fastest first."""
    return sorted(study.best_trials, key=lambda t: (speed_key(config, t), quality_key(config, t)))


# Quality metrics the search's table and plot show, where measured.
SHOWN_METRICS = ("lpips", "psnr", "ssim", "clip_delta")


def measured_metrics(trials: Sequence[FrozenTrial], names: Sequence[str] = SHOWN_METRICS) -> list[str]:
    """Those of `names` that at least one of `trials` measured, in `names`' order."""
    return [m for m in names if any(m in (t.user_attrs.get("metrics") or {}) for t in trials)]


def format_table(trials: Sequence[FrozenTrial], config: StudyConfig) -> str:
    """One row per trial: its method and settings, speed (share of the block stack computed, time) and every
    quality metric it has."""
    names = measured_metrics(trials)
    head = ["trial", "method", "settings", "computed", "s/img", "speedup", *names]
    rows = [head]
    for t in trials:
        m = t.user_attrs.get("metrics", {})
        point = config.trial_point(t) or {}
        rows.append([str(t.number), point.get(METHOD, "-"), settings_text(point) or "-",
                     fmt_percent(t.user_attrs.get("computed_fraction"), missing="-"),
                     fmt_number(t.user_attrs["time_per_image"], ".3f", missing="-"),
                     fmt_number(t.user_attrs.get("speedup"), ".2f", missing="-") + "x",
                     *(fmt_number(m.get(n), ".2f" if n in ("psnr", "clip_delta") else ".5f", missing="-")
                       for n in names)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    # Method and settings read left to right; numbers line up on the right.
    return "\n".join("  ".join(c.ljust(w) if i in (1, 2) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in rows)

# A budget bounds a quality metric on its bad side: at most X where lower is better, at least X where higher is.
BUDGETS = {k: "max" if direction == "minimize" else "min" for k, direction in QUALITY_METRICS.items()}


def describe_budgets(budgets: Mapping[str, float]) -> str:
    return ", ".join(f"--{BUDGETS[k]}-{k} {v:g}" for k, v in budgets.items())


def _violation(t: FrozenTrial, budgets: Mapping[str, float]) -> float:
    """How far a trial is outside the budgets (0 = within), relative to each bound."""
    total = 0.0
    for name, bound in budgets.items():
        v = t.user_attrs.get("metrics", {}).get(name)
        if v is None:
            return math.inf
        over = float(v) - bound if BUDGETS[name] == "max" else bound - float(v)
        total += max(0.0, over) / max(abs(bound), 1e-12)
    return total


def select(study: optuna.Study, config: StudyConfig, budgets: Mapping[str, float]) -> FrozenTrial:
    """The fastest complete trial of any method within every budget (ties: better quality objective, then lower
    number).

    With a budget on the study's quality objective this is the fastest Pareto point within it; a budget on
    another metric can pick a faster trial than any on the front, which is what a budget asks for.
    """
    if not budgets:
        raise Flux2LabError("--freeze needs a quality budget: --max-lpips X, --min-psnr X or --min-ssim X.")
    unknown = sorted(set(budgets) - set(BUDGETS))
    if unknown:
        raise Flux2LabError(f"no budget flag for {unknown}; use {', '.join(BUDGETS)}.")
    trials = complete_trials(study)
    if not trials:
        raise Flux2LabError(f"study {study.study_name!r} has no complete trials yet; run the search first.")
    for name in budgets:
        if not any(name in t.user_attrs.get("metrics", {}) for t in trials):
            measured = sorted({m for t in trials for m in t.user_attrs.get("metrics", {}) if m in BUDGETS})
            raise Flux2LabError(f"no trial of study {study.study_name!r} measured {name} (its weights were missing "
                                f"when the study ran); budget on what it measured: {', '.join(measured)}.")
    within = [t for t in trials if _violation(t, budgets) == 0]
    if not within:
        closest = sorted(trials, key=lambda t: (_violation(t, budgets), speed_key(config, t)))[:3]
        raise Flux2LabError(f"no trial of study {study.study_name!r} meets {describe_budgets(budgets)} "
                            f"({len(trials)} complete trials). The closest:\n{format_table(closest, config)}")
    return min(within, key=lambda t: (speed_key(config, t), quality_key(config, t), t.number))


def freeze_trial(study: optuna.Study, config: StudyConfig, trial: FrozenTrial, out: str | Path, *,
                 storage_url: str, budgets: Mapping[str, float]) -> Path:
    """Write the trial's recipe (its method and settings, with the study's calibrated values) as a frozen config
    (flux2lab.frozen) with the study and its calibration as its provenance."""
    from flux2lab.pipeline.frozen import freeze

    recipe = Recipe.from_dict(trial.user_attrs["recipe"], source=f"trial {trial.number} of {study.study_name}")
    attrs = trial.user_attrs
    on_front = trial.number in {t.number for t in study.best_trials}
    point = config.trial_point(trial)
    provenance = {
        "calibration": config.calibration,
        "study": {"name": study.study_name, "storage": display_url(storage_url), "sampler": config.sampler,
                  "objectives": [f"{SPEED_METRICS[config.speed_metric][0]} ({config.directions[0]})",
                                 f"{config.quality_metric} ({config.directions[1]})"],
                  "prompts": len(config.prompts), "complete_trials": len(complete_trials(study))},
        "trial": {"number": trial.number, "params": dict(trial.params), "point": point, "device": attrs.get("device"),
                  "on_pareto_front": on_front},
        "metrics": {**attrs["metrics"], "time_per_image": attrs["time_per_image"],
                    "computed_fraction": attrs.get("computed_fraction"), "speedup": attrs.get("speedup"),
                    "ref_time_per_image": attrs.get("ref_time_per_image")},
        "notes": f"fastest trial of any method within {describe_budgets(budgets)}: {describe_point(point)}"
                 + _calibration_note(recipe.cache.method, config),
    }
    return freeze(recipe, attrs["model"], provenance).save(out)


def _calibration_note(method: str, config: StudyConfig) -> str:
    if method == "teacache":
        return "; coefficients: " + ("calibration fit" if config.calibration else "published FLUX.2 [dev] (NVIDIA)")
    return "; magnitude ratios: calibration fit" if method == "magcache" else ""
