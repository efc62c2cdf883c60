"""CLIP score per (image, prompt) with an open_clip model loaded from its checkpoint file, never downloaded."""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flux2lab.common.errors import Flux2LabError
from flux2lab.metrics.images import Images, batches, count, resolve_device


@lru_cache(maxsize=2)
def _clip(path: Path, arch: str, tag: str, device: str):
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    try:
        # A file path as `pretrained` loads that checkpoint and downloads nothing; the tag's QuickGELU flag
        # must then be passed by hand (open_clip only applies it when it resolves the tag itself).
        model = open_clip.create_model(
            arch, pretrained=str(path), force_quick_gelu=cfg.get("quick_gelu", False), device=device
        )
    except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError) as e:
        raise Flux2LabError(f"clip: {path} is not an open_clip {arch} checkpoint ({e})") from e
    prep = open_clip.get_model_preprocess_cfg(model)
    prep.update({k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg})
    return model.eval(), open_clip.get_tokenizer(arch), prep


def _clip_pixels(x: torch.Tensor, prep: dict) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    # open_clip's eval transform is PIL-only (ToTensor); this is the same resize/crop/normalise on a batch
    # already on the device.
    size = list(prep["size"])
    mode = TF.InterpolationMode(prep["interpolation"])
    if prep["resize_mode"] == "squash":
        x = TF.resize(x, size, interpolation=mode, antialias=True)
    elif prep["resize_mode"] == "shortest":
        x = TF.center_crop(TF.resize(x, [max(size)], interpolation=mode, antialias=True), size)
    else:
        raise Flux2LabError(
            f"CLIP resize mode {prep['resize_mode']!r} is not supported (use 'shortest' or 'squash')"
        )
    return TF.normalize(x.clamp(0, 1), list(prep["mean"]), list(prep["std"]))


@torch.inference_mode()
def clip_scores(
    images: Images,
    prompts: Sequence[str],
    weights: str | os.PathLike,
    *,
    model: str = "ViT-B-32",
    pretrained: str = "laion2b_s34b_b79k",
    device: str | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """CLIP score per (image, prompt): 100 * max(cos(image, text), 0), torchmetrics' CLIPScore definition.

    `weights`: the open_clip checkpoint file of `model` trained as `pretrained` (the tag sets preprocessing).
    """
    if len(prompts) != count(images):
        raise Flux2LabError(
            f"CLIP score needs one prompt per image; got {len(prompts)} prompts, {count(images)} images"
        )
    device = resolve_device(device)
    clip_model, tokenizer, prep = _clip(Path(weights), model, pretrained, device)
    out = []
    for start, x in zip(range(0, len(prompts), batch_size), batches(images, batch_size, device)):
        image = nn.functional.normalize(clip_model.encode_image(_clip_pixels(x, prep)).float(), dim=-1)
        tokens = tokenizer(list(prompts[start : start + batch_size])).to(device)
        text = nn.functional.normalize(clip_model.encode_text(tokens).float(), dim=-1)
        out.append(100 * (image * text).sum(-1).clamp(min=0))
    return torch.cat(out).double().cpu().numpy()
