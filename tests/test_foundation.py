"""The foundation: loader, recipe, apply/generate and the generate command."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from flux2lab.common.errors import Flux2LabError
from flux2lab.pipeline.core import Prompt, apply, generate
from flux2lab.pipeline.models import build_transformer_on_meta, load_pipeline
from flux2lab.pipeline.recipe import Recipe, RecipeError

FAST = Recipe(steps=3)


def as_array(img):
    return np.asarray(img, dtype=np.float32)


def test_tiny_builds_and_generates_offline(no_network):
    pipe = load_pipeline("tiny", device="cpu")
    out = generate(pipe, ["a red circle"], 0, FAST)
    assert out.images[0].size == (64, 64)
    assert out.records[0].wall_s > 0


def test_prompts_change_images_and_seeds_repeat(tiny_pipe):
    out = generate(tiny_pipe, ["a red circle", "a cat sleeping on a sofa", "a red circle"], [0, 0, 0], FAST)
    a, b, c = (as_array(i) for i in out.images)
    assert np.abs(a - b).max() > 0, "different prompts gave the same image"
    assert np.array_equal(a, c), "the same prompt and seed gave different images"
    d = as_array(generate(tiny_pipe, ["a red circle"], 1, FAST).images[0])
    assert np.abs(a - d).max() > 0, "different seeds gave the same image"


def test_step_times_recorded(tiny_pipe):
    rec = generate(tiny_pipe, ["x"], 0, FAST, time_steps=True).records[0]
    assert len(rec.step_s) == 3 and all(t > 0 for t in rec.step_s)


def test_multi_reference_prompt_runs(tiny_pipe, tmp_path):
    from PIL import Image

    ref = tmp_path / "ref.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(ref)
    out = generate(tiny_pipe, [Prompt("make it blue", (str(ref),))], 0, FAST)
    assert out.images[0].size == (64, 64)


def test_full_size_config_on_meta():
    m = build_transformer_on_meta()
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - 32.2e9) < 0.1e9
    assert len(m.transformer_blocks) == 8 and len(m.single_transformer_blocks) == 48
    assert m.config.num_attention_heads == 48 and m.config.attention_head_dim == 128
    assert m.config.joint_attention_dim == 15360 and m.config.in_channels == 128


def test_full_random_needs_a_gpu():
    with pytest.raises(Flux2LabError, match="needs a CUDA GPU"):
        load_pipeline("full-random", device="cpu")


def test_missing_pretrained_weights_name_the_model(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(Flux2LabError, match="black-forest-labs/FLUX.2-dev.*not in the Hugging Face cache"):
        load_pipeline("black-forest-labs/FLUX.2-dev", device="cpu")
    (tmp_path / "folder").mkdir()
    with pytest.raises(Flux2LabError, match="no model_index.json"):
        load_pipeline(str(tmp_path / "folder"), device="cpu")


def test_recipe_json_round_trip(tmp_path):
    r = Recipe(transformer_precision="nvfp4", compile=True, height=512, width=768, steps=28, guidance=3.5)
    r = r.replace(cache={"method": "teacache", "threshold": 0.3, "ret_steps": 4, "cutoff_steps": 26})
    assert Recipe.from_json(r.to_json()) == r
    assert Recipe.load(r.save(tmp_path / "r.json")) == r


@pytest.mark.parametrize("field,value,fragment", [
    ("transformer_precision", "int4", "bf16 | fp8 | nvfp4"),
    ("text_encoder_precision", "fp4", "bf16 | fp8 | nvfp4"),
    ("quant_backend", "fast", "auto | native | emulated"),
    ("compile", "yes", "true | false"),
    ("cuda_graphs", 1, "true | false"),
    ("ulysses_degree", 0, "integer >= 1"),
    ("height", 1000, "multiple of 16"),
    ("width", -16, "multiple of 16"),
    ("steps", 0, "integer >= 1"),
    ("guidance", float("nan"), "finite number"),
])
def test_invalid_fields_are_named(field, value, fragment):
    with pytest.raises(RecipeError, match=rf"'{field}' = .*{fragment}"):
        Recipe(**{field: value})


@pytest.mark.parametrize("tc,field", [
    ({"method": "teacache", "threshold": -0.1}, "cache.threshold"),
    ({"method": "teacache", "ret_steps": -1}, "cache.ret_steps"),
    ({"method": "teacache", "ret_steps": 60}, "cache.ret_steps"),
    ({"method": "teacache", "cutoff_steps": 2, "ret_steps": 5}, "cache.cutoff_steps"),
    ({"method": "teacache", "coefficients": ()}, "cache.coefficients"),
    ({"method": "teacache", "residual_order": 2}, "cache.residual_order"),
    ({"method": "fastcache"}, "cache.method"),
])
def test_invalid_teacache_fields_are_named(tc, field):
    with pytest.raises(RecipeError, match=f"'{field}'"):
        Recipe().replace(cache=tc)


def test_recipe_file_errors_name_file_and_field(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"schema_version": 1, "steps": 50, "teacach": {}}))
    with pytest.raises(RecipeError, match=r"bad.json: unknown field\(s\) teacach"):
        Recipe.load(p)
    p.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(RecipeError, match="schema_version 99"):
        Recipe.load(p)
    p.write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        Recipe.load(p)
    p.write_text(json.dumps({"teacache": {"threshold": "high"}}))
    with pytest.raises(RecipeError, match=r"bad.json: field 'teacache.threshold'"):
        Recipe.load(p)


def test_model_changing_recipe_on_built_pipeline_is_refused():
    pipe = load_pipeline("tiny", device="cpu")
    apply(pipe, FAST)
    apply(pipe, FAST.replace(steps=5, guidance=2.0))  # call-time fields change freely
    with pytest.raises(Flux2LabError, match="differs in compile"):
        apply(pipe, FAST.replace(compile=True))


def test_generate_command(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "flux2lab.generate", "--model", "tiny", "--prompt", "a red circle",
         "--seed", "3", "--steps", "2", "--out", str(out)], capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "record.json").read_text())
    assert record["images"][0]["seed"] == 3 and (out / record["images"][0]["file"]).is_file()
    bad = subprocess.run([sys.executable, "-m", "flux2lab.generate", "--out", str(out), "--prompts", "nope.txt"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "prompt file nope.txt does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_diffusers_cache_recipe_copies_and_pickles():
    import copy
    import pickle

    r = Recipe(steps=10).replace(cache={"method": "taylorseer", "cache_interval": 3})
    assert copy.deepcopy(r) == r and pickle.loads(pickle.dumps(r)) == r and r.cache.cache_interval == 3
    with pytest.raises(AttributeError, match="no setting 'max_order'"):
        r.cache.max_order  # noqa: B018 (not given: diffusers' default applies)
