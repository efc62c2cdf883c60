"""flux2lab.metrics on CPU, offline, with random-weight backbones saved in the real checkpoint formats.

The real weights cannot be downloaded here, so each test checkpoint is a random model's state dict written
under the real file name and format, then loaded through the same path-based code real weights take.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import open_clip
import pytest
import safetensors.torch
import scipy.linalg
import torch
import torchvision
from huggingface_hub import constants as hf_constants
from PIL import Image
from torch import nn
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

from flux2lab import metrics
from flux2lab.common.errors import Flux2LabError
from flux2lab.metrics import clip, perceptual
from flux2lab.metrics.weights import OFFLINE_VARIABLES

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
CLIP_REPO_DIR = "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
ENV_VARS = (
    "FLUX2LAB_FID_WEIGHTS",
    "FLUX2LAB_LPIPS_WEIGHTS",
    "FLUX2LAB_LPIPS_VGG_WEIGHTS",
    "FLUX2LAB_CLIP_WEIGHTS",
)


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    """Offline, with empty torch hub / Hugging Face caches and no weight variables: "missing" is deterministic."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def inception_file(ckpt_dir):
    """A random InceptionV3-for-FID state dict, saved as torch-fidelity's weight file is (torch.save)."""
    with pytest.MonkeyPatch.context() as mp:  # build it without the download and load its constructor does
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():  # He init keeps activations from vanishing over 90 layers: FIDs well above 0
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = ckpt_dir / INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def alexnet_file(ckpt_dir):
    """A random torchvision AlexNet state dict under torchvision's checkpoint name."""
    torch.manual_seed(0)
    path = ckpt_dir / ALEXNET_FILE
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def clip_file(ckpt_dir):
    """A random open_clip ViT-B-32, saved as the Hugging Face checkpoint open_clip_model.safetensors."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    path = ckpt_dir / "open_clip_model.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    return path


def place_in_torch_hub(src, tmp_path):
    dest = tmp_path / "torch" / "hub" / "checkpoints" / src.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.symlink_to(src)
    return dest


def images(n, size=64, seed=0):
    return torch.randint(
        0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


# ---------------------------------------------------------------------------------- weight resolution


def test_missing_weights_error_names_file_folder_variable_and_flag(empty_caches):
    with pytest.raises(Flux2LabError) as err:
        metrics.check_weights(["psnr", "fid", "lpips", "clip"])
    msg = str(err.value)
    hub = empty_caches / "torch" / "hub" / "checkpoints"
    assert f"weight file {INCEPTION_FILE} not found. Put it in {hub}/" in msg
    assert f"weight file {ALEXNET_FILE} not found. Put it in {hub}/" in msg
    assert "open_clip_model.safetensors or open_clip_pytorch_model.bin" in msg
    assert str(empty_caches / "hf" / "hub" / CLIP_REPO_DIR / "snapshots") in msg
    for flag, var in [
        ("--fid-weights", "FLUX2LAB_FID_WEIGHTS"),
        ("--lpips-weights", "FLUX2LAB_LPIPS_WEIGHTS"),
        ("--clip-weights", "FLUX2LAB_CLIP_WEIGHTS"),
    ]:
        assert f"{flag} PATH or set {var}=PATH" in msg
    assert "--skip-missing" in msg
    assert "psnr" not in msg


def test_skip_missing_leaves_the_metric_out_with_the_same_message(caplog):
    with caplog.at_level(logging.WARNING, logger="flux2lab.metrics"):
        resolved = metrics.check_weights(["psnr", "fid", "ssim"], skip_missing=True)
    assert resolved == {"psnr": None, "ssim": None}
    assert "skipping fid" in caplog.text and INCEPTION_FILE in caplog.text and "--fid-weights" in caplog.text


def test_a_search_keeps_the_reason_of_every_metric_it_leaves_out(alexnet_file):
    from flux2lab.study.objective import trial_weights

    weights = trial_weights({}, device="cpu", skip_missing=True)
    assert set(weights) == {"psnr", "ssim"} and set(weights.skipped) == {"lpips", "clip"}
    assert "alexnet" in weights.skipped["lpips"] and "--clip-weights" in weights.skipped["clip"]
    weights = trial_weights({"lpips": alexnet_file}, device="cpu", skip_missing=False)
    assert weights["lpips"] == alexnet_file and set(weights.skipped) == {"clip"}


def test_weights_found_in_torch_hub_cache(inception_file, alexnet_file, empty_caches):
    fid_path = place_in_torch_hub(inception_file, empty_caches)
    lpips_path = place_in_torch_hub(alexnet_file, empty_caches)
    assert metrics.check_weights(["fid", "lpips"]) == {"fid": fid_path, "lpips": lpips_path}


def test_clip_weights_found_in_hugging_face_cache(empty_caches):
    repo = empty_caches / "hf" / "hub" / CLIP_REPO_DIR
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"x")
    assert metrics.check_weights(["clip"]) == {"clip": snapshot / "open_clip_pytorch_model.bin"}
    (snapshot / "open_clip_model.safetensors").write_bytes(b"x")  # preferred, as open_clip prefers it
    assert metrics.check_weights(["clip"]) == {"clip": snapshot / "open_clip_model.safetensors"}


def test_flag_beats_variable_beats_cache_and_folders_are_searched(inception_file, empty_caches, monkeypatch):
    cached = place_in_torch_hub(inception_file, empty_caches)
    env_dir = empty_caches / "env"
    env_dir.mkdir()
    (env_dir / INCEPTION_FILE).symlink_to(inception_file)
    flag_file = empty_caches / "mine.pth"
    flag_file.symlink_to(inception_file)
    assert metrics.check_weights(["fid"]) == {"fid": cached}
    monkeypatch.setenv("FLUX2LAB_FID_WEIGHTS", str(env_dir))
    assert metrics.check_weights(["fid"]) == {"fid": env_dir / INCEPTION_FILE}
    assert metrics.check_weights(["fid"], {"fid": flag_file}) == {"fid": flag_file}


def test_a_wrong_explicit_path_is_an_error_even_with_skip_missing(empty_caches, monkeypatch):
    with pytest.raises(Flux2LabError, match=r"fid: --fid-weights /nowhere/x.pth: no such file"):
        metrics.check_weights(["fid"], {"fid": "/nowhere/x.pth"}, skip_missing=True)
    monkeypatch.setenv("FLUX2LAB_LPIPS_WEIGHTS", str(empty_caches))
    with pytest.raises(
        Flux2LabError, match=rf"FLUX2LAB_LPIPS_WEIGHTS={empty_caches} is a folder without {ALEXNET_FILE}"
    ):
        metrics.check_weights(["lpips"], skip_missing=True)


def test_unknown_metric_and_clip_model_are_errors():
    with pytest.raises(Flux2LabError, match="unknown metric"):
        metrics.check_weights(["fdi"])
    with pytest.raises(Flux2LabError, match="unknown CLIP pretrained tag"):
        metrics.check_weights(["clip"], options=metrics.MetricOptions(clip_pretrained="nope"))


def test_command_line_flags_come_from_the_registry():
    parser = argparse.ArgumentParser()
    metrics.add_weight_arguments(parser)
    args = parser.parse_args(["--fid-weights", "a.pth", "--clip-weights", "c", "--skip-missing"])
    assert metrics.weight_paths(args) == {"fid": "a.pth", "clip": "c"}
    assert args.skip_missing


# --------------------------------------------------------------------- online: the libraries fetch their own


@pytest.fixture
def online(monkeypatch):
    for var in OFFLINE_VARIABLES:
        monkeypatch.delenv(var, raising=False)


def fake_torch_hub_downloads(monkeypatch, files):
    """torch.hub's downloader (under torchvision's and torch-fidelity's loaders), replaced: it records each call and
    copies the local checkpoint named like the URL's file to where torch.hub asked."""
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((os.path.basename(url), progress))
        shutil.copy(files[os.path.basename(url)], dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    return calls


def test_online_torchmetrics_loaders_fill_the_torch_hub_cache(inception_file, alexnet_file, empty_caches, online,
                                                             monkeypatch):
    calls = fake_torch_hub_downloads(monkeypatch, {INCEPTION_FILE: inception_file, ALEXNET_FILE: alexnet_file})
    hub = empty_caches / "torch" / "hub" / "checkpoints"
    assert metrics.check_weights(["fid", "lpips"]) == {"fid": hub / INCEPTION_FILE, "lpips": hub / ALEXNET_FILE}
    assert calls == [(INCEPTION_FILE, True), (ALEXNET_FILE, True)]  # each library's own download, with progress
    metrics.check_weights(["fid", "lpips"])
    assert len(calls) == 2, "cached now: nothing is fetched twice"


def test_online_open_clip_fills_the_hugging_face_cache(clip_file, empty_caches, online, monkeypatch):
    import open_clip.pretrained

    calls = []

    def hf_hub_download(repo_id, filename, revision=None, cache_dir=None, **kwargs):
        calls.append((repo_id, filename))
        repo = Path(hf_constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text("abc123")
        dest = repo / "snapshots" / "abc123" / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(clip_file, dest)
        return str(dest)

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", hf_hub_download)
    snapshot = empty_caches / "hf" / "hub" / CLIP_REPO_DIR / "snapshots" / "abc123"
    assert metrics.check_weights(["clip"]) == {"clip": snapshot / "open_clip_model.safetensors"}
    assert calls == [("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_model.safetensors")]


def test_offline_nothing_is_fetched_and_the_message_says_why(empty_caches, monkeypatch, no_network):
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("fetched while offline"))
    with pytest.raises(Flux2LabError, match=rf"{INCEPTION_FILE} not found.*HF_HUB_OFFLINE=1 is set, so nothing is "
                                            "downloaded"):
        metrics.check_weights(["fid"])
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("FLUX2LAB_OFFLINE", "yes")
    with pytest.raises(Flux2LabError, match=rf"{ALEXNET_FILE} not found.*FLUX2LAB_OFFLINE=yes is set"):
        metrics.check_weights(["lpips"])


def test_a_failed_fetch_stops_or_is_skipped_with_its_reason(empty_caches, online, monkeypatch, caplog):
    def unreachable(url, *args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(Flux2LabError, match=rf"{ALEXNET_FILE} not found.*Fetching it with .* failed: URLError"):
        metrics.check_weights(["lpips"])
    with caplog.at_level(logging.WARNING, logger="flux2lab.metrics"):
        resolved = metrics.check_weights(["psnr", "lpips"], skip_missing=True)
    assert resolved == {"psnr": None} and "no route to host" in resolved.skipped["lpips"]
    assert "skipping lpips" in caplog.text


# ----------------------------------------------------------------------------------- paired metrics


def test_identical_sets_give_psnr_inf_ssim_1_lpips_0(alexnet_file):
    a = images(3, size=32)  # under LPIPS_MIN_SIZE: upsampled
    assert np.all(np.isposinf(metrics.psnr(a, a.clone())))
    np.testing.assert_allclose(metrics.ssim(a, a.clone()), 1.0, atol=1e-5)
    np.testing.assert_allclose(metrics.lpips(a, a.clone(), alexnet_file), 0.0, atol=1e-6)


def test_paired_metrics_on_different_images(alexnet_file):
    a, b = images(3, seed=0), images(3, seed=1)
    mse = ((a.double() - b.double()) / 255).pow(2).mean(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(metrics.psnr(a, b, batch_size=2), 10 * np.log10(1 / mse), rtol=1e-5)
    assert np.all(metrics.ssim(a, b) < 0.5)
    assert np.all(metrics.lpips(a, b, alexnet_file) > 0)
    # PIL images and float tensors give the same numbers as uint8 tensors
    pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in b]
    np.testing.assert_allclose(metrics.psnr(a.float() / 255, pil), metrics.psnr(a, b), rtol=1e-5)


def test_lpips_uses_the_backbone_from_the_file(alexnet_file, tmp_path):
    saved = torch.load(alexnet_file)
    net = perceptual._lpips_net(alexnet_file, "alex", "cpu")
    torch.testing.assert_close(net.net.slice1[0].weight, saved["features.0.weight"])
    torch.testing.assert_close(getattr(net.net.slice5, "10").bias, saved["features.10.bias"])
    bad = tmp_path / ALEXNET_FILE
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(Flux2LabError, match="not a torchvision alexnet state dict"):
        perceptual._lpips_net(bad, "alex", "cpu")


def test_bad_inputs_are_user_errors():
    with pytest.raises(Flux2LabError, match=r"in \[0, 1\]"):
        metrics.psnr(torch.full((2, 3, 8, 8), 2.0), torch.zeros(2, 3, 8, 8))
    with pytest.raises(Flux2LabError, match="as many images"):
        metrics.ssim(images(2), images(3))
    with pytest.raises(Flux2LabError, match="sizes differ"):
        metrics.psnr(images(2, size=32), images(2, size=16))


# ------------------------------------------------------------------------------------------------ FID


def scipy_frechet(fa, fb):
    mu1, mu2 = fa.mean(0), fb.mean(0)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_from_features_matches_scipy():
    rng = np.random.default_rng(0)
    fa = rng.normal(size=(50, 8))
    fb = rng.normal(loc=0.3, scale=1.5, size=(40, 8)) @ rng.normal(size=(8, 8))
    assert metrics.fid_from_features(fa, fb) == pytest.approx(scipy_frechet(fa, fb), rel=1e-6)
    assert metrics.fid_from_features(fa, fa) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(Flux2LabError, match="at least 2"):
        metrics.fid_from_features(fa[:1], fb)


def test_fid_with_inception_from_file(inception_file):
    # Layer 64, not the default 2048: FID's 2048x2048 eigendecomposition takes minutes on a busy 2-core CPU.
    a, b = images(4, seed=0), images(4, seed=1) // 2
    same = metrics.fid(a, a.clone(), inception_file, feature=64, batch_size=3)
    different = metrics.fid(a, b, inception_file, feature=64)
    assert abs(same) < 1e-3
    assert different > 1.0


def test_fid_with_a_custom_extractor_equals_fid_of_its_features():
    class MeanColour(nn.Module):  # stands in for a domain classifier's feature layer
        def forward(self, x):
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

    a, b = images(6, size=16, seed=0), images(5, size=16, seed=1)
    extractor = MeanColour()
    fa, fb = (extractor(x.double() / 255) for x in (a, b))
    value = metrics.fid(a, b, extractor=extractor)
    assert value == pytest.approx(metrics.fid_from_features(fa, fb), rel=1e-4)


# ------------------------------------------------------------------------------------------ CLIP score


def test_clip_scores_load_the_checkpoint_file(clip_file):
    a = images(3)
    prompts = ["a red cat", "a blue dog", "a tree"]
    scores = metrics.clip_scores(a, prompts, clip_file, batch_size=2)
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 100))
    model, tokenizer, prep = clip._clip(clip_file, "ViT-B-32", "laion2b_s34b_b79k", "cpu")
    saved = safetensors.torch.load_file(str(clip_file))
    torch.testing.assert_close(model.visual.conv1.weight, saved["visual.conv1.weight"])
    with torch.no_grad():
        img = nn.functional.normalize(model.encode_image(clip._clip_pixels(a[:1] / 255, prep)), dim=-1)
        txt = nn.functional.normalize(model.encode_text(tokenizer(prompts[:1])), dim=-1)
    assert scores[0] == pytest.approx(max(100 * float((img * txt).sum()), 0.0), abs=1e-3)
    with pytest.raises(Flux2LabError, match="one prompt per image"):
        metrics.clip_scores(a, prompts[:2], clip_file)


# --------------------------------------------------------------------------------------- aggregation


def test_bootstrap_ci():
    values = np.random.default_rng(0).normal(5, 1, size=200)
    s = metrics.bootstrap_ci(values, seed=1)
    assert s.mean == pytest.approx(values.mean())
    assert s.low < s.mean < s.high and s.high - s.low == pytest.approx(2 * 1.96 / np.sqrt(200), rel=0.2)
    assert s == metrics.bootstrap_ci(values, seed=1)
    with_inf = metrics.bootstrap_ci([np.inf, 1.0, 2.0, 3.0])
    assert (with_inf.mean, with_inf.n, with_inf.n_inf) == (2.0, 4, 1)
    all_inf = metrics.bootstrap_ci([np.inf, np.inf])
    assert (all_inf.mean, all_inf.low, all_inf.high, all_inf.n_inf) == (np.inf, np.inf, np.inf, 2)


def test_evaluate_end_to_end(inception_file, alexnet_file, clip_file, empty_caches):
    place_in_torch_hub(inception_file, empty_caches)
    place_in_torch_hub(alexnet_file, empty_caches)
    weights = metrics.check_weights(["psnr", "ssim", "lpips", "fid", "clip"], {"clip": clip_file})
    ref = images(4)
    prompts = ["a", "b", "c", "d"]
    options = metrics.MetricOptions(fid_feature=64)  # a 64x64 covariance: fast on CPU
    results = metrics.evaluate(ref, ref.clone(), weights, prompts=prompts, options=options, n_boot=200)
    assert set(results) == {"psnr", "ssim", "lpips", "fid", "clip_reference", "clip_candidate", "clip_delta"}
    assert results["psnr"].value == np.inf and results["psnr"].summary.n_inf == 4
    assert results["lpips"].value == pytest.approx(0.0, abs=1e-6)
    assert results["clip_delta"].value == pytest.approx(0.0, abs=1e-6)
    assert results["fid"].value == pytest.approx(0.0, abs=1e-3) and results["fid"].summary is None
    report = json.loads(json.dumps({k: r.to_dict() for k, r in results.items()}, allow_nan=False))
    assert report["psnr"]["value"] == "inf" and report["psnr"]["per_image"] == ["inf"] * 4
    assert report["psnr"]["summary"]["n_inf"] == 4
    with pytest.raises(Flux2LabError, match="clip needs the prompts"):
        metrics.evaluate(ref, ref, {"clip": clip_file})


# --------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_gives_the_cpu_numbers(inception_file, alexnet_file, clip_file):
    a, b = images(6, seed=0), images(6, seed=1)
    prompts = [f"prompt {i}" for i in range(6)]
    np.testing.assert_allclose(metrics.psnr(a, b, device="cuda"), metrics.psnr(a, b, device="cpu"), rtol=1e-4)
    # SSIM of unrelated random images is near 0, where a relative bound means nothing: the H200 run gave
    # differences of up to 5e-7 (GPU vs CPU convolution order), so the bound is absolute.
    np.testing.assert_allclose(metrics.ssim(a, b, device="cuda"), metrics.ssim(a, b, device="cpu"), atol=1e-5)
    np.testing.assert_allclose(
        metrics.lpips(a, b, alexnet_file, device="cuda"),
        metrics.lpips(a, b, alexnet_file, device="cpu"),
        rtol=1e-3,
    )
    np.testing.assert_allclose(
        metrics.clip_scores(a, prompts, clip_file, device="cuda"),
        metrics.clip_scores(a, prompts, clip_file, device="cpu"),
        atol=0.05,
    )
    cpu = metrics.fid(a, b, inception_file, feature=64, device="cpu")
    assert metrics.fid(a, b, inception_file, feature=64, device="cuda") == pytest.approx(cpu, rel=1e-3)
    assert abs(metrics.fid(a, a.clone(), inception_file, device="cuda")) < 1e-3  # the default 2048 layer
