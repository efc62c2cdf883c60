"""Prompt sets: JSONL manifests (or plain text, one prompt a line), checked before any model work.

A manifest line is a JSON object: `prompt` (required, non-empty text), `images` (optional list of reference
image paths, relative to the manifest's folder, for multi-reference editing; each is opened as an image),
`seed` (optional int from 0 to 2**63-1) and `id` (optional; it names output files, so no path separators).
Files are UTF-8. Every problem is reported with file, line and field, so a typo found after an hour of
generation is found at start-up instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flux2lab.common.errors import Flux2LabError
from flux2lab.common.files import read_text
from flux2lab.common.values import MAX_SEED
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
    resolved = [str(_reference_image(img, path, where)) for img in images]
    seed = obj.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED):
        raise Flux2LabError(f"{where}: field 'seed' must be an integer from 0 to 2**63-1, got {seed!r}.")
    ident = str(obj.get("id", f"{path.stem}-{line}"))
    if ident in ("", ".", "..") or any(c in ident for c in "/\\\0"):
        raise Flux2LabError(f"{where}: field 'id' {ident!r} names output files, so it cannot be empty, '.' or '..' "
                            "or hold '/' or '\\'; give a plain name such as 'portrait-1'.")
    return PromptEntry(Prompt(text.strip(), tuple(resolved)), seed, ident)


def _reference_image(img: str, manifest: Path, where: str) -> Path:
    """The file a manifest's `images` entry names, checked to be an image PIL can open."""
    from PIL import Image, UnidentifiedImageError

    p = (manifest.parent / img) if not Path(img).is_absolute() else Path(img)
    if p.is_dir():
        raise Flux2LabError(f"{where}: field 'images' names {img}, which is a folder ({p}); name an image file.")
    if not p.is_file():
        raise Flux2LabError(f"{where}: field 'images' names {img}, which does not exist (looked at {p}).")
    try:
        with Image.open(p) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise Flux2LabError(f"{where}: field 'images' names {img}, which is not an image that can be opened "
                            f"({p}: {e}); give a PNG, JPEG or WebP file.") from None
    return p


def load_prompts(path: str | Path) -> list[PromptEntry]:
    """Read and check a prompt set: `.jsonl` manifest, or any other file as one prompt per line."""
    path = Path(path)
    text = read_text(path, "prompt file")
    entries = []
    for n, raw in enumerate(text.splitlines(), start=1):
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
    if not 0 <= default_seed <= MAX_SEED:
        raise Flux2LabError(f"--seed {default_seed}: seeds are integers from 0 to 2**63-1; give one in that range.")
    last = default_seed + max(len(entries) - 1, 0)
    if last > MAX_SEED:
        raise Flux2LabError(f"--seed {default_seed}: prompts without their own seed get --seed + their position, "
                            f"up to {last}, past the largest seed 2**63-1; give a smaller --seed.")
    return [e.seed if e.seed is not None else default_seed + i for i, e in enumerate(entries)]
