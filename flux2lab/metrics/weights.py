"""Where each metric's weight file is: a path the user gives, or the standard cache its library looks in, filled
by that library's own loader when the machine is online.

A file missing from the cache is fetched the way the ecosystem fetches it (`find_or_fetch`): torchmetrics' LPIPS
(torchvision's downloader) and FID (torch-fidelity's) into the torch hub cache, open_clip's `download_pretrained`
into the Hugging Face cache, each with its library's progress bar. Offline (HF_HUB_OFFLINE or FLUX2LAB_OFFLINE
set), or when the fetch fails, the message names the file, the folder it belongs in, the environment variable and
the flag (`missing_message`), and why nothing was fetched. `check_weights` in `registry` applies this to every
requested metric before anything is generated.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flux2lab.common.errors import Flux2LabError
from flux2lab.common.files import check_weight_file
from flux2lab.metrics.perceptual import LPIPS_BACKBONES

if TYPE_CHECKING:
    from flux2lab.metrics.registry import MetricOptions

log = logging.getLogger(__name__)
# Set to 1 (or on/yes/true), either keeps every metric library from downloading.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "FLUX2LAB_OFFLINE")

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
    fetch: Callable[[MetricOptions], object] | None = None  # the library's own loader, filling the cache `locate` reads
    fetcher: str = ""  # the library that fetches, for messages ("torchvision")


def _torch_hub_file(url: str) -> WeightFile:
    """A checkpoint that torch.hub.load_state_dict_from_url would cache under $TORCH_HOME/hub/checkpoints."""
    name = os.path.basename(url)
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    path = cache_dir / name
    return WeightFile((name,), str(cache_dir), path if path.is_file() else None, f"download {url}")


def locate_fid(options: MetricOptions) -> WeightFile:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return _torch_hub_file(URL_INCEPTION_V3)  # what torchmetrics' default FID (via torch-fidelity) loads


def locate_lpips(net: str) -> Callable[[MetricOptions], WeightFile]:
    """The locator of LPIPS' `net` backbone ("alex" or "vgg")."""

    def locate(options: MetricOptions) -> WeightFile:
        import torchvision

        # torchmetrics ships LPIPS' linear layers; only the torchvision backbone comes from the torch hub cache.
        weights_enum = torchvision.models.get_model_weights(LPIPS_BACKBONES[net]).DEFAULT
        return _torch_hub_file(weights_enum.url)

    return locate


def locate_clip(options: MetricOptions) -> WeightFile:
    import open_clip
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

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


def fetch_fid(options: MetricOptions) -> None:
    """torchmetrics' FID builds torch-fidelity's InceptionV3, which downloads its weights into the torch hub cache."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    FrechetInceptionDistance(feature=options.fid_feature)


def fetch_lpips(net: str) -> Callable[[MetricOptions], None]:
    """The loader of LPIPS' `net` backbone: torchmetrics' LPIPS, whose torchvision backbone downloads its weights
    into the torch hub cache (the linear layers ship with torchmetrics)."""

    def fetch(options: MetricOptions) -> None:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        LearnedPerceptualImagePatchSimilarity(net_type=net)

    return fetch


def fetch_clip(options: MetricOptions) -> None:
    """open_clip's own download of the pretrained tag's checkpoint (the Hugging Face cache when the tag has a hub
    repository, as `create_model_and_transforms(arch, pretrained=tag)` does), without building the model."""
    import open_clip

    open_clip.download_pretrained(open_clip.get_pretrained_cfg(options.clip_model, options.clip_pretrained))


def offline_setting() -> str | None:
    """The variable that keeps this process offline ("HF_HUB_OFFLINE=1"), or None when libraries may download."""
    for var in OFFLINE_VARIABLES:
        value = os.environ.get(var, "")
        if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var}={value}"
    return None


def find_or_fetch(name: str, spec: WeightSpec, options: MetricOptions) -> tuple[Path | None, str | None]:
    """The cached weight file of metric `name`, fetched first by its library's loader when it is not cached and the
    machine is online; or (None, the message saying which file is missing, where it belongs and why it was not
    fetched)."""
    wf = spec.locate(options)
    if wf.found is not None:
        return wf.found, None
    if spec.fetch is None:
        return None, missing_message(name, spec, wf)
    offline = offline_setting()
    if offline is not None:
        return None, missing_message(name, spec, wf) + (
            f" ({offline} is set, so nothing is downloaded; without it, {spec.fetcher} fetches the file into "
            "that cache itself.)")
    log.warning("%s: %s is not in %s; fetching it with %s", name, wf.filenames[0], wf.cache_dir, spec.fetcher)
    try:
        spec.fetch(options)
    except Exception as e:  # a download fails in each library's own way; each is the reason given
        return None, missing_message(name, spec, wf) + f" Fetching it with {spec.fetcher} failed: {type(e).__name__}: {e}"
    wf = spec.locate(options)
    if wf.found is None:
        return None, missing_message(name, spec, wf) + f" ({spec.fetcher} ran, but the file is still not there.)"
    return wf.found, None


def given_path(
    name: str, given: str | os.PathLike, how: str, spec: WeightSpec, options: MetricOptions
) -> Path:
    """The file behind a path the user gave (`how`: "--flag " or "VAR="); a folder is searched for the file."""
    path = Path(given).expanduser()
    what = f"{name} weights ({how.rstrip('= ')})"
    if path.is_file():
        return check_weight_file(path, what)
    if path.is_dir():
        names = spec.locate(options).filenames
        for filename in names:
            if (path / filename).is_file():
                return check_weight_file(path / filename, what)
        raise Flux2LabError(f"{name}: {how}{given} is a folder without {' or '.join(names)}")
    # A wrong explicit path is an error even with --skip-missing: skipping would hide a typo.
    raise Flux2LabError(f"{name}: {how}{given}: no such file or folder")


def missing_message(name: str, spec: WeightSpec, wf: WeightFile) -> str:
    return (
        f"{name}: weight file {' or '.join(wf.filenames)} not found. Put it in {wf.cache_dir}/ (the standard "
        f"cache), or anywhere and pass {spec.flag} PATH or set {spec.env_var}=PATH. "
        f"To get it on a machine with internet: {wf.source}."
    )
