"""FID between two image sets (torchmetrics' InceptionV3 from a file, or any feature extractor), and the
Fréchet distance of precomputed features.

(Named `frechet`, not `fid`, so that `flux2lab.metrics.fid` stays the function.)
"""

from __future__ import annotations

import os
import pickle
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from flux2lab.common.errors import Flux2LabError
from flux2lab.metrics.images import Images, batches, count, resolve_device, to_uint8

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance


class _GivenFeatures(nn.Module):
    """Passes precomputed features to torchmetrics' FID unchanged, so one Fréchet computation serves all."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid_from_features(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two (N, d) feature sets (N may differ, each >= 2)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fa, fb = (torch.as_tensor(np.asarray(f), dtype=torch.float64) for f in (features_a, features_b))
    if fa.ndim != 2 or fb.ndim != 2 or fa.shape[1] != fb.shape[1]:
        raise Flux2LabError(
            f"features must be (N, d) with the same d; got {tuple(fa.shape)} and {tuple(fb.shape)}"
        )
    if min(fa.shape[0], fb.shape[0]) < 2:
        raise Flux2LabError(f"FID needs at least 2 samples per set; got {fa.shape[0]} and {fb.shape[0]}")
    metric = FrechetInceptionDistance(feature=_GivenFeatures(fa.shape[1]))
    metric.update(fa, real=True)
    metric.update(fb, real=False)
    return float(metric.compute())


@lru_cache(maxsize=2)
def _fid_metric(path: Path, feature: int, device: str) -> FrechetInceptionDistance:
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        metric = FrechetInceptionDistance(feature=feature, feature_extractor_weights_path=str(path))
    except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError) as e:
        raise Flux2LabError(f"fid: {path} is not torch-fidelity's InceptionV3 state dict ({e})") from e
    return metric.to(device)


@torch.inference_mode()
def fid(
    a: Images,
    b: Images,
    weights: str | os.PathLike | None = None,
    *,
    extractor: nn.Module | None = None,
    feature: int = 2048,
    device: str | None = None,
    batch_size: int = 32,
) -> float:
    """FID between two image sets (sizes and counts may differ; >= 2 images each).

    Default features: torchmetrics' FID InceptionV3 (layer `feature`) loaded from `weights`; it resizes
    every image to 299x299 itself. `extractor` replaces it (a "domain FID"): a module mapping float images
    in [0,1], (B,3,H,W), to (B, d) features; it is moved to `device`.
    """
    device = resolve_device(device)
    if min(count(a), count(b)) < 2:
        raise Flux2LabError(f"FID needs at least 2 images per set; got {count(a)} and {count(b)}")
    if extractor is not None:
        extractor = extractor.to(device)
        features = [torch.cat([extractor(x) for x in batches(s, batch_size, device)]) for s in (a, b)]
        return fid_from_features(*(f.double().cpu() for f in features))
    if weights is None:
        raise ValueError("fid needs `weights` (the InceptionV3 checkpoint) or an `extractor`")
    metric = _fid_metric(Path(weights), feature, device)
    metric.reset()
    for images, real in ((a, True), (b, False)):
        for x in batches(images, batch_size, device):
            metric.update(to_uint8(x), real=real)
    return float(metric.compute())
