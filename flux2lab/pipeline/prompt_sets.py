"""Each model's own prompt sets: what calibrate and compare use when no --prompts is given, and a warning when the
prompts given are ones the model cannot draw.

Real models (and `tiny`, `full-random`) get the checkout's photographic sets under `calibration_data/`; `mini`
gets held-out captions of its world (`flux2lab.zoo.world`), the only prompts it can draw: photographic prompts on
mini calibrate a TeaCache fit that predicts nothing (held-out R² -1.57 measured) and compare images the yardstick
cannot score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flux2lab.common.errors import Flux2LabError
from flux2lab.pipeline.core import Prompt
from flux2lab.pipeline.prompts import PromptEntry, load_prompts

DATA = Path(__file__).resolve().parents[2] / "calibration_data"  # the checkout's prompt sets
FILES = {"calibration": "calibration.jsonl", "quality": "quality_prompts.jsonl"}
# mini's sets: (world sampling seed, captions); distinct seeds keep the calibration and quality sets apart.
MINI_SETS = {"calibration": (0, 24), "quality": (1000, 32)}


@dataclass(frozen=True)
class PromptSet:
    entries: list[PromptEntry]
    source: str  # where the prompts come from, for printed summaries and run records
    warning: str | None = None  # set when the prompts do not suit the model


def prompt_set(model: str, purpose: str, given: str | Path | None = None, limit: int | None = None) -> PromptSet:
    """The prompts of a `purpose` ("calibration" or "quality") run on `model`: the file `given` (--prompts), else
    the model's own set; the first `limit` of them (mini's own set has as many as asked for)."""
    if purpose not in FILES:
        raise ValueError(f"purpose must be one of {sorted(FILES)}, not {purpose!r}")
    if given is not None:
        entries = load_prompts(given)[:limit]
        return PromptSet(entries, str(given), _unsuited(model, entries))
    if model == "mini":
        from flux2lab.zoo.world import sample_scenes

        seed, n = MINI_SETS[purpose]
        n = limit or n
        entries = [PromptEntry(Prompt(scene.caption), None, f"heldout-{seed}-{i}")
                   for i, scene in enumerate(sample_scenes(n, seed, split="heldout"))]
        return PromptSet(entries, f"mini's own: {n} held-out world captions (world sampling seed {seed}; "
                                  f"`python -m flux2lab.zoo.world --out FILE --n {n} --seed {seed}` writes them)")
    path = DATA / FILES[purpose]
    if not path.is_file():
        raise Flux2LabError(f"the default {purpose} set {path} is missing (it ships with a flux2lab checkout); "
                            "give a prompt file with --prompts.")
    return PromptSet(load_prompts(path)[:limit], str(path))


def _unsuited(model: str, entries: list[PromptEntry]) -> str | None:
    """On mini, a warning naming how many prompts are not captions of its world."""
    if model != "mini":
        return None
    from flux2lab.zoo.world import parse_caption

    foreign = []
    for e in entries:
        try:
            parse_caption(e.prompt.text)
        except Flux2LabError:
            foreign.append(e.id)
    if not foreign:
        return None
    return (f"{len(foreign)} of {len(entries)} prompts (e.g. {foreign[0]!r}) are not captions of mini's world, which "
            "is all mini can draw: a calibration on them does not predict (held-out R² -1.57 measured on photographic "
            "prompts) and the yardstick cannot score them. Leave out --prompts to use mini's own held-out captions.")
