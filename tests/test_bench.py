"""`python -m flux2lab.bench`: the ladder, its timing, the floor, the targets and the three outputs."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from flux2lab import bench, benchmark
from flux2lab.benchmark import (
    Attention,
    Gemm,
    Workload,
    measure_floor,
    runner,
    skip_plan,
    spread_skips,
    step_workload,
)
from flux2lab.common.errors import FeatureNotAvailable, Flux2LabError
from flux2lab.pipeline.models import build_transformer_on_meta
from flux2lab.pipeline.recipe import FLUX2_DEV_RET_STEPS, Recipe

LADDER = ["eager-bf16", "compile", "+cuda-graphs", "+fp8", "+teacache", "x2-gpus"]


@pytest.fixture
def cheap_compile(monkeypatch):
    """Dynamo traces the blocks as in a real compile, but hands them to the eager backend: inductor's C++ build
    on 2 CPU cores takes most of a minute and says nothing about the benchmark."""
    from diffusers import Flux2Transformer2DModel

    original = Flux2Transformer2DModel.compile_repeated_blocks
    monkeypatch.setattr(Flux2Transformer2DModel, "compile_repeated_blocks",
                        lambda self, **kw: original(self, backend="eager", **kw))


def run_bench(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_:
        from flux2lab.cli import run_main

        run_main(bench.main, args)
    return exit_.value.code


def test_tiny_ladder_runs_what_cpu_can_and_says_why_not_the_rest(tmp_path, no_network, cheap_compile):
    out = tmp_path / "bench"
    code = run_bench(["--model", "tiny", "--steps", "4", "--reps", "2", "--warmup-steps", "1", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    rungs = {r["name"]: r for r in result["rungs"]}
    assert [r["name"] for r in result["rungs"]] == LADDER, "a rung was dropped or reordered"

    for name in ("eager-bf16", "compile"):
        r = rungs[name]
        assert r["status"] == "ok", r.get("reason")
        assert r["step_s"]["n"] == 2 * 3, "2 timed images of 4 steps give 3 step intervals each"
        assert 0 < r["step_s"]["min"] <= r["step_s"]["median"] <= r["step_s"]["max"]
        assert len(r["image_values_s"]) == 2 and r["image_s"]["median"] > 0
        assert not r["image_extrapolated"] and r["floor_ratio"] > 0
    assert rungs["eager-bf16"]["speedup"] == 1.0 and rungs["eager-bf16"]["recipe"]["compile"] is False
    assert rungs["compile"]["recipe"]["compile"] is True
    assert rungs["compile"]["speedup"] == pytest.approx(
        rungs["eager-bf16"]["image_s"]["median"] / rungs["compile"]["image_s"]["median"])

    # What a CPU cannot do is reported, with the reason, never silently dropped.
    assert rungs["+cuda-graphs"]["status"] == "skipped" and "CUDA" in rungs["+cuda-graphs"]["reason"]
    assert rungs["+fp8"]["status"] == "skipped" and "sm89" in rungs["+fp8"]["reason"]
    multi = rungs["x2-gpus"]
    assert multi["status"] == "skipped" and "torchrun --standalone --nproc-per-node=2" in multi["reason"]
    assert (out / "x2-gpus" / "recipe.json").is_file(), "the printed torchrun command needs its recipe file"
    tc = rungs["+teacache"]
    if tc["status"] == "ok":  # once flux2lab.hooks.teacache can replay a schedule
        assert tc["cache_schedule"].startswith("replayed schedule: 1/4") and tc["skipped_steps"] == [2]
        assert tc["without"] == ["+cuda-graphs", "+fp8"] and tc["recipe"]["compile"] is True
        assert tc.get("reused_pipeline"), "a TeaCache-only change must not reload and recompile"
    else:
        assert tc["status"] == "skipped" and tc["reason"]

    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["diffusers"] and env["flux2lab"]
    assert result["command"].startswith("python -m flux2lab.bench --model tiny")
    assert result["floor"]["bf16"]["step_s"] > 0 and result["floor"]["fp8"]["step_s"] > 0

    md = (out / "bench.md").read_text()
    assert "| eager-bf16 |" in md and "**skipped**" in md and "CUDA graphs need a CUDA GPU" in md
    assert "## Floor" in md and "## Targets" in md
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_timed_steps_are_extrapolated_to_the_full_schedule(tmp_path, capsys):
    out = tmp_path / "b"
    code = run_bench(["--model", "tiny", "--ladder", "eager-bf16,+cuda-graphs,x2-gpus,x4-gpus", "--gpus", "2,4",
                      "--steps", "6", "--timed-steps", "3", "--reps", "1", "--warmup", "0", "--no-floor",
                      "--out", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "eager-bf16:" in stdout and "skipped" in stdout
    result = json.loads((out / "bench.json").read_text())
    eager = result["rungs"][0]
    # 3 timed steps, extrapolated to 6: measured wall + 3 x median step.
    assert eager["timed_steps"] == 3 and eager["steps"] == 6 and eager["image_extrapolated"]
    assert eager["image_values_s"][0] > eager["step_s"]["median"] * 3
    # compile was not selected but still sits below +cuda-graphs in the ladder
    assert [r["name"] for r in result["rungs"]] == ["eager-bf16", "+cuda-graphs", "x2-gpus", "x4-gpus"]
    for n in (2, 4):
        multi = result["rungs"][1 + n // 2]
        assert multi["status"] == "skipped" and f"--nproc-per-node={n}" in multi["reason"]
        assert json.loads((out / f"x{n}-gpus" / "recipe.json").read_text())["ulysses_degree"] == n
    assert result["floor"] == {"skipped": "--no-floor"} and "Floor not measured" in (out / "bench.md").read_text()



@pytest.mark.parametrize("args, message", [
    (["--ladder", "eager-bf16,turbo"], "unknown rung(s) turbo; give 'default' or a comma-separated list of: eager"),
    (["--timed-steps", "1"], "--timed-steps 1: give an integer >= 2"),
    (["--steps", "4", "--timed-steps", "5"], "--timed-steps 5 is more than the 4 steps"),
    (["--teacache-schedule", "lots"], "--teacache-schedule 'lots': give auto, real, K/N"),
    (["--model", "full-random", "--device", "cpu"], "needs a CUDA GPU"),
    (["--whole-pipeline"], "--whole-pipeline adds the full-size text encoder and VAE to --model full-random"),
])
def test_user_errors_name_the_flag(tmp_path, capsys, args, message):
    assert run_bench(["--model", "tiny", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "bench.json").exists()


def test_multi_gpu_recipe_runs_the_bench_under_torchrun(tmp_path, monkeypatch):
    """The launch and the merge, with gloo on CPU standing in for NCCL (Ulysses and TeaCache on 2 ranks)."""
    monkeypatch.setattr(runner, "visible_gpus", lambda device: 2)
    recipe = Recipe(steps=4, ulysses_degree=2).replace(cache={"method": "teacache", "ret_steps": 1})
    cfg = benchmark.BenchConfig(model="tiny", recipe=recipe.save(tmp_path / "x2.json"), reps=1, warmup=0,
                                floor=False, out=tmp_path / "out")
    result = benchmark.Bench(cfg, say=lambda m: None).run()
    [multi] = result["rungs"]
    assert multi["status"] == "ok", multi.get("reason")
    assert multi["launched"].startswith("torchrun --standalone --nproc-per-node=2 -m flux2lab.bench --model tiny")
    assert multi["recipe"] == recipe.to_dict()
    assert multi["cache_schedule"] == "replayed schedule: 1/4 (NVIDIA average 16/50, scaled)"
    assert multi["skipped_steps"] == [2]
    assert multi["step_s"]["n"] == 3 and multi["image_s"]["median"] > 0
    assert (tmp_path / "out" / "x2" / "bench.json").is_file()


def test_a_rung_that_cannot_run_drops_out_of_the_rungs_above(tmp_path, monkeypatch):
    real_apply = runner.apply

    def no_compile(pipe, recipe):
        if recipe.compile:
            raise FeatureNotAvailable("torch.compile is not available here")
        return real_apply(pipe, recipe)

    monkeypatch.setattr(runner, "apply", no_compile)
    cfg = benchmark.BenchConfig(model="tiny", device="cpu", ladder="eager-bf16,compile,+fp8", steps=3, reps=1,
                                warmup=0, floor=False, out=tmp_path)
    result = benchmark.Bench(cfg, say=lambda m: None).run()
    rungs = {r["name"]: r for r in result["rungs"]}
    assert rungs["compile"] == {**rungs["compile"], "status": "skipped",
                                "reason": "torch.compile is not available here"}
    assert rungs["+fp8"]["without"] == ["compile", "+cuda-graphs"]  # the second: not selected, no CUDA here
    assert rungs["+fp8"]["status"] == "skipped"
    assert [t["met"] for t in result["targets"]] == [None] * 7, "nothing comparable was measured"


def test_full_size_step_workload_matches_the_published_count():
    """4096 image + 512 text tokens: 282.6 TFLOP a step, read off the model's own forward on the meta device."""
    config = dict(build_transformer_on_meta().config)
    work = step_workload(config, 4096, 512)
    total = (work.gemm_flops + work.attention_flops) / 1e12
    assert total == pytest.approx(282.6, abs=0.05)
    assert work.attentions == [Attention(1, 48, 4608, 4608, 128, 56)]  # 8 double + 48 single blocks
    assert Gemm(4608, 6144, 55296, 48, fp8=True) in work.gemms  # fused QKV + MLP-in of each single block
    # NVIDIA's layer rule keeps the text stream's attention projections and the embedders in BF16
    assert Gemm(512, 6144, 6144, 32, fp8=False) in work.gemms
    assert Gemm(4096, 128, 6144, 1, fp8=False) in work.gemms
    kept = sum(g.flops for g in work.gemms if not g.fp8) / 1e12
    assert 1 < kept < 5


def test_whole_pipeline_parts_are_flux2_dev_sized():
    text_encoder, vae = benchmark.full_size_text_encoder_and_vae()
    assert sum(p.numel() for p in text_encoder.parameters()) == pytest.approx(23.6e9, rel=0.02)  # Mistral Small 3.1
    text = text_encoder.config.text_config
    # the pipeline stacks 3 hidden states (layers 10, 20, 30) into the transformer's joint_attention_dim
    assert 3 * text.hidden_size == build_transformer_on_meta().config.joint_attention_dim
    assert text.num_hidden_layers >= 30
    assert vae.config.latent_channels == 32 and len(vae.config.block_out_channels) == 4  # 8x down, 2x2 patches


def test_floor_times_every_piece_and_sums_them():
    work = Workload(16, 8, [Gemm(24, 32, 48, 2), Gemm(1, 32, 16, 3, fp8=False)], [Attention(1, 2, 24, 24, 16, 4)])
    floor = measure_floor(work, torch.device("cpu"), torch.float32)
    assert len(floor["pieces"]) == 3
    kept = floor["pieces"][1]
    assert kept["fp8_s"] == kept["high_s"], "a layer the rule keeps in high precision has no FP8 time"
    for key in ("bf16", "fp8"):
        f = floor[key]
        assert f["step_s"] == pytest.approx(f["gemm_s"] + f["attention_s"])
        assert f["gemm_s"] == pytest.approx(sum(p[f"{'high' if key == 'bf16' else 'fp8'}_s"]
                                                for p in floor["pieces"] if p["kind"] == "gemm"))
    assert floor["tflop_per_step"] == pytest.approx((work.gemm_flops + work.attention_flops) / 1e12)


TEACACHE_50 = Recipe(steps=50).replace(cache={"method": "teacache"})


def test_teacache_plans():
    plan = skip_plan("auto", False, TEACACHE_50)
    assert plan.describe == "replayed schedule: 16/50 (NVIDIA average)"
    steps = plan.skip_steps
    assert len(steps) == len(set(steps)) == 16 and list(steps) == sorted(steps)
    assert min(steps) >= FLUX2_DEV_RET_STEPS and max(steps) <= 48, "the first ret_steps and the last step compute"
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    assert max(gaps) - min(gaps) <= 1, "skips spread evenly"
    assert skip_plan("auto", True, TEACACHE_50).skip_steps is None, "real weights decide for themselves"
    assert skip_plan("real", False, TEACACHE_50).describe == "real TeaCache decisions"
    assert len(skip_plan("8/50", False, TEACACHE_50.replace(steps=25, cache={"ret_steps": 5})).skip_steps) == 4
    assert skip_plan("0", False, TEACACHE_50).skip_steps == ()
    assert benchmark.scaled_ret_steps(50) == FLUX2_DEV_RET_STEPS and benchmark.scaled_ret_steps(4) == 1
    with pytest.raises(Flux2LabError, match="only 39 can be skipped"):
        spread_skips(50, 40, 10)
    with pytest.raises(Flux2LabError, match="0 <= K <= N"):
        skip_plan("60/50", False, TEACACHE_50)


def test_teacache_plan_from_a_calibration_fit_and_trace(tmp_path):
    """TeaCache's own rule on recorded distances, for the prompt with the median skip count."""
    fit, trace = tmp_path / "fit.json", tmp_path / "samples.csv"
    fit.write_text(json.dumps({"coefficients": [1.0, 0.0]}))  # rescaled distance = rel_l1
    rows = ["prompt_id,kind,seed,step,timestep,x,y"]
    for prompt, x in (("calm", 0.01), ("busy", 0.2), ("mid", 0.03)):
        rows += [f"{prompt},t2i,0,{t},{1000 - 100 * t},{x},0.1" for t in range(1, 10)]
    trace.write_text("\n".join(rows) + "\n")
    recipe = Recipe(steps=10).replace(cache={"method": "teacache", "ret_steps": 2, "threshold": 0.05})
    plan = skip_plan(f"{fit}:{trace}", False, recipe)
    # 'mid' (0.03 a step, threshold 0.05): from step 2 on, every other step is skipped
    assert plan.skip_steps == (2, 4, 6, 8)
    assert "prompt 'mid', the median of 3: 0-7 skipped" in plan.describe
    with pytest.raises(Flux2LabError, match="needs a trace of steps 1..19"):
        skip_plan(f"{fit}:{trace}", False, recipe.replace(steps=20))
    with pytest.raises(Flux2LabError, match="does not exist"):
        skip_plan(f"{tmp_path / 'nofit.json'}:{trace}", False, recipe)


# --- the cache rung: any method, a frozen point's compute pattern ---------------------------------------------


def _frozen(tmp_path, cache: dict, fraction: float | None = None, steps: int = 6):
    from flux2lab.pipeline.frozen import freeze

    metrics = {"metrics": {"computed_fraction": fraction}} if fraction is not None else {}
    return freeze(Recipe(steps=steps).replace(cache=cache), "tiny", metrics).save(tmp_path / "frozen.json")


@pytest.mark.parametrize("method", ["first_block", "seacache"])
def test_cache_rung_replays_a_threshold_methods_frozen_fraction_on_random_weights(tmp_path, cheap_compile, method):
    # threshold 0: left alone, both would compute every step; the replay forces the frozen point's pattern.
    frozen = _frozen(tmp_path, {"method": method, "threshold": 0.0}, fraction=0.66)
    out = tmp_path / "bench"
    code = run_bench(["--model", "tiny", "--steps", "6", "--reps", "1", "--warmup", "1", "--no-floor",
                      "--ladder", "eager-bf16,compile,+cache,x2-gpus", "--cache", str(frozen), "--out", str(out)])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    rungs = {r["name"]: r for r in result["rungs"]}
    cache = rungs["+cache"]
    assert cache["status"] == "ok", cache.get("reason")
    assert cache["cache_method"] == method and cache["cache_settings"]["threshold"] == 0.0
    assert cache["recipe"]["cache"]["method"] == method and cache["recipe"]["compile"] is True
    assert cache["cache_schedule"].startswith("replayed schedule: 2/6 (the frozen point computed 66.0% of the block")
    skipped = cache["skipped_steps"]
    assert skipped == [2, 4], skipped  # spread over steps 1..4: step 0 and the last always compute
    assert 0 < cache["computed_fraction"] < 1 and len(cache["step_fractions"]) == 6
    assert cache["computed_fraction_source"] == "block counter"
    assert "reused_pipeline" not in cache  # compiled with fullgraph=True below: loaded afresh for the cache
    # FirstBlockCache and SeaCache decide from each rank's tokens: the N-GPU rung is refused before model work.
    multi = rungs["x2-gpus"]
    assert multi["status"] == "skipped" and "refused before any model work" in multi["reason"]
    assert "cannot run under context parallelism" in multi["reason"]
    point = result["settings"]["cache_point"]
    assert point["method"] == method and point["recorded_fraction"] == 0.66 and point["recorded_on"] == "tiny"
    target = next(t for t in result["targets"] if "frozen cache point" in t["target"])
    assert target["met"] is None and "ran without" in target["detail"]  # bf16 on CPU: not the target's stack
    md = (out / "bench.md").read_text()
    assert f"- Cache point: {method} from frozen config" in md and "block stack computed" in md
    assert f"step cache {method} (" in md


def test_cache_rung_runs_a_scheduled_method_as_it_is_and_marks_own_decisions_on_random_weights():
    recipe = Recipe(steps=6)
    for cache, describe in (({"method": "taylorseer", "cache_interval": 2}, "TaylorSeer's own schedule"),
                            ({"method": "magcache", "mag_ratios": [1.0] * 6}, "MagCache's own schedule")):
        plan = skip_plan("auto", False, recipe.replace(cache=cache))
        assert plan.skip_steps is None and plan.describe.startswith(describe) and not plan.meaningless
    plan = skip_plan("auto", False, recipe.replace(cache={"method": "seacache"}))
    assert plan.skip_steps is None and plan.meaningless and "mean nothing here" in plan.describe
    assert skip_plan("auto", True, recipe.replace(cache={"method": "seacache"})).describe == "real SeaCache decisions"
    plan = skip_plan("2/6", False, recipe.replace(cache={"method": "first_block"}))
    assert plan.skip_steps == (2, 4) and plan.spec == "2/6"
    with pytest.raises(Flux2LabError, match="replays TeaCache's rule, but the cache rung runs seacache"):
        skip_plan("fit.json:samples.csv", False, recipe.replace(cache={"method": "seacache"}))


def test_a_cache_that_refuses_cuda_graphs_runs_without_them_and_the_reason_is_named():
    from flux2lab.benchmark.ladder import Rung, rung_recipe
    from flux2lab.pipeline.recipe import RecipeError

    below = Recipe(steps=6, compile=True, cuda_graphs=True)
    recipe, left_out = rung_recipe(below, Rung("+cache", {"cache": {"method": "taylorseer"}}, "..."))
    assert recipe.cache.method == "taylorseer" and recipe.compile and not recipe.cuda_graphs
    assert left_out[0][0] == "+cuda-graphs" and "'taylorseer' cannot run with CUDA graphs" in left_out[0][1]
    recipe, left_out = rung_recipe(below, Rung("+cache", {"cache": {"method": "seacache"}}, "..."))
    assert recipe.cuda_graphs and not left_out  # SeaCache decides outside the captured blocks
    with pytest.raises(RecipeError, match="context parallelism"):
        rung_recipe(recipe, Rung("x2-gpus", {"ulysses_degree": 2}, "..."))


@pytest.mark.parametrize("method, settings", [("seacache", {"threshold": 0.0}), ("first_block", {"threshold": 0.0}),
                                              ("teacache", {"ret_steps": 1}), ("magcache", {"mag_ratios": [1.0] * 6})])
def test_under_cuda_graphs_the_cache_rung_counts_the_blocks_replayed(method, settings):
    """The CPU stand-in for CUDA graphs: a replayed block runs no Python, so the blocks replayed are counted."""
    from flux2lab.hooks import cudagraphs
    from flux2lab.pipeline.core import apply
    from flux2lab.pipeline.models import load_pipeline

    pipe = load_pipeline("tiny", device="cpu")
    graphs = cudagraphs.enable(pipe.transformer, _rerun_on_cpu=True)
    recipe = Recipe(steps=6).replace(cache={"method": method, **settings})
    plan = skip_plan("2/6", False, recipe)
    apply(pipe, recipe)
    runner.replay_skip_plan(pipe, recipe, plan)
    cfg = benchmark.BenchConfig(model="tiny", reps=2, warmup=0)
    row = runner.time_images(pipe, recipe, cfg, torch.device("cpu"), plan)
    blocks = len(graphs.hooks)
    assert row["computed_fraction_source"].startswith("blocks replayed per step")
    if method == "magcache":  # its own schedule: with every ratio 1, up to 3 steps in a row reuse the cache
        assert row["skipped_steps"] == [1, 2, 3, 5] and plan.skip_steps is None
    else:
        assert row["skipped_steps"] == [2, 4] == list(plan.skip_steps)
    head = 1 / blocks if method == "first_block" else 0.0  # FirstBlockCache's head block runs on a skipped step
    assert row["step_fractions"] == [head if i in row["skipped_steps"] else 1.0 for i in range(6)]
    assert row["computed_fraction"] == pytest.approx(sum(row["step_fractions"]) / 6)
    computed = [i for i in range(1, 6) if i not in row["skipped_steps"]]  # step intervals 1..5 that computed
    assert row["skipped_identical_in_all_reps"] and row["computed_step_s"]["n"] == 2 * len(computed)


@pytest.mark.parametrize("spec, message", [
    ("fp8", "--cache fp8: it has no step cache"),
    ("taylorseer=x", "preset part 'taylorseer=x'"),
])
def test_cache_flag_errors_name_the_flag(tmp_path, capsys, spec, message):
    assert run_bench(["--model", "tiny", "--out", str(tmp_path), "--cache", spec]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "bench.json").exists()


def _gpu_like_result() -> dict:
    """The issue's H200 numbers, as bench.json would hold them."""

    def rung(name, step, precision="bf16", teacache=None, gpus=1, **extra):
        image = step * 50 * (34 / 50 if teacache else 1) / gpus ** 0.9
        return {"name": name, "adds": "...", "status": "ok", "steps": 50, "skipped_steps": list(range(16)) if teacache
                else [], "recipe": {"transformer_precision": precision, "ulysses_degree": gpus},
                "step_s": benchmark.spread([step] * 3), "image_s": benchmark.spread([image] * 3),
                "computed_step_s": benchmark.spread([step] * 3) if teacache else None,
                "cache_schedule": teacache, **extra}

    floor_fp8 = {"step_s": 0.21, "gemm_s": 0.17, "attention_s": 0.04, "gemm_tflops": 1490.0, "kept_high_tflop": 1.35,
                 "gemms_not_in_fp8": []}
    return {
        "command": "python -m flux2lab.bench --model full-random --out x", "coverage": "transformer only: ...",
        "environment": {"cuda": True, "device_name": "NVIDIA H200", "compute_capability": "9.0", "memory_gib": 139.8,
                        "driver": "570.1", "cuda_runtime": "13.0", "torch": "2.14", "diffusers": "0.42",
                        "transformers": "5", "torchao": "0.18", "flux2lab": "0.1.0", "git_commit": "abc"},
        "model": {"source": "full-random", "kind": "full-random", "revision": None},
        "height": 1024, "width": 1024, "steps": 50, "timing": "CUDA events",
        "settings": {"reps": 3, "warmup": 1, "warmup_steps": 3, "timed_steps": 50,
                     "cache_schedule": "replayed schedule: 16/50 (NVIDIA average)"},
        "floor": {"dtype": "bfloat16", "tflop_per_step": 282.6, "gemm_tflop": 253.4, "attention_tflop": 29.2,
                  "image_tokens": 4096, "text_tokens": 512, "note": "arithmetic only",
                  "bf16": {"step_s": 0.36, "gemm_s": 0.32, "attention_s": 0.04, "gemm_tflops": 790.0},
                  "fp8": floor_fp8},
        "rungs": [
            rung("eager-bf16", 0.538), rung("compile", 0.442), rung("+cuda-graphs", 0.43),
            rung("+fp8", 0.29, "fp8"), rung("+teacache", 0.29, "fp8", "replayed schedule: 16/50 (NVIDIA average)"),
            {"name": "x2-gpus", "adds": "...", "status": "skipped", "reason": "needs 2 GPUs, 1 visible here"},
        ],
        "targets": [], "wall_s": 500.0,
    }


def test_cache_point_target_from_gpu_numbers():
    result = _gpu_like_result()
    cache = dict(result["rungs"][4], name="+cache", cache_method="seacache", computed_fraction=0.24,
                 recipe={"transformer_precision": "fp8", "ulysses_degree": 1, "compile": True},
                 image_s=benchmark.spread([0.538 * 50 / 4.2] * 3))
    result["rungs"][4] = cache
    result["settings"]["cache_point"] = {"method": "seacache", "source": "frozen config best.json (abc)"}
    benchmark.summarize(result)
    targets = {t["target"]: t for t in result["targets"]}
    point = targets["+fp8 + compile + the frozen cache point (+cache) >= 4.0x eager-bf16"]
    assert point["met"] is True and point["value"] == pytest.approx(4.2)
    assert "seacache from frozen config best.json (abc), 24% of the block stack computed" in point["detail"]
    assert targets["full single-GPU stack (+cache) >= 3.0x eager-bf16"]["met"] is True
    del result["settings"]["cache_point"]
    benchmark.summarize(result)
    assert next(t for t in result["targets"] if "frozen cache point" in t["target"])["detail"].startswith(
        "not measured: give --cache")


def test_targets_markdown_and_chart_from_gpu_numbers(tmp_path):
    result = _gpu_like_result()
    benchmark.summarize(result)
    targets = {t["target"]: t for t in result["targets"]}
    assert all(t["applies_here"] for t in targets.values())
    assert targets["compile >= 1.2x eager-bf16"]["met"] is True  # 0.538 / 0.442 = 1.22
    assert targets["+fp8 >= 1.8x eager-bf16"]["met"] is True  # 1.86
    assert targets["full single-GPU stack (+teacache) >= 3.0x eager-bf16"]["value"] == pytest.approx(
        0.538 / (0.29 * 34 / 50))
    fp8_floor = targets["+fp8 compiled step <= 1.3x the floor"]
    assert fp8_floor["met"] is False and fp8_floor["value"] == pytest.approx(0.29 / 0.21)
    assert targets["x2-gpus >= 1.85x the 1-GPU full stack"]["met"] is None
    rungs = {r["name"]: r for r in result["rungs"]}
    assert rungs["compile"]["floor_ratio"] == pytest.approx(0.442 / 0.36)
    assert rungs["+fp8"]["speedup_vs_previous"] == pytest.approx(0.43 / 0.29)

    paths = benchmark.write_report(result, tmp_path)
    md = paths[1].read_text()
    assert "**NOT met** — +fp8 compiled step <= 1.3x the floor: 1.38x" in md
    assert "**met** — compile >= 1.2x eager-bf16: 1.22x" in md
    assert "replayed schedule: 16/50 (NVIDIA average); skipped 16/50" in md
    assert "| bfloat16 | 0.320 s | 0.040 s | 0.360 s | 790 TFLOP/s | 18.00 s |" in md
    assert paths[2].stat().st_size > 5000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_floor_on_the_gpu_at_full_size():
    work = step_workload(dict(build_transformer_on_meta().config), 4096, 512)
    floor = measure_floor(work, torch.device("cuda"), torch.bfloat16)
    assert 100 < floor["bf16"]["gemm_tflops"] < 2500
    assert floor["fp8"]["step_s"] < floor["bf16"]["step_s"]
