"""The yardstick: a small CNN that reads a world image back into its scene, scoring prompt adherence.

It predicts, for each place (top, bottom, left, right), which shape is there (or none), its colour and size,
and the background. An image's *attribute accuracy* against its prompt is the fraction of the prompt's
facts it shows: each stated thing's shape, colour and size at its stated place, each unstated place left
empty, and the background. That is a checkable stand-in for CLIP score on this world. The classifier's
penultimate features give a *domain FID* (Fréchet distance between feature Gaussians), a stand-in for FID.

Both are exposed through `flux2lab.metrics` as the metric "yardstick", registered when this module is
imported (`import flux2lab.zoo` does it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from flux2lab.common.errors import Flux2LabError
from flux2lab.metrics import WeightFile, WeightSpec, fid_from_features, register_metric
from flux2lab.zoo import store, world

FEATURES = 128
ENV_VAR = "FLUX2LAB_YARDSTICK_WEIGHTS"


class Yardstick(nn.Module):
    """Conv trunk -> FEATURES-d vector -> one head per (place, attribute) and one for the background."""

    def __init__(self, width: int = 32, features: int = FEATURES):
        super().__init__()
        w = width

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        # 64 -> 32 -> 16 -> 8; the flattened 8x8 map keeps *where* things are, which the heads need.
        self.trunk = nn.Sequential(
            block(3, w, 1),
            block(w, 2 * w, 2),
            block(2 * w, 4 * w, 2),
            block(4 * w, 4 * w, 2),
            nn.Conv2d(4 * w, w, 1),
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(w * 64, features), nn.SiLU())
        k = len(world.SLOTS)
        self.heads = nn.ModuleDict(
            {
                "shape": nn.Linear(features, k * (1 + len(world.SHAPES))),
                "colour": nn.Linear(features, k * len(world.COLOURS)),
                "size": nn.Linear(features, k * len(world.SIZES)),
                "background": nn.Linear(features, len(world.BACKGROUNDS)),
            }
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, FEATURES) from float images in [0, 1], any size (resized to the world's 64x64)."""
        if images.shape[-2:] != (world.NATIVE, world.NATIVE):
            images = F.interpolate(
                images,
                size=(world.NATIVE, world.NATIVE),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        return self.embed(self.trunk(images * 2 - 1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        b, k = f.shape[0], len(world.SLOTS)
        return {
            name: head(f) if name == "background" else head(f).view(b, k, -1)
            for name, head in self.heads.items()
        }

    def loss(self, images: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self(images)
        present = target["shape"] > 0
        loss = F.cross_entropy(out["shape"].flatten(0, 1), target["shape"].flatten())
        loss = loss + F.cross_entropy(out["background"], target["background"])
        for name in ("colour", "size"):  # only where there is a thing to have a colour and size
            loss = loss + F.cross_entropy(out[name][present], target[name][present])
        return loss


# --------------------------------------------------------------------------------------------- reading


def to_tensor(images) -> torch.Tensor:
    """Float (N,3,H,W) in [0,1] from a tensor (uint8 or float) or a sequence of PIL images."""
    if isinstance(images, torch.Tensor):
        return images.float() / 255 if images.dtype == torch.uint8 else images.float()
    arrays = np.stack([np.asarray(im.convert("RGB")) for im in images])  # (N, H, W, 3) uint8
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255


@torch.inference_mode()
def _batched(model: Yardstick, images, fn, batch_size: int = 256) -> torch.Tensor | dict:
    x = to_tensor(images)
    device = next(model.parameters()).device
    outs = [fn(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    if isinstance(outs[0], dict):
        return {k: torch.cat([o[k] for o in outs]).cpu() for k in outs[0]}
    return torch.cat(outs).cpu()


def read(model: Yardstick, images) -> list[world.Scene]:
    """The scene the yardstick sees in each image."""
    out = _batched(model, images, model)
    shape, colour, size = (out[k].argmax(-1) for k in ("shape", "colour", "size"))
    background = out["background"].argmax(-1)
    scenes = []
    for i in range(len(background)):
        things = tuple(
            world.Thing(
                world.SHAPES[shape[i, s] - 1],
                list(world.COLOURS)[colour[i, s]],
                list(world.SIZES)[size[i, s]],
                slot,
            )
            for s, slot in enumerate(world.SLOTS)
            if shape[i, s] > 0
        )
        scenes.append(world.Scene(things, world.BACKGROUNDS[background[i]]))
    return scenes


def facts(seen: world.Scene, stated: world.Scene) -> list[bool]:
    """Each fact the stated scene asserts, checked against what is seen (see the module docstring)."""
    checks = [seen.background == stated.background]
    for slot in world.SLOTS:
        want, got = stated.at(slot), seen.at(slot)
        if want is None:
            checks.append(got is None)
        else:
            checks += [
                got is not None and getattr(got, a) == getattr(want, a) for a in ("shape", "colour", "size")
            ]
    return checks


def attribute_accuracy(model: Yardstick, images, prompts: Sequence[str | world.Scene]) -> np.ndarray:
    """Per image: the fraction of its prompt's facts the image shows."""
    stated = [p if isinstance(p, world.Scene) else world.parse_caption(p) for p in prompts]
    if len(stated) != len(images):
        raise Flux2LabError(f"attribute accuracy needs one prompt per image; got {len(stated)} prompts")
    return np.array([np.mean(facts(seen, want)) for seen, want in zip(read(model, images), stated)])


def features(model: Yardstick, images) -> np.ndarray:
    return _batched(model, images, model.features).double().numpy()


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets."""
    try:
        return fid_from_features(features_a, features_b)
    except (ImportError, RuntimeError):
        # The training GPU may lack (or mismatch) torchmetrics/torchvision/open_clip: same formula in torch.
        a, b = (torch.as_tensor(f, dtype=torch.float64) for f in (features_a, features_b))
        ca, cb = torch.cov(a.T), torch.cov(b.T)
        covmean = torch.linalg.eigvals(ca @ cb).sqrt().real.sum()
        return float(((a.mean(0) - b.mean(0)) ** 2).sum() + ca.trace() + cb.trace() - 2 * covmean)


def domain_fid(model: Yardstick, images_a, images_b) -> float:
    return frechet_distance(features(model, images_a), features(model, images_b))


# ---------------------------------------------------------------------------------------------- weights


def weights_path() -> Path:
    """$FLUX2LAB_YARDSTICK_WEIGHTS, else the shipped file."""
    return Path(os.environ.get(ENV_VAR) or store.path_of("yardstick"))


@lru_cache(maxsize=4)
def load(path: str | Path | None = None, device: str = "cpu") -> Yardstick:
    path = Path(path) if path else weights_path()
    if path.is_dir():
        path = store.path_of("yardstick", path)
    model = Yardstick(**store.read_config(path))
    return store.load_into(model, path).to(device).eval()


# ------------------------------------------------------------------------------------ flux2lab.metrics


def _locate(options):
    path = store.path_of("yardstick")
    return WeightFile(
        (path.name,),
        str(path.parent),
        path if path.is_file() else None,
        f"no download needed: it ships with flux2lab, or train it with `{store.TRAIN_COMMAND}`",
    )


def _metric(inputs, path, options) -> dict:
    """accuracy_{reference,candidate,delta} per image (against the prompts); domain_fid between the sets."""
    model = load(path, options.resolved_device())
    ref = attribute_accuracy(model, inputs.reference, inputs.prompts)
    cand = attribute_accuracy(model, inputs.candidate, inputs.prompts)
    return {
        "accuracy_reference": ref,
        "accuracy_candidate": cand,
        "accuracy_delta": cand - ref,
        "domain_fid": domain_fid(model, inputs.reference, inputs.candidate),
    }


register_metric(
    "yardstick", _metric, weights=WeightSpec(ENV_VAR, "--yardstick-weights", _locate), needs_prompts=True
)
