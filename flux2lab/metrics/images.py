"""The images metrics take, turned into float (B,3,H,W) batches in [0,1] on the device, one batch at a time.

Images: a uint8 tensor (N,3,H,W) in [0,255], a float tensor (N,3,H,W) in [0,1], or a sequence of PIL images,
image file paths or (3,H,W) tensors. All images of one set that land in one batch must share a size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch
from PIL import Image

from flux2lab.common.errors import Flux2LabError

Images = torch.Tensor | Sequence[Image.Image | str | os.PathLike | torch.Tensor]


def count(images: Images) -> int:
    return images.shape[0] if isinstance(images, torch.Tensor) else len(images)


def resolve_device(device: str | None) -> str:
    """`device`, or "cuda" when there is a GPU, else "cpu"."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _as_tensor(item) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    from torchvision.transforms.v2 import functional as TF

    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as img:
            return TF.pil_to_tensor(img.convert("RGB"))
    if isinstance(item, Image.Image):
        return TF.pil_to_tensor(item.convert("RGB"))
    raise Flux2LabError(
        f"unsupported image type {type(item).__name__}: give PIL images, file paths or tensors"
    )


def batches(images: Images, batch_size: int, device: str) -> Iterator[torch.Tensor]:
    """Float (B,3,H,W) batches in [0,1] on `device`, converted one batch at a time to bound memory."""
    for start in range(0, count(images), batch_size):
        chunk = images[start : start + batch_size]
        if not isinstance(chunk, torch.Tensor):
            items = [_as_tensor(item) for item in chunk]
            sizes = sorted({tuple(t.shape) for t in items})
            if len(sizes) > 1:
                raise Flux2LabError(
                    f"images {start}..{start + len(items) - 1} differ in shape {sizes}; resize them"
                )
            chunk = torch.stack(items)
        if chunk.ndim != 4 or chunk.shape[1] != 3:
            raise Flux2LabError(f"expected images shaped (N,3,H,W), got {tuple(chunk.shape)}")
        chunk = chunk.to(device)
        if chunk.dtype == torch.uint8:
            yield chunk.float() / 255
        elif chunk.is_floating_point():
            low, high = chunk.min().item(), chunk.max().item()
            if low < 0 or high > 1:
                raise Flux2LabError(f"float images must lie in [0, 1]; got values in [{low:.3g}, {high:.3g}]")
            yield chunk.float()
        else:
            raise Flux2LabError(f"images must be uint8 in [0,255] or float in [0,1], not {chunk.dtype}")


def pairs(a: Images, b: Images, batch_size: int, device: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of two paired image sets side by side (same count, same size pair by pair)."""
    if count(a) != count(b):
        raise Flux2LabError(
            f"paired metrics need as many images in both sets; got {count(a)} and {count(b)}"
        )
    for start, (xa, xb) in enumerate(zip(batches(a, batch_size, device), batches(b, batch_size, device))):
        if xa.shape != xb.shape:
            raise Flux2LabError(
                f"batch at image {start * batch_size}: sizes differ ({tuple(xa.shape[2:])} vs {tuple(xb.shape[2:])})"
            )
        yield xa, xb


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0,1] back to uint8 pixel levels."""
    return (x * 255).round().to(torch.uint8)
