"""Models from their own configs (saved folders load and are called as the built-in models are), and the
memory plan (weights by component and precision, activations, offloading) made before any weight is read."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from flux2lab.common.errors import Flux2LabError
from flux2lab.pipeline import memory
from flux2lab.pipeline.configs import PipelineConfigs, derived_settings
from flux2lab.pipeline.core import generate
from flux2lab.pipeline.models import load_pipeline, model_info, save_pipeline
from flux2lab.pipeline.recipe import Recipe, RecipeError

PROMPTS = ["a red circle on the left", "a small blue square"]
FAST = Recipe(steps=2)
CALL_FIELDS = ("height", "width", "max_sequence_length", "text_encoder_out_layers")


def pixels(generation) -> list[np.ndarray]:
    return [np.asarray(image) for image in generation.images]


def same_images(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b), strict=True))


# --- models from their own configs -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "mini"])
def test_a_saved_builtin_loads_from_its_folder_and_makes_the_same_images(name, tmp_path, one_thread):
    builtin = load_pipeline(name, device="cpu")
    expected = generate(builtin, PROMPTS, 3, FAST)
    builtin.save_pretrained(tmp_path / name)  # diffusers' own save: no flux2lab file needed
    assert sorted(p.name for p in (tmp_path / name).iterdir() if p.is_file()) == ["model_index.json"]

    folder = load_pipeline(str(tmp_path / name), device="cpu")
    info, builtin_info = model_info(folder), model_info(builtin)
    assert info.kind == "pretrained" and info.revision.startswith("sha256:")
    assert [getattr(info, f) for f in CALL_FIELDS] == [getattr(builtin_info, f) for f in CALL_FIELDS]
    assert same_images(generate(folder, PROMPTS, 3, FAST), expected)


def test_flux2_dev_configs_give_flux2_dev_call_settings():
    from flux2lab.benchmark import full_size_text_encoder_and_vae
    from flux2lab.pipeline.models import build_transformer_on_meta

    text_encoder, vae = full_size_text_encoder_and_vae()
    configs = PipelineConfigs(
        where="FLUX.2 [dev]", transformer=dict(build_transformer_on_meta().config), vae=dict(vae.config),
        text_encoder=text_encoder.config, text_encoder_class="Mistral3ForConditionalGeneration",
        tokenizer_max_length=131072, settings={},
    )
    assert derived_settings(configs) == {"height": 1024, "width": 1024, "max_sequence_length": 512,
                                         "text_encoder_out_layers": (10, 20, 30)}


def test_generate_and_calibrate_run_on_a_saved_folder(tmp_path, one_thread):
    from flux2lab import calibrate
    from flux2lab import generate as generate_command

    folder = tmp_path / "tiny"
    load_pipeline("tiny", device="cpu").save_pretrained(folder)
    out = tmp_path / "images"
    assert generate_command.main(["--model", str(folder), "--device", "cpu", "--prompt", PROMPTS[0], "--steps", "2",
                                  "--out", str(out)]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["model"] == str(folder) and (out / record["images"][0]["file"]).is_file()
    assert calibrate.main(["--model", str(folder), "--device", "cpu", "--name", "run", "--out", str(tmp_path),
                           "--steps", "4", "--limit", "5"]) == 0
    assert (tmp_path / "run" / "fit.json").is_file()


def test_what_the_configs_do_not_decide_travels_in_flux2lab_json(tmp_path, one_thread):
    from flux2lab.pipeline import tokenizer as tok
    from flux2lab.pipeline.models import TINY_TEXT_HIDDEN, build_text_encoder

    pipe = load_pipeline("tiny", device="cpu")
    # A 3-layer encoder under a transformer that stacks 2 hidden states: the configs cannot say which two.
    pipe.register_modules(text_encoder=build_text_encoder(TINY_TEXT_HIDDEN, 3, tok.VOCAB_SIZE).eval())
    pipe.flux2lab_model = dataclasses.replace(model_info(pipe), text_encoder_out_layers=(1, 3))
    pipe.save_pretrained(tmp_path / "plain")
    with pytest.raises(Flux2LabError, match=r"plain: which text-encoder layers.*flux2lab\.json"):
        load_pipeline(str(tmp_path / "plain"), device="cpu")

    save_pipeline(pipe, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "flux2lab.json").read_text()) == {"text_encoder_out_layers": [1, 3]}
    loaded = load_pipeline(str(tmp_path / "saved"), device="cpu")
    assert model_info(loaded).text_encoder_out_layers == (1, 3)
    assert same_images(generate(loaded, PROMPTS[:1], 0, FAST), generate(pipe, PROMPTS[:1], 0, FAST))

    settings = tmp_path / "saved" / "flux2lab.json"
    settings.write_text(json.dumps({"text_encoder_out_layers": [1, 9]}))
    with pytest.raises(Flux2LabError, match=r"flux2lab.json: text_encoder_out_layers = \[1, 9\] must list 2 layer "
                                            r"numbers between 0 and 3"):
        load_pipeline(str(tmp_path / "saved"), device="cpu")
    settings.write_text(json.dumps({"layers": [1, 3]}))
    with pytest.raises(Flux2LabError, match=r"flux2lab.json: unknown key\(s\) layers; allowed: height"):
        load_pipeline(str(tmp_path / "saved"), device="cpu")


def test_a_folder_that_is_not_a_flux2_pipeline_is_refused_by_name(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Flux2LabError, match=rf"{empty} is not a diffusers pipeline folder: it has no model_index"):
        load_pipeline(str(empty), device="cpu")

    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(Flux2LabError, match=rf"{other} holds a 'FluxPipeline' pipeline.*not a FLUX.2 one"):
        load_pipeline(str(other), device="cpu")

    partial = tmp_path / "partial"
    load_pipeline("tiny", device="cpu").save_pretrained(partial)
    (partial / "transformer" / "config.json").unlink()
    (partial / "vae" / "config.json").write_text("{not json")
    with pytest.raises(Flux2LabError, match=rf"{partial} is not a complete FLUX.2 .* lacks transformer/config.json"):
        load_pipeline(str(partial), device="cpu")
    (partial / "transformer" / "config.json").write_text("{}")
    with pytest.raises(Flux2LabError, match=r"vae/config.json is not valid JSON"):
        load_pipeline(str(partial), device="cpu")


# --- the memory plan -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux2_dev():
    """FLUX.2 [dev]'s three components at full size, on the meta device."""
    from flux2lab.benchmark import full_size_text_encoder_and_vae
    from flux2lab.pipeline.models import build_transformer_on_meta

    text_encoder, vae = full_size_text_encoder_and_vae()
    return {"transformer": build_transformer_on_meta(), "text_encoder": text_encoder, "vae": vae}


def full_size_plan(components, recipe: Recipe, gib: float = 80) -> memory.MemoryPlan:
    card = memory.card_memory("cuda", gpu_memory_gib=gib)
    return memory.plan("FLUX.2 [dev]", components, recipe, height=1024, width=1024, text_tokens=512,
                       dtype=torch.bfloat16, card=card)


def test_full_size_weights_by_component_and_precision(flux2_dev):
    by = {p: {c.name: c for c in full_size_plan(flux2_dev, Recipe(transformer_precision=p,
                                                                  text_encoder_precision=p)).components}
          for p in ("bf16", "fp8", "nvfp4")}
    bf16 = by["bf16"]
    assert bf16["transformer"].params == pytest.approx(32.2e9, rel=0.01)
    assert 23e9 < bf16["text_encoder"].params < 24e9
    assert bf16["vae"].params == pytest.approx(0.084e9, rel=0.05)
    assert bf16["transformer"].bytes == 2 * bf16["transformer"].params  # 2 bytes a parameter, no buffers
    for name in ("transformer", "text_encoder"):
        fp8, nvfp4 = by["fp8"][name], by["nvfp4"][name]
        assert fp8.quantized_params == nvfp4.quantized_params > 0.9 * fp8.params  # kept layers are few
        kept = 2 * (fp8.params - fp8.quantized_params)
        assert fp8.bytes == pytest.approx(kept + fp8.quantized_params, rel=0.01)
        assert nvfp4.bytes == pytest.approx(kept + 0.5625 * nvfp4.quantized_params, rel=0.01)
        assert fp8.load_bytes == bf16[name].bytes  # quantized after loading in BF16
    assert by["fp8"]["vae"].bytes == bf16["vae"].bytes  # the VAE is not quantized


def test_bf16_flux2_dev_does_not_fit_80_gib_and_the_refusal_names_the_fix(flux2_dev):
    plan = full_size_plan(flux2_dev, Recipe())
    assert not plan.fits and 100 * memory.GIB < plan.need < 110 * memory.GIB
    with pytest.raises(Flux2LabError) as refused:
        plan.check()
    message = str(refused.value)
    assert "will not fit" in message and "text_encoder 43.5 GiB (bf16)" in message
    assert "offload 'model'" in message and "--offload model" in message

    for mode in ("model", "group"):
        offloaded = full_size_plan(flux2_dev, Recipe(offload=mode))
        assert offloaded.fits and offloaded.need < 64 * memory.GIB
        offloaded.check()
    # FP8 everywhere fits without offloading; NVFP4 leaves the most room; both beat the BF16 reference.
    fp8 = full_size_plan(flux2_dev, Recipe(transformer_precision="fp8", text_encoder_precision="fp8"))
    nvfp4 = full_size_plan(flux2_dev, Recipe(transformer_precision="nvfp4", text_encoder_precision="fp8"))
    assert fp8.fits and nvfp4.fits and nvfp4.need < fp8.need < plan.need
    # A 48 GiB card: only group offloading (the 24B text encoder moves whole, as diffusers does it) fits.
    assert [f.split(" (")[0] for f in full_size_plan(flux2_dev, Recipe(), gib=48).fixes] == ["offload 'group'"]
    with pytest.raises(Flux2LabError, match="nothing flux2lab offers fits this card; use a card with more memory"):
        full_size_plan(flux2_dev, Recipe(), gib=24).check()


def test_activations_grow_with_resolution(flux2_dev):
    low, high = (memory.activation_bytes(flux2_dev, s, s, 512, torch.bfloat16) for s in (512, 2048))
    assert memory.WORKSPACE < low < high and high > 10 * memory.GIB


def test_card_memory_from_the_option_or_the_device():
    assert memory.card_memory("cuda", gpu_memory_gib=80).bytes == 80 * memory.GIB
    assert memory.card_memory("cpu").bytes is None  # a CPU run is not planned
    with pytest.raises(Flux2LabError, match="--gpu-memory -1"):
        memory.card_memory("cuda", gpu_memory_gib=-1)


def test_a_folder_is_planned_from_its_configs_and_refused_before_loading(tmp_path, monkeypatch, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "tiny")
    plan = memory.plan_for(str(tmp_path / "tiny"), Recipe(), device="cpu", gpu_memory_gib=80)
    counted = {c.name: c.params for c in plan.components}
    assert counted == {name: sum(p.numel() for p in getattr(tiny_pipe, name).parameters())
                       for name in ("transformer", "text_encoder", "vae")}
    assert plan.fits and (plan.height, plan.width) == (64, 64)

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the plan refused it")

    monkeypatch.setattr("flux2lab.pipeline.models.load_pipeline", must_not_load)
    with pytest.raises(Flux2LabError, match="will not fit"):
        memory.load_for(str(tmp_path / "tiny"), Recipe(), device="cpu", gpu_memory_gib=0.1)


# --- offloading and releasing the text encoder -----------------------------------------------------------------

def test_offload_is_a_validated_recipe_field():
    assert Recipe.from_dict({"offload": "group"}).offload == "group"
    assert Recipe().model_changes(Recipe(offload="model")) == ["offload"]
    with pytest.raises(RecipeError, match="field 'offload' = 'disk'.*none | model | group"):
        Recipe(offload="disk")
    with pytest.raises(RecipeError, match="field 'offload'.*cuda_graphs"):
        Recipe(offload="model", cuda_graphs=True)
    with pytest.raises(RecipeError, match="field 'offload'.*ulysses_degree"):
        Recipe(offload="group", ulysses_degree=2)


@pytest.mark.parametrize("mode", ["model", "group"])
def test_offloading_makes_the_same_images(mode, tiny_pipe, one_thread):
    """diffusers' offloading runs on CPU too (onto the CPU itself): the wiring is checked here, the memory
    saving on a GPU (test_offload_on_gpu, scripts/gpu_memory_plan.py)."""
    expected = generate(tiny_pipe, PROMPTS, 1, FAST)
    pipe = load_pipeline("tiny", device="cpu")
    assert same_images(generate(pipe, PROMPTS, 1, FAST.replace(offload=mode)), expected)


def test_releasing_the_text_encoder_keeps_the_images(tiny_pipe, one_thread):
    expected = generate(tiny_pipe, PROMPTS, 2, FAST)
    for recipe in (FAST, FAST.replace(offload="model")):
        pipe = load_pipeline("tiny", device="cpu", staged=True)
        released = generate(pipe, PROMPTS, 2, recipe, release_text_encoder=True)
        assert pipe.text_encoder is None and released.encode_s > 0
        assert same_images(released, expected)
        assert same_images(generate(pipe, PROMPTS[:1], 2, recipe), generate(tiny_pipe, PROMPTS[:1], 2, FAST))
        with pytest.raises(Flux2LabError, match="was not encoded before this pipeline's text encoder was released"):
            generate(pipe, ["a prompt it has not seen"], 0, recipe)
        # Under model offloading, the rest stays put once the encoder is gone (it fits: no GPU limit here).
        assert not hasattr(pipe.transformer, "_hf_hook")


def test_after_the_release_model_offloading_goes_on_where_the_rest_does_not_fit(tiny_pipe, one_thread):
    from flux2lab.pipeline.core import drop_text_encoder, encode_prompts

    recipe = FAST.replace(offload="model")
    pipe = load_pipeline("tiny", device="cpu", staged=True)
    generate(pipe, PROMPTS[:1], 2, recipe)
    encode_prompts(pipe, PROMPTS)
    drop_text_encoder(pipe, card=memory.Card("cpu", 1024, "a 1 KiB card"))
    assert pipe.text_encoder is None and hasattr(pipe.transformer, "_hf_hook")  # offloaded still
    assert same_images(generate(pipe, PROMPTS, 2, recipe), generate(tiny_pipe, PROMPTS, 2, FAST))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_released_text_encoder_leaves_the_card_even_while_referenced():
    """Under model offloading the encoder is on the card when it is released; a reference held elsewhere keeps
    it in host memory, never on the card, and the rest then stays on the card."""
    pipe = memory.load_for("tiny", FAST.replace(offload="model"), device="cuda")
    encoder = pipe.text_encoder
    generate(pipe, PROMPTS, 0, FAST.replace(offload="model"), release_text_encoder=True)
    assert {p.device.type for p in encoder.parameters()} == {"cpu"}
    assert pipe.transformer.device.type == "cuda" and not hasattr(pipe.transformer, "_hf_hook")
    on_card = sum(p.numel() * p.element_size() for m in (pipe.transformer, pipe.vae) for p in m.parameters())
    assert torch.cuda.memory_allocated() < on_card + 64 * 2**20  # the rest, plus at most 64 MiB


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["model", "group"])
def test_offload_on_gpu(mode):
    """On a GPU, offloaded weights wait in host memory and the images do not change."""
    expected = generate(load_pipeline("tiny", device="cuda"), PROMPTS, 0, FAST)
    pipe = memory.load_for("tiny", FAST.replace(offload=mode), device="cuda")
    assert pipe.transformer.device.type == "cpu"  # staged in host memory until apply
    out = generate(pipe, PROMPTS, 0, FAST.replace(offload=mode))
    assert same_images(out, expected)
