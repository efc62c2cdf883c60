"""Prompt sets: JSONL manifests (or plain text, one prompt a line), checked before any model work.

A manifest line is a JSON object: `prompt` (required, non-empty text), `images` (optional list of reference
image paths, relative to the manifest's folder, for multi-reference editing), `seed` (optional int) and
`id` (optional). Every problem is reported with file, line and field, so a typo found after an hour of
generation is found at start-up instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flux2lab.common.errors import Flux2LabError
from flux2lab.pipeline.core import Prompt

_FIELDS = {"prompt", "images", "seed", "id"}


@dataclass(frozen=True)
class PromptEntry:
    prompt: Prompt
    seed: int | None
    id: str

    @property
    def kind(self) -> str:
        return "multi-reference" if self.prompt.images else "t2i"


def _entry(obj: object, path: Path, line: int) -> PromptEntry:
    where = f"{path}, line {line}"
    if not isinstance(obj, dict):
        raise Flux2LabError(f"{where}: expected a JSON object like {{\"prompt\": \"...\"}}, got {obj!r}.")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise Flux2LabError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}.")
    text = obj.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise Flux2LabError(f"{where}: field 'prompt' is missing or empty; give the prompt text.")
    images = obj.get("images", [])
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise Flux2LabError(f"{where}: field 'images' must be a list of image paths, got {images!r}.")
    resolved = []
    for img in images:
        p = (path.parent / img) if not Path(img).is_absolute() else Path(img)
        if not p.is_file():
            raise Flux2LabError(f"{where}: field 'images' names {img}, which does not exist (looked at {p}).")
        resolved.append(str(p))
    seed = obj.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise Flux2LabError(f"{where}: field 'seed' must be a non-negative integer, got {seed!r}.")
    ident = obj.get("id", f"{path.stem}-{line}")
    return PromptEntry(Prompt(text.strip(), tuple(resolved)), seed, str(ident))


def load_prompts(path: str | Path) -> list[PromptEntry]:
    """Read and check a prompt set: `.jsonl` manifest, or any other file as one prompt per line."""
    path = Path(path)
    if not path.is_file():
        raise Flux2LabError(f"prompt file {path} does not exist.")
    entries = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise Flux2LabError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}).") from None
            entries.append(_entry(obj, path, n))
        else:
            entries.append(PromptEntry(Prompt(line), None, f"{path.stem}-{n}"))
    if not entries:
        raise Flux2LabError(f"prompt file {path} has no prompts.")
    ids = [e.id for e in entries]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise Flux2LabError(f"{path}: ids must be unique; repeated: {dupes}.")
    return entries


def seeds_for(entries: list[PromptEntry], default_seed: int) -> list[int]:
    """Each entry's own seed, else `default_seed` + its position (distinct, reproducible seeds)."""
    return [e.seed if e.seed is not None else default_seed + i for i, e in enumerate(entries)]
