"""LPIPS per image pair: torchmetrics' LPIPS with its torchvision backbone loaded from a file, never downloaded.

(Named `perceptual`, not `lpips`, so that `flux2lab.metrics.lpips` stays the function.)
"""

from __future__ import annotations

import os
import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flux2lab.common.errors import Flux2LabError
from flux2lab.metrics.images import Images, pairs, resolve_device

# LPIPS' AlexNet backbone needs >= 32 px and LPIPS was calibrated on 64x64 patches: smaller images are
# upsampled (bilinear) so their short side is this long.
LPIPS_MIN_SIZE = 64
LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16"}  # torchmetrics net name -> torchvision model


@lru_cache(maxsize=2)
def _lpips_net(path: Path, net: str, device: str) -> nn.Module:
    import torchvision
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    # torchmetrics' LPIPS class would fetch the backbone through torchvision's downloader. Build it random
    # (pnet_rand) with torchmetrics' shipped linear layers, then fill the backbone from the checkpoint file.
    lpips_net = _NoTrainLpips(net=net, pnet_rand=True)
    backbone = getattr(torchvision.models, LPIPS_BACKBONES[net])(weights=None)
    try:
        backbone.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise Flux2LabError(
            f"lpips: {path} is not a torchvision {LPIPS_BACKBONES[net]} state dict ({e})"
        ) from e
    for block in lpips_net.net.children():  # slice1..N hold backbone.features[i] under the name "i"
        for index, layer in block.named_children():
            layer.load_state_dict(backbone.features[int(index)].state_dict())
    return lpips_net.to(device)


@torch.inference_mode()
def lpips(
    a: Images,
    b: Images,
    weights: str | os.PathLike,
    *,
    net: str = "alex",
    device: str | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """LPIPS per image pair (0 = identical). `weights`: the torchvision backbone checkpoint for `net`.

    Images whose short side is under LPIPS_MIN_SIZE are upsampled (bilinear) to it first.
    """
    device = resolve_device(device)
    model = _lpips_net(Path(weights), net, device)
    out = []
    for xa, xb in pairs(a, b, batch_size, device):
        short = min(xa.shape[-2:])
        if short < LPIPS_MIN_SIZE:
            size = [round(s * LPIPS_MIN_SIZE / short) for s in xa.shape[-2:]]
            xa, xb = (
                nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
                for x in (xa, xb)
            )
        out.append(model(xa, xb, normalize=True).flatten())
    return torch.cat(out).double().cpu().numpy()
