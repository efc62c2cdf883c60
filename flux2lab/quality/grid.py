"""Figures people look at instead of reading tables: side-by-side image grids with difference maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image


def difference_map(a: Image.Image, b: Image.Image) -> np.ndarray:
    """Mean absolute difference over RGB, in 0..255 pixel levels."""
    return np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean(axis=-1)


def comparison_grid(
    pairs: Sequence[tuple[Image.Image, Image.Image]], captions: Sequence[str], labels: tuple[str, str],
    path: str | Path, max_rows: int = 8,
) -> Path:
    """Rows of A | B | |A-B| heat map (one shared colour scale, so rows compare), like NVIDIA's figures."""
    pairs, captions = list(pairs)[:max_rows], list(captions)[:max_rows]
    diffs = [difference_map(a, b) for a, b in pairs]
    vmax = max(max(float(d.max()) for d in diffs), 1.0)
    fig = Figure(figsize=(9, 3 * len(pairs)))
    axes = fig.subplots(len(pairs), 3, squeeze=False)
    for row, ((a, b), d, cap) in enumerate(zip(pairs, diffs, captions)):
        for col, (img, title) in enumerate([(a, labels[0]), (b, labels[1])]):
            axes[row, col].imshow(img)
            axes[row, col].set_title(title if row == 0 else "", fontsize=10)
        im = axes[row, 2].imshow(d, cmap="inferno", vmin=0, vmax=vmax)
        axes[row, 2].set_title("|A - B| (pixel levels)" if row == 0 else "", fontsize=10)
        axes[row, 0].set_ylabel(cap if len(cap) <= 40 else cap[:37] + "...", fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=axes[:, 2].tolist(), shrink=0.6, label="mean |difference| over RGB (0-255)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path
