"""diffusers' step caches on the stock FLUX.2 pipeline (tiny): each one runs, skips, restarts per image and
leaves computed steps exact; what cannot run is refused with the reason; the block counter counts what ran."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from flux2lab.common.errors import Flux2LabError
from flux2lab.hooks import step_caches, teacache
from flux2lab.hooks.block_counter import BlockCounter
from flux2lab.pipeline.core import apply, generate
from flux2lab.pipeline.recipe import Recipe

STEPS = 8
RECIPE = Recipe(steps=STEPS)
# Settings that skip on tiny's random weights (its first-block and input distances are large).
SKIPPING = {
    "taylorseer": {"cache_interval": 2, "disable_cache_before_step": 2},
    "magcache": {"mag_ratios": [1.0] * STEPS, "threshold": 0.5},
    "first_block": {"threshold": 5.0},
    "seacache": {"threshold": 1.0},
}
# Settings under which the two adapted caches compute every step.
EXACT = {"first_block": {"threshold": 0.0}, "seacache": {"threshold": 0.0}}


@pytest.fixture(scope="module")
def pipe(one_thread):
    """A tiny pipeline of this module's own: the tests attach hooks to it."""
    from flux2lab.pipeline.models import load_pipeline

    p = load_pipeline("tiny", device="cpu")
    apply(p, RECIPE)
    return p


@pytest.fixture
def counter(pipe):
    with BlockCounter(pipe.transformer) as c:
        yield c
    step_caches.remove_step_cache(pipe.transformer)


def image(pipe, prompt: str = "a red fox", seed: int = 0) -> np.ndarray:
    return np.asarray(generate(pipe, [prompt], seed, RECIPE).images[0], dtype=np.float32)


@pytest.mark.parametrize("method", step_caches.METHODS)
def test_each_cache_skips_and_starts_every_image_afresh(pipe, counter, method):
    step_caches.apply_step_cache(pipe.transformer, method, SKIPPING[method], STEPS)
    assert step_caches.step_cache_method(pipe.transformer) == method
    images, fractions = [], []
    for _ in range(2):
        counter.reset()
        with step_caches.step_cache_context(pipe.transformer):
            images.append(image(pipe))
        fractions.append(counter.step_fractions())
    assert np.array_equal(*images)  # the second image of the same prompt and seed is the first again
    assert fractions[0] == fractions[1] and len(fractions[0]) == STEPS
    assert fractions[0][0] == 1.0 and counter.computed_fraction() < 0.8  # really skipped block work
    other = image(pipe, "a blue boat", 1)  # without the context: the step clock alone restarts the caches
    counter.reset()
    assert np.array_equal(image(pipe, "a blue boat", 1), other) and counter.computed_fraction() < 0.8


@pytest.mark.parametrize("method", sorted(EXACT))
def test_a_cache_that_computes_every_step_leaves_the_image_exact(pipe, counter, method):
    """Also: FirstBlockCache no longer raises, and the adapters change nothing on computed steps."""
    plain = image(pipe)
    step_caches.apply_step_cache(pipe.transformer, method, EXACT[method], STEPS)
    counter.reset()
    with step_caches.step_cache_context(pipe.transformer):
        assert np.array_equal(image(pipe), plain)
    assert counter.computed_fraction() == 1.0


def test_first_block_cache_skips_the_rest_of_the_stack_after_the_head(pipe, counter):
    step_caches.apply_step_cache(pipe.transformer, "first_block", SKIPPING["first_block"], STEPS)
    counter.reset()
    image(pipe)
    t = pipe.transformer
    head = sum(m.weight.numel() for m in t.transformer_blocks[0].modules() if isinstance(m, torch.nn.Linear))
    stack = sum(m.weight.numel() for b in (*t.transformer_blocks, *t.single_transformer_blocks)
                for m in b.modules() if isinstance(m, torch.nn.Linear))
    tail = counter.step_fractions()[1:]
    assert all(0 < f < 0.5 for f in tail) and len(set(tail)) == 1  # the head block alone ran
    assert head / stack < 0.5


def test_seacache_sees_each_step_and_caches(pipe):
    seen = []
    step_caches.apply_step_cache(pipe.transformer, "seacache", SKIPPING["seacache"], STEPS)
    root = pipe.transformer._diffusers_hook.get_hook("sea_cache_root")

    def read(block, args):  # what SeaCache's root hook prepared for this call, as its head block sees it
        meta = root.shared_state.forward_metadata
        seen.append((meta.step_index, meta.sigma, meta.num_inference_steps, meta.raw_vision[0].shape))

    handle = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(read)
    try:
        image(pipe)
    finally:
        handle.remove()
        step_caches.remove_step_cache(pipe.transformer)
    assert [s[0] for s in seen] == list(range(STEPS)) and {s[2] for s in seen} == {STEPS}
    sigmas = [s[1] for s in seen]
    assert sigmas[0] == pytest.approx(1.0) and all(a > b for a, b in zip(sigmas, sigmas[1:]))
    assert seen[0][3] == (16, 1, 16, 16)  # (C, T, H, W): tiny's 64x64 image is 16x16 latent tokens of 16 channels


def test_raw_vision_places_tokens_by_position_and_leaves_reference_tokens_out():
    ids = torch.tensor([[0, h, w, 0] for h in range(2) for w in range(3)] + [[10, 0, 0, 0]])
    ids = ids[[3, 0, 5, 1, 4, 2, 6]]  # shuffled, one reference token at the end
    hidden = ids[:, 1:3].float() @ torch.tensor([[10.0, 1.0], [1.0, 0.0]])  # token value encodes (h, w)
    (grid,) = step_caches.flux2_raw_vision(None, (), {"hidden_states": hidden[None], "img_ids": ids[None]})
    assert grid.shape == (2, 1, 2, 3)
    for h in range(2):
        for w in range(3):
            assert grid[:, 0, h, w].tolist() == [10 * h + w, h]


def test_magcache_calibration_records_one_ratio_per_step(pipe):
    step_caches.apply_step_cache(pipe.transformer, "magcache", {"calibrate": True}, STEPS)
    try:
        image(pipe)
        ratios = step_caches.mag_ratios(pipe.transformer)
        image(pipe, "another prompt")
        assert step_caches.mag_ratios(pipe.transformer) != ratios
    finally:
        step_caches.remove_step_cache(pipe.transformer)
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    with pytest.raises(Flux2LabError, match="not calibrating"):
        step_caches.mag_ratios(pipe.transformer)


def test_a_run_longer_than_set_up_is_an_error(pipe):
    step_caches.apply_step_cache(pipe.transformer, "taylorseer", {}, 4)
    try:
        with pytest.raises(Flux2LabError, match="set up for 4 steps.*step 5"):
            image(pipe)
    finally:
        step_caches.remove_step_cache(pipe.transformer)


# --- refusals ------------------------------------------------------------------------------------------------


def test_what_cannot_run_is_refused_with_the_reason(pipe, monkeypatch):
    t = pipe.transformer
    with pytest.raises(Flux2LabError, match="unknown step cache 'dbcache'.*taylorseer"):
        step_caches.check_step_cache(t, "dbcache")
    with pytest.raises(Flux2LabError, match="FLUX.2 transformer only, not Linear"):
        step_caches.check_step_cache(torch.nn.Linear(2, 2), "magcache")
    monkeypatch.setattr(t, "_parallel_config", types.SimpleNamespace(context_parallel_config=object()),
                        raising=False)
    for method in ("first_block", "seacache"):
        with pytest.raises(Flux2LabError, match=f"'{method}' cannot run under context parallelism.*deadlock"):
            step_caches.apply_step_cache(t, method, {}, STEPS)
    step_caches.check_step_cache(t, "magcache")  # a fixed schedule: the same on every rank
    monkeypatch.undo()
    monkeypatch.setattr(t, "flux2lab_graphs", object(), raising=False)
    with pytest.raises(Flux2LabError, match="'taylorseer' cannot run with CUDA graphs"):
        step_caches.check_step_cache(t, "taylorseer")
    monkeypatch.undo()
    with pytest.raises(Flux2LabError, match="fullgraph=True.*Compile with fullgraph=False"):
        step_caches.check_step_cache(t, "first_block", compile_fullgraph=True)
    assert not hasattr(t, "_diffusers_hook") or t._diffusers_hook.get_hook(step_caches.CLOCK_HOOK) is None


def test_refusals_are_known_from_the_set_up_alone():
    """What a recipe check can ask before any model is loaded."""
    assert all(step_caches.step_cache_refusal(m) is None for m in step_caches.METHODS)
    assert [m for m in step_caches.METHODS if step_caches.step_cache_refusal(m, context_parallel=True)] == \
        ["first_block", "seacache"]
    assert [m for m in step_caches.METHODS if step_caches.step_cache_refusal(m, cuda_graphs=True)] == ["taylorseer"]
    assert all(step_caches.step_cache_refusal(m, compile_fullgraph=True) for m in step_caches.METHODS)


def test_bad_settings_name_the_setting():
    with pytest.raises(Flux2LabError, match="'first_block': unknown setting.*treshold; allowed: threshold"):
        step_caches.cache_config("first_block", {"treshold": 0.1}, STEPS)
    with pytest.raises(Flux2LabError, match="'magcache'.*mag_ratios"):
        step_caches.cache_config("magcache", {}, STEPS)
    with pytest.raises(Flux2LabError, match="'seacache'.*residual_order"):
        step_caches.cache_config("seacache", {"residual_order": 2}, STEPS)
    with pytest.raises(Flux2LabError, match="taylor_factors_dtype 'float8'"):
        step_caches.cache_config("taylorseer", {"taylor_factors_dtype": "float8"}, STEPS)
    assert step_caches.cache_config("taylorseer", {"taylor_factors_dtype": "fp32"}, STEPS).taylor_factors_dtype \
        == torch.float32
    assert "raw_vision_callback" not in step_caches.settings_allowed("seacache")


def test_one_step_cache_at_a_time(pipe):
    t = pipe.transformer
    teacache.apply_teacache(t, teacache.TeaCacheConfig(num_inference_steps=STEPS, ret_steps=0))
    try:
        with pytest.raises(Flux2LabError, match="TeaCache is attached"):
            step_caches.apply_step_cache(t, "magcache", SKIPPING["magcache"], STEPS)
    finally:
        teacache.remove_teacache(t)
    step_caches.apply_step_cache(t, "magcache", SKIPPING["magcache"], STEPS)
    step_caches.apply_step_cache(t, "seacache", SKIPPING["seacache"], STEPS)  # replaces, no "already enabled"
    assert step_caches.step_cache_method(t) == "seacache"
    step_caches.remove_step_cache(t)
    assert step_caches.step_cache_method(t) is None and not t.is_cache_enabled
    with pytest.raises(Flux2LabError, match="no step cache is attached"):
        with step_caches.step_cache_context(t):
            pass


# --- the block counter ---------------------------------------------------------------------------------------


def test_counter_counts_what_teacache_really_ran(pipe, counter):
    teacache.apply_teacache(pipe.transformer, teacache.TeaCacheConfig(num_inference_steps=STEPS, ret_steps=0,
                                                                      replay_skips=(2, 3, 6)))
    try:
        counter.reset()
        record = generate(pipe, ["a red fox"], 0, RECIPE).records[0]  # generate's own counter beside this one
    finally:
        teacache.remove_teacache(pipe.transformer)
    assert counter.step_fractions() == record.step_fractions == [1, 1, 0, 0, 1, 1, 0, 1]
    assert counter.computed_fraction() == pytest.approx(5 / 8)
    counter.reset()
    image(pipe)
    assert counter.computed_fraction() == 1.0
    counter.reset()
    with pytest.raises(Flux2LabError, match="counted no transformer call"):
        counter.computed_fraction()


def test_counting_does_not_make_compiled_blocks_recompile(one_thread):
    """Every block of a kind shares one compiled graph with the counter's hooks in it, image after image."""
    from flux2lab.pipeline.models import load_pipeline

    p = load_pipeline("tiny", device="cpu")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        records = generate(p, ["a red fox", "a blue boat"], [0, 1], Recipe(steps=3, compile=True)).records
        records += generate(p, ["a red fox"], 2, Recipe(steps=3, compile=True)).records
    assert [r.computed_fraction for r in records] == [1.0, 1.0, 1.0]
