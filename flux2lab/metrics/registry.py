"""The metric registry: every metric by name, its weights resolved before generation, run on paired image sets.

A metric is a function plus one `register_metric` call; it then gets its weight flag, its environment
variable, the missing-weights check (`check_weights`) and bootstrap CIs (`evaluate`) for free. The built-in
metrics (PSNR, SSIM, LPIPS, FID, CLIP score) are registered at the bottom of this module; others register
themselves where they live (the mini world's "yardstick" in `flux2lab.zoo.yardstick`, on importing
`flux2lab.zoo`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flux2lab.common.errors import Flux2LabError
from flux2lab.metrics.bootstrap import Summary, bootstrap_ci
from flux2lab.metrics.clip import clip_scores
from flux2lab.metrics.frechet import fid
from flux2lab.metrics.images import Images, count, resolve_device
from flux2lab.metrics.paired import psnr, ssim
from flux2lab.metrics.perceptual import lpips
from flux2lab.metrics.weights import (
    WeightSpec,
    fetch_clip,
    fetch_fid,
    fetch_lpips,
    find_or_fetch,
    given_path,
    locate_clip,
    locate_fid,
    locate_lpips,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricOptions:
    """Choices shared by weight resolution and computation."""

    device: str | None = None  # None: "cuda" when available, else "cpu"
    batch_size: int = 32
    clip_model: str = "ViT-B-32"  # open_clip architecture
    clip_pretrained: str = "laion2b_s34b_b79k"  # open_clip pretrained tag (decides the cached file)
    fid_feature: int = 2048  # InceptionV3 layer for FID: 64, 192, 768 or 2048

    def resolved_device(self) -> str:
        return resolve_device(self.device)


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


class ResolvedWeights(dict):
    """What `check_weights` returns: {metric: weight file, or None for metrics without weights} for the metrics that
    will run, and `skipped`: {metric: why it will not run} for those `skip_missing` left out."""

    def __init__(self, resolved: Mapping[str, Path | None] = (), skipped: Mapping[str, str] | None = None):
        super().__init__(resolved)
        self.skipped: dict[str, str] = dict(skipped or {})


def check_weights(
    metric_names: Sequence[str],
    paths: Mapping[str, str | os.PathLike | None] | None = None,
    *,
    skip_missing: bool = False,
    options: MetricOptions | None = None,
) -> ResolvedWeights:
    """Resolve every requested metric's weights; call it before generating anything.

    Order: `paths[name]` (the command-line flag), then the metric's environment variable, then the standard
    cache, which the metric's library fills itself when the machine is online (`weights.find_or_fetch`).
    Returns {name: weight file, or None for metrics without weights} for the metrics that will run.
    Missing weights raise one `Flux2LabError` listing every missing file; with `skip_missing` those metrics
    are left out of the result (their reasons in its `skipped`) and each is logged as a warning instead.
    """
    options = options or MetricOptions()
    paths = {k: v for k, v in (paths or {}).items() if v is not None}
    unknown = [n for n in [*metric_names, *paths] if n not in METRICS]
    if unknown:
        raise Flux2LabError(f"unknown metric(s) {unknown}; available: {sorted(METRICS)}")
    resolved: dict[str, Path | None] = {}
    missing: dict[str, str] = {}
    for name in dict.fromkeys(metric_names):
        spec = METRICS[name].weights
        if spec is None:
            resolved[name] = None
        elif name in paths:
            resolved[name] = given_path(name, paths[name], f"{spec.flag} ", spec, options)
        elif os.environ.get(spec.env_var):
            resolved[name] = given_path(name, os.environ[spec.env_var], f"{spec.env_var}=", spec, options)
        else:
            found, why = find_or_fetch(name, spec, options)
            if found is not None:
                resolved[name] = found
            else:
                missing[name] = why
    if missing and not skip_missing:
        raise Flux2LabError("\n".join(missing.values()) + "\n(or pass --skip-missing to run without these metrics)")
    for message in missing.values():
        log.warning("skipping %s", message)
    return ResolvedWeights(resolved, missing)


# ------------------------------------------------------------------------------------------- evaluation


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
    if count(reference) != count(candidate):
        raise Flux2LabError(
            f"reference has {count(reference)} images, candidate {count(candidate)}; they must pair up"
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


# ------------------------------------------------------------------------------------------- built-ins


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


def _fid_metric(inputs: MetricInputs, path: Path | None, options: MetricOptions) -> dict:
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
    weights=WeightSpec("FLUX2LAB_LPIPS_WEIGHTS", "--lpips-weights", locate_lpips("alex"), fetch_lpips("alex"),
                       "torchmetrics (torchvision's AlexNet)"),
)
register_metric(
    "lpips_vgg",
    _lpips_metric("vgg", "lpips_vgg"),
    weights=WeightSpec("FLUX2LAB_LPIPS_VGG_WEIGHTS", "--lpips-vgg-weights", locate_lpips("vgg"), fetch_lpips("vgg"),
                       "torchmetrics (torchvision's VGG16)"),
)
register_metric(
    "fid",
    _fid_metric,
    weights=WeightSpec("FLUX2LAB_FID_WEIGHTS", "--fid-weights", locate_fid, fetch_fid,
                       "torchmetrics (torch-fidelity's InceptionV3)"),
)
register_metric(
    "clip",
    _clip_metric,
    weights=WeightSpec("FLUX2LAB_CLIP_WEIGHTS", "--clip-weights", locate_clip, fetch_clip, "open_clip"),
    needs_prompts=True,
)
