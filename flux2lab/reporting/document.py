"""What a report is made of: sections of blocks (figures, tables, text), and the small helpers every section uses.

A section module reads artefacts and returns a `Section`; `render` writes the `Report` as HTML and markdown.
METRIC_INFO says how each quality number reads, for tables and plots alike.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Figure:
    """A PNG and what it shows; `name` becomes the file name beside index.md."""

    png: bytes
    caption: str
    name: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Text:
    """A paragraph; `code` spans are written between backticks."""

    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Code:
    text: str


@dataclass
class Heading:
    text: str


Block = Figure | Table | Text | Bullets | Code | Heading


@dataclass
class Section:
    id: str  # anchor in the HTML page (the screenshot test looks for these)
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Report:
    title: str
    source: str
    created: str
    sections: list[Section]

    def section(self, id: str) -> Section | None:
        return next((s for s in self.sections if s.id == id), None)


# How each quality number reads: label with unit, and which way is better. Shared by tables and plots.
METRIC_INFO = {
    "lpips": ("LPIPS (AlexNet)", "lower is better; 0 = identical"),
    "lpips_vgg": ("LPIPS (VGG)", "lower is better; 0 = identical"),
    "psnr": ("PSNR (dB)", "higher is better; inf = identical"),
    "ssim": ("SSIM", "higher is better; 1 = identical"),
    "fid": ("FID", "lower is better; set-level"),
    "clip_reference": ("CLIP score of A (points)", "prompt adherence of the reference"),
    "clip_candidate": ("CLIP score of B (points)", "prompt adherence of the candidate"),
    "clip_delta": ("CLIP score B - A (points)", "higher is better; 0 = no change"),
    "accuracy_reference": ("attribute accuracy of A (fraction)", "yardstick: prompt facts the image shows"),
    "accuracy_candidate": ("attribute accuracy of B (fraction)", "yardstick: prompt facts the image shows"),
    "accuracy_delta": ("attribute accuracy B - A (fraction)", "higher is better; 0 = no change"),
    "domain_fid": ("domain FID A vs B", "lower is better; yardstick features, set-level"),
}
# Paired quality metrics a search trial can be plotted on (change against the uncached reference).
TRIAL_METRICS = ("lpips", "psnr", "ssim", "clip_delta", "accuracy_delta", "domain_fid")


def model_note(source: str | None) -> str:
    """What a model's numbers can and cannot say (DESIGN.md: every quality claim names its model)."""
    if source == "tiny":
        return ("tiny: random weights. These numbers show the toolkit working; they say nothing about the "
                "image quality of FLUX.2 [dev].")
    if source == "full-random":
        return "full-random: the full-size architecture with random weights; good for speed only."
    if source == "mini":
        return ("mini: flux2lab's small FLUX.2 trained on a synthetic world of shapes; its numbers show how an "
                "acceleration behaves on a trained denoiser, not FLUX.2 [dev]'s own quality.")
    return f"{source}: pretrained weights."


def read_json(path: Path) -> Any:
    """The file's JSON, or None when it is missing or not JSON (artefacts are read, never trusted)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes, as hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def short_json_hash(data: dict[str, Any]) -> str:
    """First 12 hex digits of the sha256 of `data`'s canonical JSON (how frozen configs are hashed)."""
    from flux2lab.pipeline.frozen import json_sha256

    return json_sha256(data)[:12]


def relative_path(path: Path, root: Path | None) -> str:
    """`path` as the reader knows it: relative to the experiments folder when inside it."""
    if root is not None:
        try:
            return str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            pass
    return str(path)


def slug(text: str) -> str:
    """`text` as a file-name part: letters and digits, dashes between."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "figure"


def figure_from_file(path: Path, caption: str, name: str) -> Figure | None:
    """The PNG a stage wrote, or None when it is missing or not a PNG."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    return Figure(data, caption, name) if data[:8] == b"\x89PNG\r\n\x1a\n" else None


def figure_from_matplotlib(fig, caption: str, name: str) -> Figure:
    """A matplotlib `Figure` drawn to PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return Figure(buf.getvalue(), caption, name)


def describe_recipe(recipe: dict[str, Any]) -> str:
    """One line a reader can take in: precision, step cache, compile/graphs/GPUs, steps and size (any schema)."""
    from flux2lab.pipeline.recipe import Recipe, RecipeError

    try:
        recipe = Recipe.from_dict(recipe).to_dict()  # a version-1 recipe reads as the version-2 one it migrates to
    except RecipeError:
        pass
    parts = [f"transformer {recipe.get('transformer_precision')}"]
    if recipe.get("text_encoder_precision") not in (None, "bf16"):
        parts.append(f"text encoder {recipe['text_encoder_precision']}")
    cache = dict(recipe.get("cache") or {"method": "none"})
    method = cache.pop("method", "none")
    shown = {k: v for k, v in cache.items() if k not in ("coefficients", "mag_ratios")}  # calibrated: too long
    parts.append("no step cache" if method == "none" else
                 f"{method} " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    parts += [name for name in ("compile", "cuda_graphs") if recipe.get(name)]
    if (recipe.get("ulysses_degree") or 1) > 1:
        parts.append(f"Ulysses x{recipe['ulysses_degree']}")
    size = (f"{recipe.get('width')}x{recipe.get('height')}" if recipe.get("height") else "native size")
    parts.append(f"{recipe.get('steps')} steps, {size}")
    return "; ".join(parts)

