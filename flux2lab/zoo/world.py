"""The `mini` model's synthetic world: scenes with ground truth, their captions (as prompt files), their images.

A scene is 1-3 shapes (circle, square, triangle; six colours; small or large) at distinct places (left,
right, top, bottom) on a plain, striped or dotted background. Its caption is derived from the scene and
parses back to it (`parse_caption`), so any prompt of the world states what an image of it must show: that
is what the yardstick checks. Sampling is seeded and unlimited; a fixed tenth of all captions (by hash) is
held out from training, so evaluation prompts are scenes the model has never seen.

Images are rendered in torch, vectorised over the batch (antialiased signed-distance shapes), so training
draws fresh images on the GPU at no cost; positions, sizes, colours and textures jitter per image.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from flux2lab.common.errors import Flux2LabError

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # RGB in [0, 1]: saturated, far apart, all brighter than any background
    "red": (0.88, 0.16, 0.14),
    "green": (0.16, 0.72, 0.22),
    "blue": (0.18, 0.35, 0.92),
    "yellow": (0.93, 0.85, 0.15),
    "purple": (0.62, 0.22, 0.84),
    "cyan": (0.15, 0.82, 0.85),
}
SIZES = {"small": 5.0, "large": 9.0}  # half extent in pixels of a 64x64 image
POSITIONS = {
    "top": (32.0, 13.0),
    "bottom": (32.0, 51.0),
    "left": (13.0, 32.0),
    "right": (51.0, 32.0),
}  # (x, y)
BACKGROUNDS = ("plain", "striped", "dotted")
SLOTS = tuple(POSITIONS)  # slot order: the classifier's heads and the canonical caption order
HELDOUT_MODULUS = 10  # captions whose hash is 0 modulo this are held out from training
NATIVE = 64  # geometry above is in pixels of a NATIVE x NATIVE image; other sizes scale it


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """What an image shows; `things` in slot order, at distinct positions."""

    things: tuple[Thing, ...]
    background: str

    def at(self, position: str) -> Thing | None:
        return next((t for t in self.things if t.position == position), None)

    @property
    def caption(self) -> str:
        t = self.things
        places = {x.position for x in t}
        if places == {"top", "bottom"}:
            objects = f"{self.at('top').phrase()} above {self.at('bottom').phrase()}"
        elif places == {"left", "right"}:
            objects = f"{self.at('left').phrase()} left of {self.at('right').phrase()}"
        else:
            objects = " and ".join(f"{x.phrase()} at the {x.position}" for x in t)
        return f"{objects} on a {self.background} background"

    @property
    def heldout(self) -> bool:
        return is_heldout(self.caption)


def is_heldout(caption: str) -> bool:
    return int.from_bytes(hashlib.sha256(caption.encode()).digest()[:4], "little") % HELDOUT_MODULUS == 0


def _parse_thing(words: list[str], position: str | None, caption: str) -> Thing:
    if position is None:
        if len(words) != 7 or words[4:6] != ["at", "the"]:
            raise _not_a_caption(caption)
        words, position = words[:4], words[6]
    if (
        len(words) != 4
        or words[0] != "a"
        or words[1] not in SIZES
        or words[2] not in COLOURS
        or words[3] not in SHAPES
        or position not in POSITIONS
    ):
        raise _not_a_caption(caption)
    return Thing(shape=words[3], colour=words[2], size=words[1], position=position)


def _not_a_caption(caption: str) -> Flux2LabError:
    return Flux2LabError(
        f"prompt {caption!r} is not a caption of the mini world, so the yardstick cannot score it. Use "
        "captions from flux2lab.zoo.world (e.g. world.sample_scenes(n, seed, split='heldout'), or `python -m "
        "flux2lab.zoo.world --out prompts.jsonl`), shaped like 'a small red circle above a large blue square "
        "on a plain background'."
    )


def parse_caption(caption: str) -> Scene:
    """The scene a caption of the world describes (inverse of `Scene.caption`)."""
    words = caption.strip().lower().split()
    if (
        len(words) < 4
        or words[-4:-2] != ["on", "a"]
        or words[-1] != "background"
        or words[-2] not in BACKGROUNDS
    ):
        raise _not_a_caption(caption)
    background, words = words[-2], words[:-4]
    if words[4:5] == ["above"] or words[4:6] == ["left", "of"]:
        first, second, rest = (
            ("top", "bottom", words[5:]) if words[4] == "above" else ("left", "right", words[6:])
        )
        things = [_parse_thing(words[:4], first, caption), _parse_thing(rest, second, caption)]
    else:
        parts, current = [], []
        for w in words:
            if w == "and":
                parts.append(current)
                current = []
            else:
                current.append(w)
        parts.append(current)
        things = [_parse_thing(p, None, caption) for p in parts]
    if not 1 <= len(things) <= 3 or len({t.position for t in things}) != len(things):
        raise _not_a_caption(caption)
    scene = Scene(tuple(sorted(things, key=lambda t: SLOTS.index(t.position))), background)
    if scene.caption != " ".join(caption.strip().lower().split()):
        raise _not_a_caption(caption)  # parseable, but not the canonical wording the model was trained on
    return scene


def _random_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
    slots = sorted(rng.choice(len(SLOTS), size=n, replace=False))
    things = tuple(
        Thing(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=list(COLOURS)[rng.integers(len(COLOURS))],
            size=list(SIZES)[rng.integers(len(SIZES))],
            position=SLOTS[s],
        )
        for s in slots
    )
    return Scene(things, BACKGROUNDS[rng.integers(len(BACKGROUNDS))])


def sample_scenes(n: int, seed: int, split: str = "train") -> list[Scene]:
    """`n` scenes drawn with `seed` from the training captions ("train"), the held-out ones, or "all"."""
    if split not in ("train", "heldout", "all"):
        raise Flux2LabError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    rng = np.random.default_rng(seed)
    out: list[Scene] = []
    while len(out) < n:
        scene = _random_scene(rng)
        if split == "all" or scene.heldout == (split == "heldout"):
            out.append(scene)
    return out


# ------------------------------------------------------------------------------------------- rendering


def _scene_arrays(scenes: list[Scene], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-image, per-slot parameters with their jitter (in NATIVE pixels)."""
    n, k = len(scenes), len(SLOTS)
    present = np.zeros((n, k), bool)
    shape = np.zeros((n, k), np.int64)
    colour = np.zeros((n, k, 3), np.float32)
    half = np.zeros((n, k), np.float32)
    centre = np.zeros((n, k, 2), np.float32)
    for i, scene in enumerate(scenes):
        for t in scene.things:
            s = SLOTS.index(t.position)
            present[i, s] = True
            shape[i, s] = SHAPES.index(t.shape)
            colour[i, s] = COLOURS[t.colour]
            half[i, s] = SIZES[t.size]
            centre[i, s] = POSITIONS[t.position]
    colour = np.clip(colour + rng.normal(0, 0.03, colour.shape), 0, 1)
    half = half + rng.uniform(-0.5, 0.5, half.shape)
    centre = centre + rng.uniform(-1.5, 1.5, centre.shape)
    background = np.array([BACKGROUNDS.index(s.background) for s in scenes])
    return dict(
        present=present,
        shape=shape,
        colour=colour,
        half=half,
        centre=centre,
        background=background,
        base=rng.uniform(0.12, 0.42, n),
        contrast=rng.uniform(0.1, 0.18, n),
        angle=rng.choice([0.0, 0.25, 0.5, 0.75], n) * math.pi + rng.uniform(-0.1, 0.1, n),
        period=rng.uniform(6.0, 10.0, n),
        phase=rng.uniform(0, 2 * math.pi, n),
        spacing=rng.uniform(7.0, 9.0, n),
        offset=rng.uniform(0, 8.0, (n, 2)),
    )


def _coverage(sd: torch.Tensor, px: float) -> torch.Tensor:
    """Antialiased coverage from a signed distance (NATIVE pixels; negative inside)."""
    return (0.5 - sd / px).clamp(0, 1)


def render(
    scenes: list[Scene], seed: int, size: int = NATIVE, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Images of the scenes, (N, 3, size, size) float in [0, 1]; the same seed gives the same images."""
    p = {
        k: torch.as_tensor(v, device=device)
        for k, v in _scene_arrays(scenes, np.random.default_rng(seed)).items()
    }
    n = len(scenes)
    px = NATIVE / size  # one output pixel in NATIVE units
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) * px
    y, x = coords.view(1, size, 1), coords.view(1, 1, size)

    def col(v):
        return v.float().view(n, 1, 1)

    # Background: a grey, with stripes or dots in a lighter grey.
    base, contrast = col(p["base"]), col(p["contrast"])
    u = x * torch.cos(col(p["angle"])) + y * torch.sin(col(p["angle"]))
    wave = torch.sin(2 * math.pi * u / col(p["period"]) + col(p["phase"]))
    stripes = (0.5 + wave * col(p["period"]) / (2 * math.pi * px)).clamp(0, 1)  # square wave, soft 1 px edges
    sp = col(p["spacing"])
    dx = torch.remainder(x - col(p["offset"][:, 0]), sp) - sp / 2
    dy = torch.remainder(y - col(p["offset"][:, 1]), sp) - sp / 2
    dots = _coverage(torch.sqrt(dx**2 + dy**2) - 1.6, px)
    kind = col(p["background"])
    pattern = torch.where(kind == 1, stripes, torch.where(kind == 2, dots, torch.zeros_like(dots)))
    image = (base + contrast * pattern).unsqueeze(1).expand(n, 3, size, size).clone()

    for s in range(len(SLOTS)):
        cx, cy = col(p["centre"][:, s, 0]), col(p["centre"][:, s, 1])
        h = col(p["half"][:, s])
        ddx, ddy = x - cx, y - cy
        circle = torch.sqrt(ddx**2 + ddy**2) - h
        square = torch.maximum(ddx.abs(), ddy.abs()) - h
        slant = (2 * ddx.abs() - (ddy + h)) / math.sqrt(5)  # the two sides through the apex (cx, cy - h)
        triangle = torch.maximum(slant, ddy - h)
        kind = col(p["shape"][:, s])
        sd = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
        alpha = (_coverage(sd, px) * col(p["present"][:, s])).unsqueeze(1)
        image = image * (1 - alpha) + p["colour"][:, s].float().view(n, 3, 1, 1) * alpha
    return image.clamp(0, 1)


def targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Class labels per slot for the yardstick: shape (0 = empty, 1.. = SHAPES), colour, size; background."""
    n, k = len(scenes), len(SLOTS)
    shape = torch.zeros(n, k, dtype=torch.long)
    colour = torch.zeros(n, k, dtype=torch.long)
    size = torch.zeros(n, k, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for t in scene.things:
            s = SLOTS.index(t.position)
            shape[i, s] = 1 + SHAPES.index(t.shape)
            colour[i, s] = list(COLOURS).index(t.colour)
            size[i, s] = list(SIZES).index(t.size)
    background = torch.tensor([BACKGROUNDS.index(s.background) for s in scenes])
    return dict(shape=shape, colour=colour, size=size, background=background)


# ------------------------------------------------------------------------------------------------- command


def write_prompts(path, n: int, seed: int = 0, split: str = "heldout") -> list[Scene]:
    """A prompt manifest (JSONL: id, prompt, seed) of n world captions: calibrate/search/compare on mini."""
    import json
    from pathlib import Path

    scenes = sample_scenes(n, seed, split)
    lines = [
        json.dumps({"id": f"{split}-{seed}-{i}", "prompt": s.caption, "seed": seed + i})
        for i, s in enumerate(scenes)
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    return scenes


def main(argv: list[str] | None = None) -> int:
    from flux2lab.cli import command_parser, seed_int
    from flux2lab.common.files import check_output_file

    p = command_parser(
        "zoo.world",
        description="Write a prompt manifest of mini-world captions (held-out ones by default: the model "
        "never trained on them), to calibrate, search or compare on the mini model.",
    )
    p.add_argument("--out", required=True, help="the .jsonl file to write")
    p.add_argument("--n", type=int, default=50, help="number of prompts")
    p.add_argument("--seed", type=seed_int, default=0, help="sampling seed; prompt i gets seed SEED+i")
    p.add_argument(
        "--split",
        default="heldout",
        choices=["heldout", "train", "all"],
        help="held-out captions, training captions, or both",
    )
    args = p.parse_args(argv)
    if args.n < 1:
        raise Flux2LabError("--n must be at least 1.")
    check_output_file(args.out, "--out")
    write_prompts(args.out, args.n, args.seed, args.split)
    print(f"{args.n} {args.split} captions written to {args.out}")
    return 0


if __name__ == "__main__":
    from flux2lab.cli import run_main

    run_main(main)
