"""The demo's plan: how much work each stage does, its prompt sets, its output folder, its search space (across
cache methods).

`python -m flux2lab.demo` runs the stages; this module decides what they run on, so the choices can be read
(and tested) apart from the running.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flux2lab.common.errors import Flux2LabError

DATA = Path(__file__).resolve().parents[2] / "calibration_data"  # the checkout's prompt sets
# Everything the demo writes under --out; a rerun into the same folder replaces exactly these.
PARTS = ("demo.json", "prompts", "logs", "calibration", "studies.db", "studies", "image_cache", "compare", "frozen",
         "run", "bench", "report")
STUDY = "demo"


@dataclass(frozen=True)
class Plan:
    """How much work each stage does."""

    steps: int
    size: int | None  # height = width; None = the model's native size
    calibration_prompts: int
    search_prompts: int
    quality_prompts: int
    run_prompts: int
    threshold_multiples: tuple[float, ...]  # TeaCache's thresholds, as multiples of the fit's lowest rescaled step
    ret_steps_fractions: tuple[float, ...]  # TeaCache's ret_steps, as fractions of the steps
    # The search's methods (teacache first) and their values besides TeaCache's thresholds and ret_steps, as
    # `--space METHOD.SETTING=V1,V2` gives them (unlisted settings take the search's defaults).
    cache_space: Mapping[str, Mapping[str, tuple]]
    bench_reps: int
    bench_warmup: int


# Eight points across three methods: TeaCache at two thresholds with and without its residual extrapolation,
# TaylorSeer at two intervals (whole blocks), SeaCache at two thresholds (up to 4 cached steps in a row).
CROSS_METHOD = {"teacache": {"residual_order": (0, 1)},
                "taylorseer": {"cache_interval": (3, 5), "use_lite_mode": (True,)},
                "seacache": {"threshold": (0.5, 1.0), "max_consecutive_cached": (4,)}}
PLANS = {
    # The built-in models on a CPU: every stage real, small enough for a few minutes on 2 cores.
    "builtin": Plan(steps=30, size=None, calibration_prompts=24, search_prompts=6, quality_prompts=16,
                    run_prompts=4, threshold_multiples=(1.5, 3.5), ret_steps_fractions=(0.1,),
                    cache_space=CROSS_METHOD, bench_reps=3, bench_warmup=1),
    # --quick (the test suite): the same path with the least work that still fills every report section.
    "quick": Plan(steps=6, size=32, calibration_prompts=6, search_prompts=2, quality_prompts=3, run_prompts=2,
                  threshold_multiples=(0.5, 2.5), ret_steps_fractions=(0.2,),
                  cache_space={"teacache": {"residual_order": (0,)}, "taylorseer": {"cache_interval": (3,)},
                               "seacache": {"threshold": (0.5,), "max_consecutive_cached": (2,)}},
                  bench_reps=1, bench_warmup=1),
    # FLUX.2 [dev] on a GPU: NVIDIA's setting (50 steps, 1024x1024), enough prompts for the numbers to mean something.
    "full": Plan(steps=50, size=None, calibration_prompts=24, search_prompts=6, quality_prompts=16, run_prompts=4,
                 threshold_multiples=(1.5, 3.5), ret_steps_fractions=(0.1,), cache_space=CROSS_METHOD, bench_reps=3,
                 bench_warmup=1),
}
# Quality budgets for the freeze, on the study's quality objective.
BUDGETS = {"lpips": 0.15, "ssim": 0.9}


def default_model() -> str:
    """`mini` (trained, with a yardstick for quality) when its weights are installed, else `tiny`."""
    from flux2lab.zoo import store

    return "mini" if all(store.path_of(n).is_file() for n in store.FILES) else "tiny"


def prepare_out(out: Path) -> None:
    """Start from a clean folder: replace a previous demo's parts, never anything else."""
    if out.exists() and not out.is_dir():
        raise Flux2LabError(f"--out {out} is a file; give a folder.")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "demo.json").is_file():
            raise Flux2LabError(f"--out {out} is not empty and holds no earlier demo (no demo.json); give a new or "
                                "empty folder.")
        for name in PARTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def prompt_sets(model: str, plan: Plan) -> dict[str, list]:
    """PromptEntry lists per stage: the mini world's held-out captions for `mini` (its yardstick can score
    them); the checkout's calibration set (text-to-image and multi-reference) and quality set otherwise."""
    from flux2lab.pipeline.core import Prompt
    from flux2lab.pipeline.prompts import PromptEntry, load_prompts

    if model == "mini":
        from flux2lab.zoo.world import sample_scenes

        def world(kind: str, n: int, seed: int) -> list:
            return [PromptEntry(Prompt(s.caption), seed + i, f"{kind}-{i}")
                    for i, s in enumerate(sample_scenes(n, seed, split="heldout"))]

        quality = world("quality", plan.quality_prompts, 1000)
        calibration = world("calibration", plan.calibration_prompts, 0)
    else:
        missing = [p for p in ("calibration.jsonl", "quality_prompts.jsonl") if not (DATA / p).is_file()]
        if missing:
            raise Flux2LabError(f"the demo's prompt sets {', '.join(str(DATA / m) for m in missing)} are missing; "
                                "run the demo from a flux2lab checkout (pip install -e .).")
        calibration = load_prompts(DATA / "calibration.jsonl")[: plan.calibration_prompts]
        quality = load_prompts(DATA / "quality_prompts.jsonl")
        if len(quality) < plan.quality_prompts:
            raise Flux2LabError(f"{DATA / 'quality_prompts.jsonl'} has {len(quality)} prompts; the demo needs "
                                f"{plan.quality_prompts}.")
    return {"calibration": calibration, "search": quality[: plan.search_prompts],
            "quality": quality[: plan.quality_prompts], "run": quality[: plan.run_prompts]}


def write_manifest(path: Path, entries: Sequence, seeds: Sequence[int]) -> Path:
    """A prompt manifest the stage commands can read on their own (image paths absolute)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for e, seed in zip(entries, seeds):
        row = {"id": e.id, "prompt": e.prompt.text, "seed": seed}
        if e.prompt.images:
            row["images"] = [str(Path(i).resolve()) for i in e.prompt.images]
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def thresholds_from_fit(fit: dict[str, Any], multiples: Sequence[float]) -> list[float]:
    """Search thresholds read off the fit: every step adds at least the curve's lowest value (`floor`) to the
    accumulator, so threshold k x floor allows at most k-1 skips in a row. 0.5 x floor is a control that the fit
    says skips nothing."""
    from flux2lab.study import default_space

    floor = fit["skip_limits"]["floor"]
    if floor <= 0:  # the curve reaches 0: the fit bounds nothing; use the usual grid
        return default_space(50)["teacache"]["threshold"][: len(multiples)]
    return sorted({float(f"{m * floor:.3g}") for m in multiples})



def space_flags(plan: Plan) -> list[str]:
    """The plan's `cache_space` as the search command's `--space METHOD.SETTING=V1,V2` values."""
    return [f"{method}.{name}=" + ",".join(json.dumps(v) for v in values)
            for method, settings in plan.cache_space.items() for name, values in settings.items()]
