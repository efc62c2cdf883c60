"""The zoo: the synthetic world, the yardstick, the `mini` model and its training command.

Two kinds of tests. The first run everywhere: the world's ground truth, a smoke training run on the CPU
(tiny networks, a few steps) whose weights load into a working `Flux2Pipeline`, and the pipeline decoding
exactly the latents the trainer encodes. The second need the shipped trained weights and assert the
science on a real denoiser: `mini` follows its prompts, the yardstick reads real images, domain FID tells
`mini` from the random `tiny`, TeaCache trades skipped steps for image change monotonically, NVFP4 changes
images more than FP8. They skip, saying how to make the weights, while the weights are missing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flux2lab.common.errors import FeatureNotAvailable, Flux2LabError
from flux2lab.pipeline.core import generate
from flux2lab.pipeline.recipe import Recipe
from flux2lab.zoo import mini, store, world, yardstick
from flux2lab.zoo.evaluate import evaluate, heldout_prompts, real_images

pytestmark = pytest.mark.usefixtures("one_thread")  # the models' matmuls are small: 2 shared threads are slower

TRAINED = all(store.path_of(n).is_file() for n in store.FILES)
needs_weights = pytest.mark.skipif(
    not TRAINED,
    reason=f"mini's trained weights are not in {store.WEIGHTS_DIR}; make them with `{store.TRAIN_COMMAND}`",
)


def pixels(images) -> np.ndarray:
    return yardstick.to_tensor(images).numpy()


# --------------------------------------------------------------------------------------------- the world


def test_captions_parse_back_to_their_scenes_and_hold_out_a_tenth():
    scenes = world.sample_scenes(600, seed=3, split="all")
    assert all(world.parse_caption(s.caption) == s for s in scenes)
    assert {len(s.things) for s in scenes} == {1, 2, 3}
    assert 0.05 < np.mean([s.heldout for s in scenes]) < 0.15
    assert not any(s.heldout for s in world.sample_scenes(200, seed=3, split="train"))
    assert all(s.heldout for s in world.sample_scenes(20, seed=3, split="heldout"))
    assert world.sample_scenes(5, seed=1) == world.sample_scenes(5, seed=1) != world.sample_scenes(5, seed=2)
    assert (
        "above"
        in world.Scene(
            (world.Thing("circle", "red", "small", "top"), world.Thing("square", "blue", "large", "bottom")),
            "plain",
        ).caption
    )


@pytest.mark.parametrize(
    "caption",
    [
        "a red circle on a plain background",  # no size
        "a small red circle at the middle on a plain background",  # unknown place
        # the same place twice
        "a small red circle at the top and a large blue square at the top on a plain background",
        "a cat sleeping on a sofa",
    ],
)
def test_a_prompt_outside_the_world_is_a_clear_error(caption):
    with pytest.raises(Flux2LabError, match="not a caption of the mini world"):
        world.parse_caption(caption)


def test_caption_words_are_single_tokens():
    """Each word of the world is one token of the offline tokenizer (not spelled out letter by letter)."""
    from flux2lab.pipeline.tokenizer import UNK_ID, build_tokenizer

    tok = build_tokenizer()
    words = {w for s in world.sample_scenes(300, seed=0, split="all") for w in s.caption.split()}
    for w in sorted(words):
        ids = tok(w, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != UNK_ID, f"{w!r} -> {ids}"


def test_rendering_is_seeded_and_draws_the_scene():
    scene = world.Scene((world.Thing("square", "red", "large", "left"),), "plain")
    a, b = world.render([scene], seed=0), world.render([scene], seed=0)
    assert torch.equal(a, b) and a.shape == (1, 3, 64, 64) and 0 <= a.min() and a.max() <= 1
    x, y = (int(v) for v in world.POSITIONS["left"])
    r, g, bl = a[0, :, y, x]
    assert r > 0.7 and g < 0.3 and bl < 0.3, "a red square at the left is red there"
    assert a[0, :, y, 64 - x].std() < 0.05, "and grey (background) at the right"
    assert world.render([scene], seed=0, size=32).shape == (1, 3, 32, 32)


def test_facts_count_what_the_prompt_states():
    want = world.parse_caption("a small red circle above a large blue square on a plain background")
    assert all(yardstick.facts(want, want)) and len(yardstick.facts(want, want)) == 1 + 2 * 3 + 2
    wrong_colour = world.parse_caption("a small green circle above a large blue square on a plain background")
    assert sum(yardstick.facts(wrong_colour, want)) == len(yardstick.facts(want, want)) - 1
    extra = world.parse_caption(
        "a small red circle at the top and a large blue square at the bottom and a small "
        "red circle at the left on a plain background"
    )
    assert sum(yardstick.facts(extra, want)) == len(yardstick.facts(want, want)) - 1


# ------------------------------------------------------------------------------- training, loading (smoke)


@pytest.fixture(scope="module")
def smoke_weights(tmp_path_factory):
    from flux2lab.zoo import train

    out = tmp_path_factory.mktemp("mini_smoke")
    with pytest.raises(SystemExit) as done:
        from flux2lab.cli import run_main

        run_main(
            train.main,
            [
                "--out",
                str(out),
                "--smoke",
                "--device",
                "cpu",
                "--max-steps",
                "2",
                "--budget-s",
                "600",
                "--no-eval",
            ],
        )
    assert done.value.code == 0
    return out


def test_smoke_training_writes_loadable_weights(smoke_weights, no_network):
    import json

    report = json.loads((smoke_weights / "train_report.json").read_text())
    assert report["transformer"]["steps"] == 2 and report["weights_mb"] < 25
    assert 0 < report["yardstick"]["vae_psnr_db"] < float("inf")
    pipe = mini.build_mini("cpu", torch.float32, folder=smoke_weights)
    info = pipe.flux2lab_model
    assert info.revision.startswith("sha256:") and info.text_encoder_out_layers == (1, 2, 3)
    assert pipe.transformer.config.joint_attention_dim == 3 * pipe.text_encoder.config.text_config.hidden_size
    prompt = heldout_prompts(1)[0]
    out = generate(pipe, [prompt, prompt], [0, 0], Recipe(steps=2))
    assert out.images[0].size == (64, 64)
    assert np.array_equal(pixels(out.images[:1]), pixels(out.images[1:])), "same prompt and seed, same image"
    ev = evaluate(pipe, Recipe(steps=2), n=2, real=real_images(4), model=yardstick.load(smoke_weights))
    assert ev.per_image_accuracy.shape == (2,) and 0 <= ev.accuracy <= 1 and np.isfinite(ev.domain_fid)


def test_resume_trains_only_the_transformer_further(smoke_weights, tmp_path):
    import json

    from flux2lab.cli import run_main
    from flux2lab.zoo import train

    with pytest.raises(SystemExit) as done:
        run_main(
            train.main,
            [
                "--out",
                str(tmp_path),
                "--smoke",
                "--device",
                "cpu",
                "--max-steps",
                "1",
                "--resume",
                str(smoke_weights),
                "--no-eval",
            ],
        )
    assert done.value.code == 0
    for name in ("vae", "text_encoder", "yardstick"):
        assert (tmp_path / f"{name}.safetensors").read_bytes() == (
            smoke_weights / f"{name}.safetensors"
        ).read_bytes()
    assert (tmp_path / "transformer.safetensors").read_bytes() != (
        smoke_weights / "transformer.safetensors"
    ).read_bytes()
    report = json.loads((tmp_path / "train_report.json").read_text())
    assert report["resumed_from"] == str(smoke_weights) and report["transformer"]["steps"] == 1


def test_pipeline_decodes_the_latents_the_trainer_encodes(smoke_weights, monkeypatch):
    """A transformer that predicts zero velocity leaves the start latents alone, so the pipeline's output is
    its decoding of them: it must equal the VAE reconstruction the trainer's encoding implies."""
    from flux2lab.zoo.train import reconstruct

    pipe = mini.build_mini("cpu", torch.float32, folder=smoke_weights)
    x = world.render(world.sample_scenes(1, seed=0), seed=0)
    with (
        torch.no_grad()
    ):  # what train_transformer feeds as x0 (before packing, which the pipeline does itself)
        latents = pipe._encode_vae_image(x * 2 - 1, generator=None)
    monkeypatch.setattr(
        pipe.transformer, "forward", lambda hidden_states, **kw: (torch.zeros_like(hidden_states),)
    )
    out = pipe(
        prompt="x",
        latents=latents,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="pt",
        max_sequence_length=mini.MAX_SEQUENCE_LENGTH,
        text_encoder_out_layers=(1, 2, 3),
    ).images
    torch.testing.assert_close(out, reconstruct(pipe.vae, x, torch.device("cpu")), atol=1e-4, rtol=0)


def test_missing_weights_name_the_training_command(tmp_path):
    with pytest.raises(Flux2LabError, match="python -m flux2lab.zoo.train --out flux2lab/zoo/weights"):
        mini.build_mini("cpu", torch.float32, folder=tmp_path)


def test_mini_is_a_builtin_model():
    from flux2lab.pipeline.models import BUILTIN, load_pipeline

    assert "mini" in BUILTIN
    if not TRAINED:
        with pytest.raises(Flux2LabError, match="weights of the mini model are missing"):
            load_pipeline("mini", device="cpu")


def test_yardstick_metric_is_registered():
    from flux2lab import metrics

    assert "yardstick" in metrics.METRICS and metrics.METRICS["yardstick"].needs_prompts


# -------------------------------------------------------------------------------- science (trained mini)


@pytest.fixture(scope="module")
def mini_pipe():
    """Shared and read-only: tests that change the model (precision) load their own."""
    from flux2lab.pipeline.models import load_pipeline

    return load_pipeline("mini", device="cpu")


@needs_weights
def test_yardstick_reads_real_images():
    scenes = world.sample_scenes(300, seed=77, split="heldout")
    acc = yardstick.attribute_accuracy(yardstick.load(), world.render(scenes, seed=77), scenes)
    assert acc.mean() >= 0.95


@needs_weights
def test_mini_follows_prompts_and_looks_like_the_world(mini_pipe, no_network):
    """Domain FID of 16 images is far above its n=200 value (a 128-d covariance from 16 images), for real
    images too, so both models are judged against the floor: real images at the same n. Measured on 200
    images of each model at 50 steps, over 200 random subsets of 16: mini's excess over the floor is a median
    0.05 (95th percentile 0.23, worst 0.42) of tiny's, tiny sits at least 2.7x the floor; at n=200 the
    excess ratio is 0.09 (mini 1493, tiny 13414, floor 362)."""
    model = yardstick.load()
    real = real_images(300)
    ev = evaluate(mini_pipe, Recipe(steps=50), n=16, real=real, model=model, floor_draws=20)
    assert ev.accuracy >= 0.9, f"mini's attribute accuracy on held-out captions: {ev.accuracy:.3f}"
    from flux2lab.pipeline.models import load_pipeline

    tiny = evaluate(load_pipeline("tiny", device="cpu"), Recipe(steps=50), n=16, real=real, model=model,
                    floor_draws=0)
    floor = ev.domain_fid_floor
    assert tiny.domain_fid > 2 * floor, (tiny.domain_fid, floor)
    assert ev.domain_fid - floor < 0.5 * (tiny.domain_fid - floor), (ev.domain_fid, tiny.domain_fid, floor)
    assert tiny.accuracy < ev.accuracy - 0.5


def _distance(reference, candidates) -> float:
    """LPIPS when its weights are here, else root-mean-square pixel difference (both 0 for equal images)."""
    from flux2lab import metrics

    weights = metrics.check_weights(["lpips"], skip_missing=True).get("lpips")
    if weights is not None:
        return float(np.mean(metrics.lpips(reference, candidates, weights, device="cpu")))
    return float(np.sqrt(np.mean((pixels(reference) - pixels(candidates)) ** 2)))


@needs_weights
def test_teacache_skips_more_and_changes_more_as_the_threshold_rises(mini_pipe):
    prompts = heldout_prompts(3, seed=5)
    base = Recipe(steps=50)
    reference = generate(mini_pipe, prompts, 0, base).images
    skipped, change = [], []
    for threshold in (0.05, 0.3, 1.0):
        recipe = base.replace(cache={"method": "teacache", "threshold": threshold, "ret_steps": 5})
        try:
            out = generate(mini_pipe, prompts, 0, recipe)
        except FeatureNotAvailable as e:
            pytest.skip(str(e))
        skipped.append(out.skipped_fraction)
        change.append(_distance(reference, out.images))
    generate(mini_pipe, prompts[:1], 0, base)  # leave the shared pipeline uncached
    assert skipped[0] < skipped[-1] and skipped == sorted(skipped), skipped
    assert change[0] < change[-1], change


@needs_weights
def test_nvfp4_changes_images_more_than_fp8(mini_pipe):
    from flux2lab.pipeline.models import load_pipeline

    prompts = heldout_prompts(3, seed=9)
    recipe = Recipe(steps=20)
    reference = generate(mini_pipe, prompts, 0, recipe).images
    change = {}
    for precision in ("fp8", "nvfp4"):
        pipe = load_pipeline("mini", device="cpu")
        try:
            out = generate(
                pipe, prompts, 0, recipe.replace(transformer_precision=precision, quant_backend="emulated")
            )
        except FeatureNotAvailable as e:
            pytest.skip(str(e))
        change[precision] = _distance(reference, out.images)
    assert 0 < change["fp8"] < change["nvfp4"], change
