"""Image-quality metrics: FID, LPIPS, CLIP score, PSNR, SSIM, per image and aggregated with bootstrap CIs.

Why this module: compare and search must compute the same numbers the same way on machines without internet.
Every metric with learned weights is resolved *before* anything is generated (`check_weights`): from a path
the user gives (a flag or an environment variable) or from the standard cache where the library itself looks.
A missing file is a `Flux2LabError` naming the file, the folder it belongs in, the variable and the flag.
Nothing here downloads: models are built empty and filled from the resolved file.

The numbers come from torchmetrics (FID, LPIPS, PSNR, SSIM) and open_clip (CLIP score). This module resolves
weights, loads them, batches images onto the device (the GPU when there is one) and aggregates.

Metrics live in a registry (`METRICS`, `register_metric`): a new one (e.g. a domain classifier's attribute
accuracy or domain FID) is a function plus one `register_metric` call, and gets its weight flag, its
environment variable, the missing-weights check and bootstrap CIs for free.

Images: a uint8 tensor (N,3,H,W) in [0,255], a float tensor (N,3,H,W) in [0,1], or a sequence of PIL images,
image file paths or (3,H,W) tensors. All images of one set that land in one batch must share a size.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import open_clip
import torch
import torchvision
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from PIL import Image
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.functional.image.lpips import _NoTrainLpips
from torchmetrics.image.fid import FrechetInceptionDistance
from torchvision.transforms.v2 import functional as TF

from flux2lab.common.errors import Flux2LabError

log = logging.getLogger(__name__)

Images = torch.Tensor | Sequence[Image.Image | str | os.PathLike | torch.Tensor]

# LPIPS' AlexNet backbone needs >= 32 px and LPIPS was calibrated on 64x64 patches: smaller images are
# upsampled (bilinear) so their short side is this long.
LPIPS_MIN_SIZE = 64
_LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16"}  # torchmetrics net name -> torchvision model


@dataclass(frozen=True)
class MetricOptions:
    """Choices shared by weight resolution and computation."""

    device: str | None = None  # None: "cuda" when available, else "cpu"
    batch_size: int = 32
    clip_model: str = "ViT-B-32"  # open_clip architecture
    clip_pretrained: str = "laion2b_s34b_b79k"  # open_clip pretrained tag (decides the cached file)
    fid_feature: int = 2048  # InceptionV3 layer for FID: 64, 192, 768 or 2048

    def resolved_device(self) -> str:
        return _device(self.device)


# ----------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightFile:
    """One metric's weight file as its library's standard cache knows it."""

    filenames: tuple[str, ...]  # accepted names, preferred first
    cache_dir: str  # the folder the library looks in (shown to the user as "put it here")
    found: Path | None  # the cached file, when present
    source: str  # how to get it on a machine with internet


@dataclass(frozen=True)
class WeightSpec:
    """How a metric's weights are given: flag, environment variable, and where the standard cache has them."""

    env_var: str
    flag: str
    locate: Callable[[MetricOptions], WeightFile]


def _torch_hub_file(url: str) -> WeightFile:
    """A checkpoint that torch.hub.load_state_dict_from_url would cache under $TORCH_HOME/hub/checkpoints."""
    name = os.path.basename(url)
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    path = cache_dir / name
    return WeightFile((name,), str(cache_dir), path if path.is_file() else None, f"download {url}")


def _locate_fid(options: MetricOptions) -> WeightFile:
    return _torch_hub_file(URL_INCEPTION_V3)  # what torchmetrics' default FID (via torch-fidelity) loads


def _locate_lpips(net: str) -> Callable[[MetricOptions], WeightFile]:
    # torchmetrics ships LPIPS' linear layers; only the torchvision backbone comes from the torch hub cache.
    weights_enum = torchvision.models.get_model_weights(_LPIPS_BACKBONES[net]).DEFAULT
    return lambda options: _torch_hub_file(weights_enum.url)


def _locate_clip(options: MetricOptions) -> WeightFile:
    arch, tag = options.clip_model, options.clip_pretrained
    if arch not in open_clip.list_models():
        raise Flux2LabError(f"unknown CLIP model {arch!r}; open_clip knows {open_clip.list_models()}")
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise Flux2LabError(
            f"unknown CLIP pretrained tag {tag!r} for {arch}; known: {open_clip.list_pretrained_tags_by_model(arch)}"
        )
    if cfg.get("hf_hub"):  # open_clip prefers the Hugging Face hub when a tag has one
        # Same file choice as open_clip.pretrained.download_pretrained_from_hf: a .safetensors twin first.
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        if filename == HF_WEIGHTS_NAME:
            names = (HF_SAFE_WEIGHTS_NAME, filename)
        elif filename.endswith((".bin", ".pth")):
            names = (filename[:-4] + ".safetensors", filename)
        else:
            names = (filename,)
        hits = [try_to_load_from_cache(repo, name) for name in names]
        found = next((Path(hit) for hit in hits if isinstance(hit, str)), None)
        cache_dir = (
            Path(hf_constants.HF_HUB_CACHE)
            / f"models--{repo.replace('/', '--')}"
            / "snapshots"
            / "<revision>"
        )
        return WeightFile(names, str(cache_dir), found, f"`hf download {repo} {names[0]}` fills that cache")
    name = os.path.basename(cfg["url"])
    cache_dir = Path("~/.cache/clip").expanduser()  # open_clip's download_pretrained_from_url default
    path = cache_dir / name
    return WeightFile((name,), str(cache_dir), path if path.is_file() else None, f"download {cfg['url']}")


# -------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class MetricInputs:
    """What a metric function sees: two paired image sets and, for text metrics, one prompt per pair."""

    reference: Images
    candidate: Images
    prompts: Sequence[str] | None = None


MetricFn = Callable[[MetricInputs, Path | None, MetricOptions], dict[str, np.ndarray | float]]


@dataclass(frozen=True)
class Metric:
    """A registered metric: `fn` returns {result name: per-image values (array) or one set-level value}."""

    fn: MetricFn
    weights: WeightSpec | None = None
    needs_prompts: bool = False


METRICS: dict[str, Metric] = {}


def register_metric(
    name: str, fn: MetricFn, *, weights: WeightSpec | None = None, needs_prompts: bool = False
):
    """Add a metric under `name` (used in metric lists, in `check_weights` and as the --<name>-weights flag)."""
    if name in METRICS:
        raise ValueError(f"metric {name!r} is already registered")
    METRICS[name] = Metric(fn, weights, needs_prompts)


def _given_path(
    name: str, given: str | os.PathLike, how: str, spec: WeightSpec, options: MetricOptions
) -> Path:
    """The file behind a path the user gave (`how`: "--flag " or "VAR="); a folder is searched for the file."""
    path = Path(given).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        names = spec.locate(options).filenames
        for filename in names:
            if (path / filename).is_file():
                return path / filename
        raise Flux2LabError(f"{name}: {how}{given} is a folder without {' or '.join(names)}")
    # A wrong explicit path is an error even with --skip-missing: skipping would hide a typo.
    raise Flux2LabError(f"{name}: {how}{given}: no such file or folder")


def _missing_message(name: str, spec: WeightSpec, wf: WeightFile) -> str:
    return (
        f"{name}: weight file {' or '.join(wf.filenames)} not found. Put it in {wf.cache_dir}/ (the standard "
        f"cache), or anywhere and pass {spec.flag} PATH or set {spec.env_var}=PATH. "
        f"To get it on a machine with internet: {wf.source}."
    )


def check_weights(
    metric_names: Sequence[str],
    paths: Mapping[str, str | os.PathLike | None] | None = None,
    *,
    skip_missing: bool = False,
    options: MetricOptions | None = None,
) -> dict[str, Path | None]:
    """Resolve every requested metric's weights; call it before generating anything.

    Order: `paths[name]` (the command-line flag), then the metric's environment variable, then the standard
    cache. Returns {name: weight file, or None for metrics without weights} for the metrics that will run.
    Missing weights raise one `Flux2LabError` listing every missing file; with `skip_missing` those metrics
    are left out of the result and each is logged as a warning instead.
    """
    options = options or MetricOptions()
    paths = {k: v for k, v in (paths or {}).items() if v is not None}
    unknown = [n for n in [*metric_names, *paths] if n not in METRICS]
    if unknown:
        raise Flux2LabError(f"unknown metric(s) {unknown}; available: {sorted(METRICS)}")
    resolved: dict[str, Path | None] = {}
    missing: list[str] = []
    for name in dict.fromkeys(metric_names):
        spec = METRICS[name].weights
        if spec is None:
            resolved[name] = None
        elif name in paths:
            resolved[name] = _given_path(name, paths[name], f"{spec.flag} ", spec, options)
        elif os.environ.get(spec.env_var):
            resolved[name] = _given_path(name, os.environ[spec.env_var], f"{spec.env_var}=", spec, options)
        else:
            wf = spec.locate(options)
            if wf.found is not None:
                resolved[name] = wf.found
            else:
                missing.append(_missing_message(name, spec, wf))
    if missing and not skip_missing:
        raise Flux2LabError("\n".join(missing) + "\n(or pass --skip-missing to run without these metrics)")
    for message in missing:
        log.warning("skipping %s", message)
    return resolved


# ----------------------------------------------------------------------------------------------- images


def _count(images: Images) -> int:
    return images.shape[0] if isinstance(images, torch.Tensor) else len(images)


def _as_tensor(item) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as img:
            return TF.pil_to_tensor(img.convert("RGB"))
    if isinstance(item, Image.Image):
        return TF.pil_to_tensor(item.convert("RGB"))
    raise Flux2LabError(
        f"unsupported image type {type(item).__name__}: give PIL images, file paths or tensors"
    )


def _batches(images: Images, batch_size: int, device: str) -> Iterator[torch.Tensor]:
    """Float (B,3,H,W) batches in [0,1] on `device`, converted one batch at a time to bound memory."""
    for start in range(0, _count(images), batch_size):
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


def _pairs(a: Images, b: Images, batch_size: int, device: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if _count(a) != _count(b):
        raise Flux2LabError(
            f"paired metrics need as many images in both sets; got {_count(a)} and {_count(b)}"
        )
    for start, (xa, xb) in enumerate(zip(_batches(a, batch_size, device), _batches(b, batch_size, device))):
        if xa.shape != xb.shape:
            raise Flux2LabError(
                f"batch at image {start * batch_size}: sizes differ ({tuple(xa.shape[2:])} vs {tuple(xb.shape[2:])})"
            )
        yield xa, xb


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().to(torch.uint8)


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------- paired metrics


@torch.inference_mode()
def psnr(a: Images, b: Images, *, device: str | None = None, batch_size: int = 32) -> np.ndarray:
    """PSNR (dB) per image pair; +inf for identical images (kept as inf, see `bootstrap_ci`)."""
    out = [
        peak_signal_noise_ratio(xa, xb, data_range=1.0, reduction="none", dim=(1, 2, 3))
        for xa, xb in _pairs(a, b, batch_size, _device(device))
    ]
    return torch.cat(out).double().cpu().numpy()


@torch.inference_mode()
def ssim(a: Images, b: Images, *, device: str | None = None, batch_size: int = 32) -> np.ndarray:
    """SSIM per image pair (Gaussian 11x11 window, sigma 1.5: torchmetrics' defaults)."""
    out = [
        structural_similarity_index_measure(xa, xb, data_range=1.0, reduction="none")
        for xa, xb in _pairs(a, b, batch_size, _device(device))
    ]
    return torch.cat(out).double().cpu().numpy()


@lru_cache(maxsize=2)
def _lpips_net(path: Path, net: str, device: str) -> nn.Module:
    # torchmetrics' LPIPS class would fetch the backbone through torchvision's downloader. Build it random
    # (pnet_rand) with torchmetrics' shipped linear layers, then fill the backbone from the checkpoint file.
    lpips_net = _NoTrainLpips(net=net, pnet_rand=True)
    backbone = getattr(torchvision.models, _LPIPS_BACKBONES[net])(weights=None)
    try:
        backbone.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise Flux2LabError(
            f"lpips: {path} is not a torchvision {_LPIPS_BACKBONES[net]} state dict ({e})"
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
    device = _device(device)
    model = _lpips_net(Path(weights), net, device)
    out = []
    for xa, xb in _pairs(a, b, batch_size, device):
        short = min(xa.shape[-2:])
        if short < LPIPS_MIN_SIZE:
            size = [round(s * LPIPS_MIN_SIZE / short) for s in xa.shape[-2:]]
            xa, xb = (
                nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
                for x in (xa, xb)
            )
        out.append(model(xa, xb, normalize=True).flatten())
    return torch.cat(out).double().cpu().numpy()


# ------------------------------------------------------------------------------------------------- FID


class _GivenFeatures(nn.Module):
    """Passes precomputed features to torchmetrics' FID unchanged, so one Fréchet computation serves all."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid_from_features(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two (N, d) feature sets (N may differ, each >= 2)."""
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
    device = _device(device)
    if min(_count(a), _count(b)) < 2:
        raise Flux2LabError(f"FID needs at least 2 images per set; got {_count(a)} and {_count(b)}")
    if extractor is not None:
        extractor = extractor.to(device)
        features = [torch.cat([extractor(x) for x in _batches(s, batch_size, device)]) for s in (a, b)]
        return fid_from_features(*(f.double().cpu() for f in features))
    if weights is None:
        raise ValueError("fid needs `weights` (the InceptionV3 checkpoint) or an `extractor`")
    metric = _fid_metric(Path(weights), feature, device)
    metric.reset()
    for images, real in ((a, True), (b, False)):
        for x in _batches(images, batch_size, device):
            metric.update(_to_uint8(x), real=real)
    return float(metric.compute())


# ------------------------------------------------------------------------------------------ CLIP score


@lru_cache(maxsize=2)
def _clip(path: Path, arch: str, tag: str, device: str):
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
    if len(prompts) != _count(images):
        raise Flux2LabError(
            f"CLIP score needs one prompt per image; got {len(prompts)} prompts, {_count(images)} images"
        )
    device = _device(device)
    clip_model, tokenizer, prep = _clip(Path(weights), model, pretrained, device)
    out = []
    for start, x in zip(range(0, len(prompts), batch_size), _batches(images, batch_size, device)):
        image = nn.functional.normalize(clip_model.encode_image(_clip_pixels(x, prep)).float(), dim=-1)
        tokens = tokenizer(list(prompts[start : start + batch_size])).to(device)
        text = nn.functional.normalize(clip_model.encode_text(tokens).float(), dim=-1)
        out.append(100 * (image * text).sum(-1).clamp(min=0))
    return torch.cat(out).double().cpu().numpy()


# ---------------------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Summary:
    """Mean of per-image values with a bootstrap CI.

    mean/low/high are over the finite values; `n_inf` counts the infinite ones left out (PSNR of identical
    images). When every value is infinite, mean/low/high are that infinity.
    """

    mean: float
    low: float
    high: float
    n: int  # all values, infinite ones included
    n_inf: int


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> Summary:
    """Percentile bootstrap (1 - alpha) CI of the mean, deterministic for a given seed."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    infinite = np.isinf(v)
    finite = v[~infinite]
    if finite.size == 0:
        return Summary(float(v[0]), float(v[0]), float(v[0]), int(v.size), int(v.size))
    rng = np.random.default_rng(seed)
    means = finite[rng.integers(0, finite.size, size=(n_boot, finite.size))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Summary(float(finite.mean()), float(low), float(high), int(v.size), int(infinite.sum()))


def _json_float(x: float) -> float | str:
    """JSON has no inf/nan: non-finite numbers are written as the strings "inf", "-inf", "nan" (float() reads them)."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


@dataclass(frozen=True)
class MetricResult:
    """One result: per-image values with their summary, or one set-level value (FID)."""

    name: str
    value: float  # the headline: summary.mean, or the set-level value
    per_image: np.ndarray | None = field(default=None, repr=False)
    summary: Summary | None = None

    def to_dict(self) -> dict:
        """JSON-safe dict; infinities become "inf" (see `_json_float`)."""
        out: dict = {"name": self.name, "value": _json_float(self.value)}
        if self.summary is not None:
            out["summary"] = {
                k: _json_float(v) if isinstance(v, float) else v for k, v in vars(self.summary).items()
            }
        if self.per_image is not None:
            out["per_image"] = [_json_float(x) for x in self.per_image]
        return out


def evaluate(
    reference: Images,
    candidate: Images,
    weights: Mapping[str, Path | None],
    *,
    prompts: Sequence[str] | None = None,
    options: MetricOptions | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, MetricResult]:
    """Run the metrics in `weights` (what `check_weights` returned) on paired image sets.

    Per-image results get a bootstrap CI of their mean; set-level ones (FID) are one number. Result names
    are the metric names, except CLIP, which gives clip_reference, clip_candidate and clip_delta
    (candidate - reference, per image).
    """
    options = options or MetricOptions()
    if _count(reference) != _count(candidate):
        raise Flux2LabError(
            f"reference has {_count(reference)} images, candidate {_count(candidate)}; they must pair up"
        )
    inputs = MetricInputs(reference, candidate, prompts)
    results: dict[str, MetricResult] = {}
    for name, path in weights.items():
        metric = METRICS[name]
        if metric.weights is not None and path is None:
            raise Flux2LabError(f"{name}: no weight file given; resolve it with check_weights first")
        if metric.needs_prompts and prompts is None:
            raise Flux2LabError(f"{name} needs the prompts")
        for key, value in metric.fn(inputs, path, options).items():
            if isinstance(value, np.ndarray):
                summary = bootstrap_ci(value, n_boot=n_boot, alpha=alpha, seed=seed)
                results[key] = MetricResult(key, summary.mean, value, summary)
            else:
                results[key] = MetricResult(key, float(value))
    return results


# ---------------------------------------------------------------------------------------- command line


def add_weight_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --<metric>-weights PATH for every registered metric with weights, and --skip-missing."""
    for name, metric in METRICS.items():
        if metric.weights is not None:
            parser.add_argument(
                metric.weights.flag,
                metavar="PATH",
                dest=f"{name}_weights",
                help=f"{name} weight file or folder (default: ${metric.weights.env_var}, then the standard cache)",
            )
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="skip metrics whose weights are missing instead of stopping",
    )


def weight_paths(args: argparse.Namespace) -> dict[str, str]:
    """The --<metric>-weights values given on the command line, as `check_weights` takes them."""
    return {
        name: getattr(args, f"{name}_weights") for name in METRICS if getattr(args, f"{name}_weights", None)
    }


# ---------------------------------------------------------------------------------------- built-ins


def _psnr_metric(inputs: MetricInputs, path: Path | None, options: MetricOptions) -> dict:
    return {
        "psnr": psnr(inputs.reference, inputs.candidate, device=options.device, batch_size=options.batch_size)
    }


def _ssim_metric(inputs: MetricInputs, path: Path | None, options: MetricOptions) -> dict:
    return {
        "ssim": ssim(inputs.reference, inputs.candidate, device=options.device, batch_size=options.batch_size)
    }


def _lpips_metric(net: str, name: str) -> MetricFn:
    def run(inputs: MetricInputs, path: Path | None, options: MetricOptions) -> dict:
        values = lpips(
            inputs.reference,
            inputs.candidate,
            path,
            net=net,
            device=options.device,
            batch_size=options.batch_size,
        )
        return {name: values}

    return run


def _fid_metric_fn(inputs: MetricInputs, path: Path | None, options: MetricOptions) -> dict:
    value = fid(
        inputs.reference,
        inputs.candidate,
        path,
        feature=options.fid_feature,
        device=options.device,
        batch_size=options.batch_size,
    )
    return {"fid": value}


def _clip_metric(inputs: MetricInputs, path: Path | None, options: MetricOptions) -> dict:
    ref, cand = (
        clip_scores(
            images,
            inputs.prompts,
            path,
            model=options.clip_model,
            pretrained=options.clip_pretrained,
            device=options.device,
            batch_size=options.batch_size,
        )
        for images in (inputs.reference, inputs.candidate)
    )
    return {"clip_reference": ref, "clip_candidate": cand, "clip_delta": cand - ref}


register_metric("psnr", _psnr_metric)
register_metric("ssim", _ssim_metric)
register_metric(
    "lpips",
    _lpips_metric("alex", "lpips"),
    weights=WeightSpec("FLUX2LAB_LPIPS_WEIGHTS", "--lpips-weights", _locate_lpips("alex")),
)
register_metric(
    "lpips_vgg",
    _lpips_metric("vgg", "lpips_vgg"),
    weights=WeightSpec("FLUX2LAB_LPIPS_VGG_WEIGHTS", "--lpips-vgg-weights", _locate_lpips("vgg")),
)
register_metric(
    "fid", _fid_metric_fn, weights=WeightSpec("FLUX2LAB_FID_WEIGHTS", "--fid-weights", _locate_fid)
)
register_metric(
    "clip",
    _clip_metric,
    weights=WeightSpec("FLUX2LAB_CLIP_WEIGHTS", "--clip-weights", _locate_clip),
    needs_prompts=True,
)


# ------------------------------------------------- the mini world's yardstick (flux2lab.zoo, issue 10)
# Attribute accuracy against the prompts and domain FID, from the classifier that ships with `mini`.
from flux2lab.zoo.yardstick import register as _register_yardstick  # noqa: E402 (needs the registry above)

_register_yardstick()
