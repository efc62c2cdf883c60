"""compare: paired images for two recipes, metrics, cache reuse, presets and errors before generation."""

from __future__ import annotations

import csv
import json
import math

import pytest

from flux2lab.common.errors import Flux2LabError
from flux2lab.compare import main
from flux2lab.pipeline.presets import resolve_recipe
from flux2lab.pipeline.recipe import FLUX2_DEV_COEFFICIENTS, Recipe


def run(argv):
    return main(argv)


def test_bf16_vs_nvfp4_on_tiny(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--model", "tiny", "--b", "nvfp4", "--limit", "2", "--steps", "3", "--metrics", "psnr,ssim",
            "--cache", str(cache), "--out", str(out)]
    assert run(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    psnr = float(metrics["metrics"]["psnr"]["value"])
    assert math.isfinite(psnr) and psnr > 20, "NVFP4 should change the image, but not destroy it"
    assert metrics["b"]["recipe"]["transformer_precision"] == "nvfp4"
    assert metrics["generated"] == {"a": 2, "b": 2}
    assert metrics["computed_fraction"] == {"a": 1.0, "b": 1.0}  # no step cache: the whole block stack ran
    rows = list(csv.DictReader(open(out / "per_prompt.csv")))
    assert [r["id"] for r in rows] == ["nvidia-cat-moon", "nvidia-couple-rain"] and "psnr" in rows[0]
    assert (out / "grid.png").stat().st_size > 0 and len(list((out / "b").glob("*.png"))) == 2

    # The reference (A) comes from the cache the second time; B = A gives identical images: PSNR inf.
    assert run(["--model", "tiny", "--b", "bf16", "--limit", "2", "--steps", "3", "--metrics", "psnr,ssim",
                "--cache", str(cache), "--out", str(tmp_path / "same")]) == 0
    same = json.loads((tmp_path / "same" / "metrics.json").read_text())
    assert same["generated"] == {"a": 0, "b": 0}
    assert same["metrics"]["psnr"]["value"] == "inf"
    assert same["metrics"]["psnr"]["summary"]["n_inf"] == 2
    assert "identical images" in capsys.readouterr().out

    # The same model in another dtype makes other pixels: its reference is not taken from the cache.
    assert run(["--model", "tiny", "--dtype", "bf16", "--b", "bf16", "--limit", "2", "--steps", "3",
                "--metrics", "psnr", "--cache", str(cache), "--out", str(tmp_path / "bf16")]) == 0
    assert json.loads((tmp_path / "bf16" / "metrics.json").read_text())["generated"] == {"a": 2, "b": 0}


def test_missing_weights_stop_before_generating(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("FLUX2LAB_LPIPS_WEIGHTS", raising=False)
    cache = tmp_path / "cache"
    with pytest.raises(Flux2LabError, match=r"alexnet-owt-7be5be79.pth not found.*--lpips-weights"):
        run(["--model", "tiny", "--b", "nvfp4", "--metrics", "lpips,psnr", "--cache", str(cache),
             "--out", str(tmp_path / "o")])
    assert not cache.exists() or not any(cache.iterdir()), "images were generated before the weight check"


def test_skipped_metrics_are_written_and_printed_with_their_reason(tmp_path, capsys, monkeypatch):
    from flux2lab.pipeline.prompt_sets import DATA

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("FLUX2LAB_LPIPS_WEIGHTS", raising=False)
    out = tmp_path / "out"
    assert run(["--model", "tiny", "--b", "bf16", "--limit", "1", "--steps", "2", "--metrics", "psnr,lpips",
                "--skip-missing", "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    written = json.loads((out / "metrics.json").read_text())
    assert set(written["metrics"]) == {"psnr"} and set(written["skipped_metrics"]) == {"lpips"}
    why = written["skipped_metrics"]["lpips"]
    assert "alexnet-owt-7be5be79.pth not found" in why and "HF_HUB_OFFLINE=1 is set" in why
    printed = capsys.readouterr().out
    assert f"lpips: skipped: {why}" in printed
    assert f"prompts: {DATA / 'quality_prompts.jsonl'}" in printed  # the model's own set, named


def test_on_mini_the_defaults_are_its_own_captions_and_its_yardstick(tmp_path, capsys, monkeypatch):
    from flux2lab.quality import comparison
    from flux2lab.zoo.world import parse_caption

    class Generating(Exception):
        pass

    seen = {}

    def stop_before_generating(model, a, b, entries, seeds, weights, cache_dir, **kwargs):
        seen.update(entries=entries, weights=weights, skipped=kwargs["skipped_metrics"])
        raise Generating

    monkeypatch.setattr(comparison, "compare", stop_before_generating)
    with pytest.raises(Generating):
        run(["--model", "mini", "--b", "nvfp4", "--limit", "3", "--skip-missing", "--cache", str(tmp_path / "c"),
             "--out", str(tmp_path / "o")])
    assert comparison.default_metrics("mini") == (*comparison.DEFAULT_METRICS, "yardstick")
    assert comparison.default_metrics("tiny") == comparison.DEFAULT_METRICS
    assert {*seen["weights"], *seen["skipped"]} == set(comparison.default_metrics("mini"))
    assert "yardstick" in seen["weights"]  # its weights ship with flux2lab
    assert len(seen["entries"]) == 3
    for entry in seen["entries"]:
        parse_caption(entry.prompt.text)  # a held-out caption of mini's world
    printed = capsys.readouterr().out
    assert "prompts: mini's own: 3 held-out world captions" in printed and "warning" not in printed


def test_presets():
    assert resolve_recipe("bf16") == Recipe()
    r = resolve_recipe("nvfp4+te-fp8+teacache+thresh=0.3+ret=4+cutoff=40")
    assert (r.transformer_precision, r.text_encoder_precision) == ("nvfp4", "fp8")
    assert r.cache.method == "teacache" and r.cache.threshold == 0.3 and r.cache.ret_steps == 4
    assert r.cache.cutoff_steps == 40 and r.cache.coefficients == FLUX2_DEV_COEFFICIENTS


def test_preset_with_fit_and_errors(tmp_path):
    fit = tmp_path / "fit.json"
    fit.write_text(json.dumps({"coefficients": [1.0, 2.0, 3.0, 4.0]}))
    assert resolve_recipe(f"teacache@{fit}").cache.coefficients == (1.0, 2.0, 3.0, 4.0)
    with pytest.raises(Flux2LabError, match="unknown preset 'int4'"):
        resolve_recipe("int4")
    with pytest.raises(Flux2LabError, match="'thresh=high'"):
        resolve_recipe("teacache+thresh=high")
    with pytest.raises(Flux2LabError, match="does not exist"):
        resolve_recipe(f"teacache@{tmp_path / 'nope.json'}")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(Flux2LabError, match="no 'coefficients'"):
        resolve_recipe(f"teacache@{tmp_path / 'bad.json'}")


def test_presets_choose_every_cache_method(tmp_path):
    assert resolve_recipe("taylorseer=3").cache.to_dict() == {"method": "taylorseer", "cache_interval": 3}
    assert resolve_recipe("fbc=0.1").cache.to_dict() == {"method": "first_block", "threshold": 0.1}
    assert resolve_recipe("seacache=0.5").cache.threshold == 0.5
    assert resolve_recipe("teacache+order=1+slope=0.75").cache.residual_slope == 0.75
    assert resolve_recipe("thresh=0.2").cache.method == "teacache"  # settings without a method: TeaCache's
    assert resolve_recipe("fbc+thresh=0.2").cache.to_dict() == {"method": "first_block", "threshold": 0.2}
    with pytest.raises(Flux2LabError, match="magcache@FIT.json"):
        resolve_recipe("magcache")
    with pytest.raises(Flux2LabError, match="cache_interval"):
        resolve_recipe("taylorseer+ret=3")  # ret_steps is not a TaylorSeer setting
