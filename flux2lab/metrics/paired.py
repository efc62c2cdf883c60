"""Pixel metrics per image pair: PSNR and SSIM (torchmetrics)."""

from __future__ import annotations

import numpy as np
import torch

from flux2lab.metrics.images import Images, pairs, resolve_device


@torch.inference_mode()
def psnr(a: Images, b: Images, *, device: str | None = None, batch_size: int = 32) -> np.ndarray:
    """PSNR (dB) per image pair; +inf for identical images (kept as inf, see `bootstrap_ci`)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    out = [
        peak_signal_noise_ratio(xa, xb, data_range=1.0, reduction="none", dim=(1, 2, 3))
        for xa, xb in pairs(a, b, batch_size, resolve_device(device))
    ]
    return torch.cat(out).double().cpu().numpy()


@torch.inference_mode()
def ssim(a: Images, b: Images, *, device: str | None = None, batch_size: int = 32) -> np.ndarray:
    """SSIM per image pair (Gaussian 11x11 window, sigma 1.5: torchmetrics' defaults)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    out = [
        structural_similarity_index_measure(xa, xb, data_range=1.0, reduction="none")
        for xa, xb in pairs(a, b, batch_size, resolve_device(device))
    ]
    return torch.cat(out).double().cpu().numpy()
