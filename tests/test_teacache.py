"""TeaCache hooks on the tiny FLUX.2 pipeline: exactness at threshold 0, the skip rule step by step, what a
skipped step computes, reference tokens, batches, resets, torch.compile and the distributed reduction."""

from __future__ import annotations

import itertools
import json
import math
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2Transformer2DModel

from flux2lab.common.errors import Flux2LabError
from flux2lab.hooks import teacache
from flux2lab.hooks.teacache import TeaCacheConfig
from flux2lab.pipeline.core import Prompt, apply, generate
from flux2lab.pipeline.models import TINY_TRANSFORMER
from flux2lab.pipeline.recipe import FLUX2_DEV_COEFFICIENTS, Recipe

IDENTITY = (1.0, 0.0)  # rescaled distance = rel_l1
LOG_KEYS = {"step", "timestep", "rel_l1", "rescaled", "accumulator", "computed", "reason", "replayed"}

# A hand-made distance sequence and the pattern the rule defines for it (threshold 0.25, ret_steps 2,
# cutoff 8, 10 steps), worked out by hand:
#   0 first | 1 ret_steps | 2 acc .10 skip | 3 acc .20 skip | 4 acc .30 compute | 5 acc .30 compute |
#   6 acc .05 skip | 7 acc .10 skip | 8 cutoff | 9 cutoff
HAND_REL = [None, 0.1, 0.1, 0.1, 0.1, 0.3, 0.05, 0.05, 0.05, 0.05]
HAND_CONFIG = TeaCacheConfig(num_inference_steps=10, threshold=0.25, coefficients=IDENTITY, ret_steps=2,
                             cutoff_steps=8)
HAND_COMPUTED = [True, True, False, False, True, True, False, False, True, True]
HAND_MEASURED = [2, 3, 4, 5, 6, 7]  # steps whose distance decides
HAND_ACCUMULATOR = [0.0, 0.0, 0.1, 0.2, 0.3, 0.3, 0.05, 0.1, 0.0, 0.0]


def images(gen) -> list[np.ndarray]:
    return [np.asarray(i, dtype=np.float32) for i in gen.images]


def test_threshold_zero_is_identical_to_the_uncached_pipeline(tiny_pipe):
    plain = Recipe(steps=4)
    cached = plain.replace(cache={"method": "teacache", "threshold": 0.0, "ret_steps": 0})
    a = generate(tiny_pipe, ["a lighthouse at night"], 0, plain)
    b = generate(tiny_pipe, ["a lighthouse at night"], 0, cached)
    for x, y in zip(images(a), images(b)):
        assert np.array_equal(x, y)
    for rec in b.records:
        assert [e["computed"] for e in rec.teacache] == [True] * 4
        assert all(e["rel_l1"] > 0 for e in rec.teacache[1:])  # measured every step, and still computed


def test_hand_made_distances_give_the_defined_pattern():
    assert teacache.plan_skips(HAND_CONFIG, HAND_REL) == HAND_COMPUTED
    # Rescaled by x -> 2x: 2 acc .2 skip | 3 acc .4 compute | 4 acc .2 skip | 5 acc .8 compute | 6 .1, 7 .2 skip.
    doubled = TeaCacheConfig(num_inference_steps=10, threshold=0.25, coefficients=(2.0, 0.0), ret_steps=2,
                             cutoff_steps=8)
    assert teacache.plan_skips(doubled, HAND_REL) == [True, True, False, True, False, True, False, False, True, True]


def _count_block_calls(transformer) -> tuple[list[int], list]:
    calls = [0]
    handles = [block.attn.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
               for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]]
    return calls, handles


def test_pipeline_follows_the_pattern_skips_blocks_and_logs_every_step(tiny_pipe, monkeypatch):
    measured = iter(HAND_REL[s] for s in HAND_MEASURED)
    monkeypatch.setattr(teacache, "relative_l1", lambda cur, prev, group=None: next(measured))
    recipe = Recipe(steps=10).replace(cache={"method": "teacache", "threshold": 0.25, "coefficients": IDENTITY,
                                                "ret_steps": 2, "cutoff_steps": 8})
    t = tiny_pipe.transformer
    calls, handles = _count_block_calls(t)
    try:
        rec = generate(tiny_pipe, ["a fox in the snow"], 0, recipe).records[0]
    finally:
        for h in handles:
            h.remove()
    assert next(measured, "done") == "done"  # distances were measured on exactly the deciding steps
    log = rec.teacache
    assert [e["step"] for e in log] == list(range(10))
    assert all(set(e) == LOG_KEYS for e in log)
    assert [e["computed"] for e in log] == HAND_COMPUTED
    assert rec.skipped_steps == [2, 3, 6, 7]
    assert [e["rel_l1"] for e in log] == [HAND_REL[s] if s in HAND_MEASURED else None for s in range(10)]
    assert [e["accumulator"] for e in log] == pytest.approx(HAND_ACCUMULATOR)
    assert [e["reason"] for e in log] == ["first", "ret_steps", "below_threshold", "below_threshold",
                                          "threshold_reached", "threshold_reached", "below_threshold",
                                          "below_threshold", "cutoff", "cutoff"]
    timesteps = [e["timestep"] for e in log]
    assert timesteps[0] == pytest.approx(1000) and all(a > b for a, b in itertools.pairwise(timesteps))
    n_blocks = len(t.transformer_blocks) + len(t.single_transformer_blocks)
    assert calls[0] == n_blocks * sum(HAND_COMPUTED)  # skipped steps ran no block


# --- a skipped step's output, on the transformer itself ---------------------------------------------------


def _transformer(**changes) -> Flux2Transformer2DModel:
    torch.manual_seed(0)
    return Flux2Transformer2DModel(**{**TINY_TRANSFORMER, **changes}).eval()


def _inputs(step: int, batch: int = 2, img: int = 16, txt: int = 8, refs: int = 0, steps: int = 4) -> dict:
    gen = torch.Generator().manual_seed(step)
    ids = torch.zeros(img + refs, 4)
    ids[img:, 0] = 10  # reference tokens, as Flux2Pipeline numbers them
    return {"hidden_states": torch.randn(batch, img + refs, 16, generator=gen),
                "encoder_hidden_states": torch.randn(batch, txt, 64, generator=torch.Generator().manual_seed(99)),
                "timestep": torch.full((batch,), 1 - step / steps), "img_ids": ids.expand(batch, -1, -1),
                "txt_ids": torch.zeros(batch, txt, 4), "guidance": torch.full((batch,), 4.0), "return_dict": False}


def _block_output_and_embedding(t, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}
    h1 = t.x_embedder.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o))
    h2 = t.norm_out.register_forward_pre_hook(lambda m, a: seen.__setitem__("blocks", a[0]))
    try:
        t(**inputs)
    finally:
        h1.remove()
        h2.remove()
    return seen["blocks"], seen["x"]


@torch.no_grad()
def test_a_skipped_step_adds_the_cached_residual_to_the_current_embedding_for_the_whole_batch():
    t = _transformer()
    step0, step1 = _inputs(0), _inputs(1)
    blocks0, x0 = _block_output_and_embedding(t, step0)
    x1 = t.x_embedder(step1["hidden_states"])
    temb1 = t.time_guidance_embed(step1["timestep"] * 1000, step1["guidance"] * 1000)
    expected = t.proj_out(t.norm_out(x1 + blocks0 - x0, temb1))
    teacache.apply_teacache(t, TeaCacheConfig(num_inference_steps=4, ret_steps=0, replay_skips=(1,)))
    t(**step0)
    skipped = t(**step1)[0]
    assert skipped.shape == (2, 16, 16)
    torch.testing.assert_close(skipped, expected)
    log = teacache.teacache_log(t)
    assert len(log) == 2 and log[1]["computed"] is False and log[1]["replayed"] is True  # one decision per batch
    assert log[1]["rel_l1"] is not None  # a replayed step still measures (it costs what a decided one does)


@torch.no_grad()
def test_reference_tokens_are_left_out_of_the_distance_but_kept_in_the_residual():
    t = _transformer()
    mods, inputs = {}, []
    h1 = t.double_stream_modulation_img.register_forward_hook(lambda m, i, o: mods.__setitem__("img", o))
    h2 = t.x_embedder.register_forward_hook(
        lambda m, i, o: inputs.append(teacache.modulated_input(t.transformer_blocks[0].norm1, o, mods["img"])))
    teacache.apply_teacache(t, TeaCacheConfig(num_inference_steps=4, threshold=0.0, ret_steps=0))
    for step in range(2):
        t(**_inputs(step, refs=8))
    h1.remove()
    h2.remove()
    generated = [m[:, :16] for m in inputs]
    expected = float((generated[1] - generated[0]).abs().sum() / generated[0].abs().sum())
    everything = float((inputs[1] - inputs[0]).abs().sum() / inputs[0].abs().sum())
    assert teacache.teacache_log(t)[1]["rel_l1"] == pytest.approx(expected, rel=1e-5)
    assert abs(expected - everything) > 1e-3  # the reference tokens would have changed the number
    teacache.apply_teacache(t, TeaCacheConfig(num_inference_steps=4, threshold=0.0, ret_steps=0, replay_skips=(1,)))
    t(**_inputs(0, refs=8))
    assert t(**_inputs(1, refs=8))[0].shape == (2, 24, 16)  # reference tokens pass through a skipped step


def test_multi_reference_prompt_runs_with_teacache(tiny_pipe, tmp_path):
    from PIL import Image

    ref = tmp_path / "ref.png"
    Image.new("RGB", (64, 64), (30, 90, 200)).save(ref)
    recipe = Recipe(steps=4).replace(cache={"method": "teacache", "threshold": 0.0, "ret_steps": 0})
    plain = generate(tiny_pipe, [Prompt("make it red", (str(ref),))], 0, Recipe(steps=4))
    out = generate(tiny_pipe, [Prompt("make it red", (str(ref),))], 0, recipe)
    assert np.array_equal(images(plain)[0], images(out)[0])
    assert [e["step"] for e in out.records[0].teacache] == [0, 1, 2, 3]
    assert out.records[0].reference_images == [str(ref)]


# --- state between images --------------------------------------------------------------------------------


def test_images_start_from_a_clean_state(tiny_pipe):
    recipe = Recipe(steps=6).replace(cache={"method": "teacache", "threshold": 0.5, "coefficients": IDENTITY,
                                               "ret_steps": 1})
    out = generate(tiny_pipe, ["a red barn", "a red barn"], [3, 3], recipe)
    first, second = out.records
    assert first.skipped_steps and first.skipped_steps == second.skipped_steps
    assert [e["step"] for e in second.teacache] == list(range(6))
    assert np.array_equal(*images(out))


@torch.no_grad()
def test_a_timestep_that_goes_up_starts_a_new_image_without_an_explicit_reset():
    t = _transformer()
    teacache.apply_teacache(t, TeaCacheConfig(num_inference_steps=4, threshold=0.0, ret_steps=0))
    for step in range(3):  # an image stopped after 3 of its 4 steps
        t(**_inputs(step))
    t(**_inputs(0))
    assert [e["step"] for e in teacache.teacache_log(t)] == [0]
    for step in range(1, 4):
        t(**_inputs(step))
    with pytest.raises(Flux2LabError, match="set up for 4 steps.*step 5"):
        t(**_inputs(5, steps=8) | {"timestep": torch.full((2,), 0.01)})


def test_core_swaps_and_removes_teacache(tiny_pipe):
    on = Recipe(steps=4).replace(cache={"method": "teacache", "threshold": 0.3, "ret_steps": 1})
    apply(tiny_pipe, on)
    t = tiny_pipe.transformer
    hooked = [m for m in t.modules() if teacache.HOOK_NAME in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})]
    assert len(hooked) == 4 + len(t.transformer_blocks) + len(t.single_transformer_blocks)
    apply(tiny_pipe, on.replace(cache={"threshold": 0.6}))
    assert teacache.teacache_config(t).threshold == 0.6
    apply(tiny_pipe, Recipe(steps=4))
    assert not any(teacache.HOOK_NAME in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})
                   for m in t.modules())
    with pytest.raises(Flux2LabError, match="not attached"):
        teacache.teacache_log(t)


# --- compile -----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_blocks_compile_once_and_are_not_recompiled_per_step_or_per_config():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    t = _transformer(num_layers=3, num_single_layers=3)
    steps = 6
    teacache.apply_teacache(t, TeaCacheConfig(num_inference_steps=steps, ret_steps=0, replay_skips=(2, 3, 5)))
    eager = [t(**_inputs(s, steps=steps))[0] for s in range(steps)]
    # `eager` backend: dynamo captures and guards exactly as with inductor, without minutes of codegen on CPU.
    t.compile_repeated_blocks(fullgraph=True, backend="eager")
    compiled = [t(**_inputs(s, steps=steps))[0] for s in range(steps)]  # warm-up: computed and skipped steps
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # the blocks really are compiled (double and single block classes)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
    torch.compiler.set_stance("fail_on_recompile")
    try:
        for s in range(steps):  # a second image
            t(**_inputs(s, steps=steps))
        teacache.apply_teacache(t, TeaCacheConfig(num_inference_steps=steps, ret_steps=0, replay_skips=(1, 4)))
        for s in range(steps):  # another config, as a search would try
            t(**_inputs(s, steps=steps))
    finally:
        torch.compiler.set_stance("default")
    assert counters["stats"]["unique_graphs"] == graphs
    assert [e["computed"] for e in teacache.teacache_log(t)] == [True, False, True, True, False, True]


# --- configuration and pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, field", [
    ({"replay_skips": (0, 3)}, "replay_skips"),
    ({"replay_skips": (12,)}, "replay_skips"),
    ({"ret_steps": 11}, "ret_steps"),
    ({"cutoff_steps": 1, "ret_steps": 2}, "cutoff_steps"),
    ({"threshold": -1.0}, "threshold"),
    ({"coefficients": ()}, "coefficients"),
])
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(Flux2LabError, match=f"TeaCacheConfig.{field}"):
        TeaCacheConfig(num_inference_steps=10, **changes)


def test_config_from_recipe():
    recipe = Recipe(steps=28).replace(cache={"method": "teacache", "threshold": 0.4, "ret_steps": 5, "cutoff_steps": 25})
    c = TeaCacheConfig.from_recipe(recipe, replay_skips=[7, 6])
    assert (c.num_inference_steps, c.threshold, c.ret_steps, c.cutoff_steps) == (28, 0.4, 5, 25)
    assert c.coefficients == FLUX2_DEV_COEFFICIENTS and c.replay_skips == (6, 7)


def test_rescale_follows_numpy_poly1d_and_never_goes_negative():
    for x in (0.0, 0.03, 0.05, 0.2, 0.7):
        assert teacache.rescale(FLUX2_DEV_COEFFICIENTS, x) == pytest.approx(np.poly1d(FLUX2_DEV_COEFFICIENTS)(x))
    assert teacache.rescale((-1.0, 0.0), 0.3) == 0.0
    assert teacache.rescale(IDENTITY, math.nan) == math.inf
    # Any config at threshold 0 computes every step, whatever the polynomial.
    zero = TeaCacheConfig(num_inference_steps=5, threshold=0.0, coefficients=(-5.0, 0.0), ret_steps=0)
    assert teacache.plan_skips(zero, [None, 0.1, 0.2, 0.0, 0.3]) == [True] * 5


def test_distance_is_reduced_over_the_token_shards(monkeypatch):
    """Each rank of a context-parallel group holds half the tokens: the sums are reduced before dividing, so
    both ranks get the whole sequence's distance. (The real collective runs in test_run's two-rank job.)"""
    gen = torch.Generator().manual_seed(0)
    cur, prev = torch.randn(2, 12, 8, generator=gen), torch.randn(2, 12, 8, generator=gen)
    cur[:, 6:] *= 5  # the shards' own distances differ a lot
    shards = [(cur[:, :6], prev[:, :6]), (cur[:, 6:], prev[:, 6:])]
    total = sum(torch.stack([(c - p).abs().sum(), p.abs().sum()]) for c, p in shards)
    sentinel = object()

    def all_reduce(tensor, op, group):  # what SUM over both ranks leaves on every rank
        assert op == torch.distributed.ReduceOp.SUM and group is sentinel
        tensor.copy_(total)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    reduced = [teacache.relative_l1(c, p, sentinel) for c, p in shards]
    local = [teacache.relative_l1(c, p) for c, p in shards]
    assert reduced[0] == reduced[1] == pytest.approx(teacache.relative_l1(cur, prev))
    assert abs(local[0] - local[1]) > 0.1  # without the reduction the ranks would decide differently
    assert teacache.context_parallel_group(_transformer()) is None


def test_overhead_script_runs_on_cpu(tmp_path):
    """Every step cache's cost (scripts/gpu_cache_overhead.py, which replaced gpu_teacache_overhead.py)."""
    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "gpu_cache_overhead.py"))
    assert script["main"](["--model", "tiny", "--device", "cpu", "--steps", "5", "--warmup", "1", "--rounds", "1",
                           "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "cache_overhead.json").read_text())
    assert report["normal"]["computed_median_ms"] > 0 and report["normal"]["cached_steps"] == []
    assert set(report["methods"]) == {"teacache", "taylorseer", "taylorseer_lite", "magcache", "first_block",
                                      "seacache"}
    for name, m in report["methods"].items():
        assert m["computed"]["cached_steps"] == [] and m["computed"]["computed_median_ms"] > 0, name
        assert m["cached"]["cached_steps"] and m["cached"]["cached_median_ms"] > 0, name  # it really cached
        assert set(m["targets"]) == {"computed_overhead_pct", "cached_cost_pct", "added_peak_gib"}
        assert m["computed_overhead_pct"] is not None and m["added_peak_gib"] is None  # no GPU memory on CPU
    md = (tmp_path / "cache_overhead.md").read_text()
    assert "| teacache |" in md and "| seacache |" in md


# --- the residual predictor (residual_order=1) -------------------------------------------------------------


@torch.no_grad()
def test_residual_order_one_follows_the_line_through_the_last_two_computed_residuals():
    plain = _transformer()
    (b0, x0), (b1, x1) = (_block_output_and_embedding(plain, _inputs(s)) for s in (0, 1))
    step2 = _inputs(2)
    x2 = plain.x_embedder(step2["hidden_states"])
    temb2 = plain.time_guidance_embed(step2["timestep"] * 1000, step2["guidance"] * 1000)
    r0, r1 = b0 - x0, b1 - x1
    for slope in (1.0, 0.5):
        t = _transformer()
        teacache.apply_teacache(t, TeaCacheConfig(num_inference_steps=4, ret_steps=0, replay_skips=(2,),
                                                  residual_order=1, residual_slope=slope))
        t(**_inputs(0))
        t(**_inputs(1))
        expected = plain.proj_out(plain.norm_out(x2 + r1 + slope * (r1 - r0), temb2))  # steps 0, 1 -> step 2
        torch.testing.assert_close(t(**step2)[0], expected)


def test_predict_residual_in_step_count():
    r0, r1 = torch.zeros(2), torch.ones(2)
    assert torch.equal(teacache.predict_residual([(3, r1)], 5), r1)  # one residual: reused as it is
    assert teacache.predict_residual([(1, r0), (3, r1)], 6).tolist() == [2.5, 2.5]  # slope 1/2 per step, 3 on
    assert teacache.predict_residual([(1, r0), (3, r1)], 6, slope=0.5).tolist() == [1.75, 1.75]


@pytest.mark.parametrize("changes, field", [
    ({"residual_order": 2}, "residual_order"),
    ({"residual_order": True}, "residual_order"),
    ({"residual_slope": -0.5}, "residual_slope"),
    ({"residual_slope": math.inf}, "residual_slope"),
])
def test_bad_predictor_config_names_the_field(changes, field):
    with pytest.raises(Flux2LabError, match=f"TeaCacheConfig.{field}"):
        TeaCacheConfig(num_inference_steps=10, **changes)


def test_on_mini_the_predictor_beats_reuse_at_equal_compute(one_thread):
    """mini (trained), 2 held-out captions, 30 steps, mini's own fit, threshold 0.05, ret_steps 3: the same
    skipped steps (replayed from plain TeaCache's decisions) with the extrapolated residual are closer to the
    uncached images."""
    from flux2lab import metrics
    from flux2lab.pipeline.models import load_pipeline
    from flux2lab.zoo.evaluate import heldout_prompts

    pipe = load_pipeline("mini", device="cpu")
    fit = json.loads((Path(__file__).resolve().parents[1] / "reports/mini/calibration/fit.json").read_text())
    recipe = Recipe(steps=30)
    apply(pipe, recipe)
    prompts, seeds = heldout_prompts(2, seed=0), [0, 1]
    uncached = generate(pipe, prompts, seeds, recipe).images

    def cached(**changes):
        out, patterns = [], []
        for prompt, seed in zip(prompts, seeds):
            teacache.apply_teacache(pipe.transformer, TeaCacheConfig(
                num_inference_steps=30, coefficients=fit["coefficients"], threshold=0.05, ret_steps=3, **changes))
            out += generate(pipe, [prompt], seed, recipe).images
            patterns.append([e["computed"] for e in teacache.teacache_log(pipe.transformer)])
        return metrics.psnr(uncached, out, device="cpu"), patterns

    reuse, patterns = cached()
    skips = [[s for s, computed in enumerate(p) if not computed] for p in patterns]
    assert all(len(s) >= 12 for s in skips)  # both skip at least 40% of the steps
    line = []
    for prompt, seed, skipped in zip(prompts, seeds, skips):
        teacache.apply_teacache(pipe.transformer, TeaCacheConfig(
            num_inference_steps=30, coefficients=fit["coefficients"], ret_steps=3, replay_skips=skipped,
            residual_order=1))
        line += generate(pipe, [prompt], seed, recipe).images
    predicted = metrics.psnr(uncached, line, device="cpu")
    assert all(predicted > reuse + 3)  # dB, image by image


# --- reference tokens under context parallelism (two gloo ranks) -----------------------------------------


@torch.no_grad()
def _context_parallel_run(order: str) -> tuple[list, list]:
    """TeaCache with reference tokens, attached before or after Ulysses (so its root hook sees the tokens
    sharded or whole); a replayed skip at step 2. Returns the distances and the last output."""
    from flux2lab import parallel

    t = _transformer()
    config = TeaCacheConfig(num_inference_steps=4, threshold=0.0, ret_steps=0, replay_skips=(2,))
    if order == "before":
        teacache.apply_teacache(t, config)
    if torch.distributed.is_initialized():
        parallel.enable_ulysses(t, torch.distributed.get_world_size())
    if order == "after":
        teacache.apply_teacache(t, config)
    outputs = [t(**_inputs(s, batch=1, refs=8)) for s in range(4)]
    return [e["rel_l1"] for e in teacache.teacache_log(t)], outputs[-1][0].tolist()


def test_reference_tokens_under_context_parallelism_match_one_process(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ranks.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
         f"--master-port={port}", __file__, str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    for order in ("before", "after"):
        rel, output = _context_parallel_run(order)
        assert rel[0] is None and ranks[order]["rel_l1"][0] is None  # step 0 measures nothing
        assert ranks[order]["rel_l1"][1:] == pytest.approx(rel[1:], rel=1e-5)
        np.testing.assert_allclose(ranks[order]["output"], output, atol=1e-5)


if __name__ == "__main__":  # one rank of the test above, under torchrun
    import sys

    torch.distributed.init_process_group("gloo")
    try:
        result = {}
        for order in ("before", "after"):
            rel, output = _context_parallel_run(order)
            result[order] = {"rel_l1": rel, "output": output}
        if torch.distributed.get_rank() == 0:
            Path(sys.argv[1]).write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()
