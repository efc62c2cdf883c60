"""Image-quality metrics: FID, LPIPS, CLIP score, PSNR, SSIM, per image and aggregated with bootstrap CIs.

Compare and search compute the same numbers the same way on machines without internet: every metric with
learned weights is resolved before anything is generated (`check_weights`), from a path the user gives or
the standard cache of its library, which that library's own loader fills when the machine is online (offline,
with HF_HUB_OFFLINE or FLUX2LAB_OFFLINE set, nothing is downloaded). The numbers come from torchmetrics and
open_clip, imported only when a metric runs, so importing this package is cheap.

- `registry`: METRICS, `register_metric`, `check_weights`, `evaluate` (and the built-in metrics);
- `weights`: where each weight file is; `flags`: the --<metric>-weights command-line flags;
- `paired` (PSNR, SSIM), `perceptual` (LPIPS), `frechet` (FID), `clip` (CLIP score): the computations;
- `images`: the accepted image forms and their batching; `bootstrap`: mean and bootstrap CI.
"""

from flux2lab.metrics.bootstrap import Summary, bootstrap_ci
from flux2lab.metrics.clip import clip_scores
from flux2lab.metrics.flags import add_weight_arguments, weight_paths
from flux2lab.metrics.frechet import fid, fid_from_features
from flux2lab.metrics.images import Images
from flux2lab.metrics.paired import psnr, ssim
from flux2lab.metrics.perceptual import LPIPS_MIN_SIZE, lpips
from flux2lab.metrics.registry import (
    METRICS,
    Metric,
    MetricInputs,
    MetricOptions,
    MetricResult,
    ResolvedWeights,
    check_weights,
    evaluate,
    register_metric,
)
from flux2lab.metrics.weights import WeightFile, WeightSpec

__all__ = [
    "LPIPS_MIN_SIZE", "METRICS", "Images", "Metric", "MetricInputs", "MetricOptions", "MetricResult", "ResolvedWeights",
    "Summary", "WeightFile", "WeightSpec", "add_weight_arguments", "bootstrap_ci", "check_weights", "clip_scores",
    "evaluate", "fid", "fid_from_features", "lpips", "psnr", "register_metric", "ssim", "weight_paths",
]
