"""Generated images cached by (model, recipe, prompt, seed), so a reference is made once.

Comparisons and searches measure many candidates against the same uncached BF16 reference. On the real
model that reference costs minutes per image, so it is generated once and read back afterwards. The key
covers everything that changes the pixels: the model's identity, the dtype and device type it runs in
(bf16 and float32, or CPU and CUDA kernels, give different images), the recipe's output-relevant fields,
the prompt (with reference images, by content) and the seed. Speed-only fields (compile, CUDA graphs,
parallel degree) are left out: they change how fast an image is made, not which image.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from diffusers import Flux2Pipeline
from PIL import Image
from tqdm.auto import tqdm

from flux2lab.pipeline.core import Generation, ImageRecord, Prompt, generate
from flux2lab.pipeline.models import compute_device, model_info
from flux2lab.pipeline.recipe import Recipe

SPEED_ONLY_FIELDS = ("compile", "cuda_graphs", "ulysses_degree", "offload")


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def image_key(model_id: str, recipe: Recipe, prompt: Prompt, seed: int) -> str:
    recipe_fields = {k: v for k, v in recipe.to_dict().items() if k not in SPEED_ONLY_FIELDS}
    payload = {
        "model": model_id, "recipe": recipe_fields, "prompt": prompt.text, "seed": seed,
        "images": [_file_digest(p) for p in prompt.images],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def model_id(pipe: Flux2Pipeline) -> str:
    """The model's identity and the numerics it runs with, e.g. `tiny/torch.float32/cpu`."""
    info = model_info(pipe)
    name = f"{info.source}@{info.revision}" if info.revision else info.source
    return f"{name}/{pipe.transformer.dtype}/{compute_device(pipe).type}"


class ImageCache:
    """A folder of `<key>.png` + `<key>.json` (the image's record)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> tuple[Image.Image, ImageRecord] | None:
        png, meta = self.root / f"{key}.png", self.root / f"{key}.json"
        if not (png.is_file() and meta.is_file()):
            return None
        rec = json.loads(meta.read_text())
        record = ImageRecord(prompt=rec["prompt"], seed=rec["seed"], wall_s=rec["wall_s"], step_s=rec["step_s"],
                             teacache=rec["teacache"], reference_images=rec["reference_images"],
                             cache_method=rec.get("cache_method", "none"),
                             computed_fraction=rec.get("computed_fraction"), step_fractions=rec.get("step_fractions"))
        with Image.open(png) as im:
            return im.convert("RGB"), record

    def put(self, key: str, image: Image.Image, record: ImageRecord) -> None:
        # The record goes last: an entry counts only once both files are complete.
        image.save(self.root / f"{key}.png")
        tmp = self.root / f"{key}.json.tmp"
        tmp.write_text(json.dumps(record.to_dict()))
        tmp.replace(self.root / f"{key}.json")


def generate_cached(
    pipe: Flux2Pipeline, prompts: Sequence[Prompt], seeds: Sequence[int], recipe: Recipe, cache: ImageCache,
    *, progress: bool = False,
) -> tuple[Generation, int]:
    """`generate`, reading finished images from `cache` and adding new ones; returns (result, newly made)."""
    mid = model_id(pipe)
    keys = [image_key(mid, recipe, p, s) for p, s in zip(prompts, seeds)]
    found = {k: cache.get(k) for k in keys}
    missing = [i for i, k in enumerate(keys) if found[k] is None]
    # One image at a time, stored as soon as it exists: an interrupted run keeps what it finished.
    for i in tqdm(missing, desc="generating", unit="img", disable=not (progress and missing)):
        new = generate(pipe, [prompts[i]], [seeds[i]], recipe)
        cache.put(keys[i], new.images[0], new.records[0])
        found[keys[i]] = (new.images[0], new.records[0])
    return Generation(images=[found[k][0] for k in keys], records=[found[k][1] for k in keys]), len(missing)
