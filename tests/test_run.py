"""The runner: one process or two (Ulysses under torchrun, gloo on CPU) give the same images and the same
TeaCache decisions; CUDA-graph plumbing composes with TeaCache; bad configs, dead ranks and a stuck teardown end
the job; captured graphs are released before the process group is destroyed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from flux2lab import parallel, run
from flux2lab.common.errors import FeatureNotAvailable, Flux2LabError
from flux2lab.hooks import cudagraphs, teacache
from flux2lab.pipeline.core import apply, generate
from flux2lab.pipeline.frozen import freeze
from flux2lab.pipeline.models import load_pipeline
from flux2lab.pipeline.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red fox", "a blue bird"]
STEPS, RET_STEPS = 6, 2
LINEAR = (1.0, 0.0)  # rescaled distance = rel_l1, so thresholds can be read off measured distances


def _config(tmp_path: Path, recipe: Recipe, name: str = "frozen.json") -> Path:
    return freeze(recipe, "tiny").save(tmp_path / name)


def _prompts(tmp_path: Path, prompts=PROMPTS) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    return path


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / run.RECORDS).read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, args: list[str], device: str = "cpu", **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", "-m", "flux2lab.run", "--device", device, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def _one_rank_and_two(tmp_path: Path, recipe: Recipe) -> tuple[Path, Path]:
    """The same frozen recipe and prompts run on one process and on two gloo ranks: their output folders."""
    config, prompts = _config(tmp_path, recipe), _prompts(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert run.main(["--config", str(config), "--prompts", str(prompts), "--out", str(one), "--device", "cpu"]) == 0
    proc = _torchrun(2, ["--config", str(config), "--prompts", str(prompts), "--out", str(two), "--pg-timeout", "60"])
    out, _ = proc.communicate(timeout=110)
    assert proc.returncode == 0, out[-4000:]
    return one, two


def _modulated_inputs(pipe, prompt: str, seed: int) -> list[torch.Tensor]:
    """Block 0's modulated input at every step of an uncached run (what TeaCache measures)."""
    t = pipe.transformer
    mods, seen = {}, []
    hooks = [
        t.double_stream_modulation_img.register_forward_hook(lambda m, i, o: mods.__setitem__("img", o)),
        t.x_embedder.register_forward_hook(
            lambda m, i, o: seen.append(teacache.modulated_input(t.transformer_blocks[0].norm1, o, mods["img"]))),
    ]
    try:
        generate(pipe, [prompt], seed, Recipe(steps=STEPS))
    finally:
        for h in hooks:
            h.remove()
    return seen


def _rel(cur: torch.Tensor, prev: torch.Tensor) -> float:
    return float((cur - prev).abs().sum() / prev.abs().sum())


def test_two_ranks_match_one_rank_with_teacache_where_shard_decisions_would_disagree(tmp_path, tiny_pipe):
    # Build the disagreement: at the first step the distance decides (step RET_STEPS; every earlier step
    # computed, so the trajectory is the same whatever was decided), each rank's half of the tokens has its own
    # distance. A threshold between the global distance and the larger half makes the global rule skip while
    # one rank alone would compute -- rank-local decisions would deadlock the next all-to-all.
    m = _modulated_inputs(tiny_pipe, PROMPTS[0], seed=0)
    step = RET_STEPS
    glob = _rel(m[step], m[step - 1])
    halves = [_rel(c, p) for c, p in zip(m[step].chunk(2, dim=1), m[step - 1].chunk(2, dim=1))]
    lo, hi = sorted(halves)
    threshold = (glob + hi) / 2
    assert lo < threshold <= hi and glob < threshold  # rank-local rules disagree; the global one skips
    assert hi - lo > 1e-3  # far beyond float noise

    recipe = Recipe(steps=STEPS).replace(
        cache={"method": "teacache", "coefficients": LINEAR, "threshold": threshold, "ret_steps": RET_STEPS})
    one, two = _one_rank_and_two(tmp_path, recipe)
    single, double = _records(one), _records(two)
    assert [r["id"] for r in single] == [r["id"] for r in double]
    assert step in single[0]["skipped_steps"]  # the constructed step was really skipped
    for a, b in zip(single, double):
        assert b["ranks"] == 2 and a["ranks"] == 1
        assert b["skipped_steps_by_rank"] == [a["skipped_steps"], a["skipped_steps"]]
        assert b["skipped_steps"] == a["skipped_steps"]
        assert [e["computed"] for e in b["teacache"]] == [e["computed"] for e in a["teacache"]]
        for ea, eb in zip(a["teacache"], b["teacache"]):
            if ea["rel_l1"] is not None:
                assert eb["rel_l1"] == pytest.approx(ea["rel_l1"], rel=1e-4)
        assert b["config_sha256"] == a["config_sha256"] and b["seed"] == a["seed"]
        img_a = np.asarray(Image.open(one / a["file"]), dtype=np.int16)
        img_b = np.asarray(Image.open(two / b["file"]), dtype=np.int16)
        assert img_a.shape == img_b.shape and np.abs(img_a - img_b).max() <= 1  # equal up to float rounding
    # The global distance the ranks agreed on is the whole-sequence one, not either half's.
    assert double[0]["teacache"][step]["rel_l1"] == pytest.approx(glob, rel=1e-3)
    summary = json.loads((two / run.SUMMARY).read_text())
    assert summary["ranks"] == 2 and summary["recipe"]["ulysses_degree"] == 2 and summary["images_made"] == 2
    for a, b in zip(single, double):  # the block stack each step computed, per rank: the 1-rank run's
        assert a["cache_method"] == b["cache_method"] == "teacache"
        assert b["step_fractions_by_rank"] == [a["step_fractions"]] * 2 and b["computed_fraction"] < 1


# Settings that cache on tiny's random weights; both decide from a schedule alone, never from a rank's tokens.
SCHEDULED = {
    "taylorseer": {"cache_interval": 2, "disable_cache_before_step": 2},
    "magcache": {"mag_ratios": [1.0] * STEPS, "threshold": 0.5},
}


@pytest.mark.parametrize("method", sorted(SCHEDULED))
def test_two_ranks_take_the_one_rank_decisions_of_a_scheduled_cache(tmp_path, method):
    recipe = Recipe(steps=STEPS).replace(cache={"method": method, **SCHEDULED[method]})
    one, two = _one_rank_and_two(tmp_path, recipe)
    single, double = _records(one), _records(two)
    assert [r["id"] for r in single] == [r["id"] for r in double]
    for a, b in zip(single, double):
        assert a["cache_method"] == b["cache_method"] == method
        assert b["step_fractions_by_rank"] == [a["step_fractions"]] * 2  # every rank decided as one rank did
        assert b["step_fractions"] == a["step_fractions"] and len(a["step_fractions"]) == STEPS
        assert a["computed_fraction"] == pytest.approx(b["computed_fraction"]) and a["computed_fraction"] < 0.9
        assert min(a["step_fractions"]) < 1  # some steps really reused the cache
        img_a = np.asarray(Image.open(one / a["file"]), dtype=np.int16)
        img_b = np.asarray(Image.open(two / b["file"]), dtype=np.int16)
        assert img_a.shape == img_b.shape and np.abs(img_a - img_b).max() <= 1  # equal up to float rounding
    summary = json.loads((two / run.SUMMARY).read_text())
    assert summary["cache_method"] == method and summary["cache_decisions_identical_on_all_ranks"]
    assert summary["computed_fraction"] == pytest.approx(sum(r["computed_fraction"] for r in double) / 2)


@pytest.mark.parametrize("method", ["first_block", "seacache"])
def test_a_cache_deciding_from_each_ranks_tokens_is_refused_on_many_ranks_before_model_work(
        tmp_path, monkeypatch, capsys, method):
    config = _config(tmp_path, Recipe(steps=STEPS).replace(cache={"method": method}))
    monkeypatch.setattr(parallel, "init", lambda device, timeout: parallel.DistEnv(0, 2, 0, torch.device("cpu")))
    monkeypatch.setattr("flux2lab.pipeline.models.load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        run.run_main(run.main, ["--config", str(config), "--prompts", str(_prompts(tmp_path)), "--out",
                                str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "cannot run on 2 processes" in err and f"'{method}' cannot run under context parallelism" in err
    assert not (tmp_path / "out" / run.RECORDS).exists()


def test_killing_one_rank_ends_the_job_nonzero_within_60s(tmp_path):
    config = _config(tmp_path, Recipe(steps=50))
    prompts = _prompts(tmp_path, [f"prompt {i}" for i in range(40)])
    out = tmp_path / "out"
    proc = _torchrun(2, ["--config", str(config), "--prompts", str(prompts), "--out", str(out), "--pg-timeout", "20"])
    try:
        deadline = time.monotonic() + 90
        while not (out / run.RECORDS).is_file():  # both ranks are generating
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.2)
        workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        ranks = {}
        for pid in workers:
            env = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
            ranks[int(env[b"RANK"])] = pid
        start = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        rc = proc.wait(timeout=60)
        assert rc != 0 and time.monotonic() - start < 60
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_tampered_config_is_refused_before_any_model_work(tmp_path, capsys):
    config = _config(tmp_path, Recipe(steps=2))
    data = json.loads(config.read_text())
    data["recipe"]["steps"] = 3
    config.write_text(json.dumps(data))
    with pytest.raises(SystemExit) as e:
        run.run_main(run.main, ["--config", str(config), "--prompts", str(_prompts(tmp_path)), "--out",
                                str(tmp_path / "out"), "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "modified after it was frozen" in err and "re-freeze" in err
    assert not (tmp_path / "out").exists()


def test_resume_skips_finished_images_and_refuses_another_configs_folder(tmp_path):
    config, prompts, out = _config(tmp_path, Recipe(steps=2)), _prompts(tmp_path), tmp_path / "out"
    args = ["--prompts", str(prompts), "--out", str(out), "--device", "cpu"]
    assert run.main(["--config", str(config), *args]) == 0
    first = _records(out)
    assert [r["file"] for r in first] == ["prompts-1.png", "prompts-2.png"]
    for r in first:
        assert r["seed"] in (0, 1) and len(r["step_s"]) == 2 and r["wall_s"] > 0 and r["skipped_steps"] == []
    (out / first[1]["file"]).unlink()  # as if interrupted before the second image was saved
    assert run.main(["--config", str(config), *args]) == 0
    again = _records(out)
    assert len(again) == 3 and again[2]["id"] == first[1]["id"]  # only the missing image was made again
    assert json.loads((out / run.SUMMARY).read_text())["images_made"] == 1

    other = _config(tmp_path, Recipe(steps=3), "other.json")
    with pytest.raises(Flux2LabError, match="another config"):
        run.main(["--config", str(other), *args])


def test_cuda_graph_plumbing_composes_with_teacache_and_recaptures_per_resolution(tiny_pipe):
    """CPU stand-in for the graphs: the same static buffers, chaining and aliasing as CUDA graphs, so TeaCache's
    skip path and the block hooks are checked without a GPU."""
    recipe = Recipe(steps=STEPS).replace(
        cache={"method": "teacache", "coefficients": LINEAR, "threshold": 0.15, "ret_steps": RET_STEPS})
    graphed = load_pipeline("tiny", device="cpu")
    graphs = cudagraphs.enable(graphed.transformer, _rerun_on_cpu=True)
    blocks = len(cudagraphs.repeated_blocks(graphed.transformer))
    assert blocks == 4

    computed = 0
    for size in (64, 32, 64):
        r = recipe.replace(height=size, width=size)
        want = generate(tiny_pipe, PROMPTS[:1], 3, r)
        got = generate(graphed, PROMPTS[:1], 3, r, count_blocks=False)  # replayed blocks cannot be counted
        for a, b, ra, rb in zip(want.images, got.images, want.records, got.records):
            assert ra.skipped_steps == rb.skipped_steps and ra.skipped_steps  # TeaCache skipped, identically
            assert np.array_equal(np.asarray(a), np.asarray(b))
            computed += STEPS - len(rb.skipped_steps)
    # One capture per block and resolution (64 again reuses the first); skipped steps replay nothing.
    assert graphs.captures == 2 * blocks
    assert graphs.replays == computed * blocks


# Settings that reuse the cache on tiny's random weights, for the bench ladder's combinations.
CACHING = {
    "taylorseer": {"cache_interval": 2, "disable_cache_before_step": 2},
    "magcache": {"mag_ratios": [1.0] * STEPS, "threshold": 0.5},
    "first_block": {"threshold": 5.0},
    "seacache": {"threshold": 1.0},
    "teacache": {"coefficients": LINEAR, "threshold": 0.15, "ret_steps": RET_STEPS},
}


@pytest.mark.parametrize("method", sorted(CACHING))
def test_compile_and_cuda_graph_plumbing_compose_with_each_cache_or_are_refused(tiny_pipe, monkeypatch, method):
    """The ladder's combinations on CPU: regional compile (dynamo traces the blocks as on a GPU, the eager backend
    stands in for inductor), the CPU stand-in for CUDA graphs, and both; each gives the eager images."""
    from diffusers import Flux2Transformer2DModel

    compile_blocks, compile_fn = Flux2Transformer2DModel.compile_repeated_blocks, torch.compile
    monkeypatch.setattr(Flux2Transformer2DModel, "compile_repeated_blocks",
                        lambda self, **kw: compile_blocks(self, backend="eager", **kw))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_fn(fn, **{**kw, "backend": "eager"}))
    recipe = Recipe(steps=STEPS).replace(cache={"method": method, **CACHING[method]})
    want = generate(tiny_pipe, PROMPTS[:1], 3, recipe)
    fractions = want.records[0].step_fractions
    assert min(fractions) < 1  # the cache really reused something

    # As the bench does between pipelines: compiled blocks reused from another pipeline's compilation run that
    # pipeline's block-counter hooks, not this one's (torch does not guard module hooks), and the count comes out short.
    torch._dynamo.reset()
    compiled = load_pipeline("tiny", device="cpu")
    got = generate(compiled, PROMPTS[:1], 3, recipe.replace(compile=True))  # fullgraph=False for diffusers' caches
    assert np.array_equal(np.asarray(got.images[0]), np.asarray(want.images[0]))
    assert got.records[0].step_fractions == fractions

    for compile in (False, True):
        graphed = load_pipeline("tiny", device="cpu")
        graphs = cudagraphs.enable(graphed.transformer, compile=compile, _rerun_on_cpu=True)
        if method == "taylorseer":  # it predicts inside the blocks a graph captures whole: refused, with the reason
            with pytest.raises(Flux2LabError, match="'taylorseer' cannot run with CUDA graphs"):
                Recipe(steps=STEPS, cuda_graphs=True, compile=compile).replace(cache=recipe.cache.to_dict())
            with pytest.raises(Flux2LabError, match="'taylorseer' cannot run with CUDA graphs"):
                generate(graphed, PROMPTS[:1], 3, recipe, count_blocks=False)
            continue
        got = generate(graphed, PROMPTS[:1], 3, recipe, count_blocks=False)  # replayed blocks cannot be counted
        assert np.array_equal(np.asarray(got.images[0]), np.asarray(want.images[0]))
        blocks = len(graphs.hooks)
        assert graphs.replays == round(sum(fractions) * blocks)  # the same decisions: the same blocks ran


def test_shutdown_releases_captured_graphs_before_destroying_the_process_group(monkeypatch):
    """NCCL's communicator destroy waits until every CUDA graph that captured its kernels is gone, so graphs
    still alive at `destroy_process_group` hang the job at exit. The CPU stand-in's graphs go through the same
    release path; a one-process gloo group stands in for NCCL."""
    pipe = load_pipeline("tiny", device="cpu")
    graphs = cudagraphs.enable(pipe.transformer, _rerun_on_cpu=True)
    generate(pipe, PROMPTS[:1], 0, Recipe(steps=2), count_blocks=False)
    blocks = len(cudagraphs.repeated_blocks(pipe.transformer))
    assert graphs.held == graphs.captures == blocks

    released, held_at_destroy = [], []
    real_release, real_destroy = graphs.backend.release, dist.destroy_process_group
    monkeypatch.setattr(graphs.backend, "release", lambda gs: (released.extend(gs), real_release(gs)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: (held_at_destroy.append(graphs.held), real_destroy()))
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        parallel.shutdown(timeout_s=60)
    finally:
        if dist.is_initialized():
            real_destroy()
    assert not dist.is_initialized()
    assert len(released) == blocks and held_at_destroy == [0]  # every graph went, and before the group did

    generate(pipe, PROMPTS[:1], 0, Recipe(steps=2), count_blocks=False)  # released graphs are captured again
    assert graphs.held == blocks and graphs.captures == 2 * blocks


def test_a_teardown_that_hangs_exits_nonzero_with_a_message_within_the_timeout():
    script = textwrap.dedent("""
        import threading
        import torch.distributed as dist
        from flux2lab import parallel
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
        dist.destroy_process_group = lambda: threading.Event().wait()  # a communicator that never lets go
        parallel.shutdown(timeout_s=2)
        print("shutdown returned")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=90,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == parallel.TEARDOWN_HUNG_EXIT, proc.stderr[-3000:]
    assert "did not finish within 2 s" in proc.stderr and "shutdown returned" not in proc.stdout


def test_cuda_graphs_on_cpu_and_ulysses_without_torchrun_say_what_to_do():
    pipe = load_pipeline("tiny", device="cpu")
    with pytest.raises(FeatureNotAvailable, match="needs a CUDA GPU"):
        apply(pipe, Recipe(steps=2, cuda_graphs=True))
    pipe = load_pipeline("tiny", device="cpu")
    with pytest.raises(FeatureNotAvailable, match="torchrun --nproc-per-node 2"):
        apply(pipe, Recipe(steps=2, ulysses_degree=2))


def test_sequence_and_heads_must_divide_by_the_degree(tiny_pipe):
    parallel.check_sequence(tiny_pipe, 64, 64, 64, 2)  # 256 image and 64 text tokens
    with pytest.raises(Flux2LabError, match="text token count"):
        parallel.check_sequence(tiny_pipe, 64, 64, 63, 2)
    with pytest.raises(Flux2LabError, match="image token count"):
        parallel.check_sequence(tiny_pipe, 40, 40, 64, 8)  # 100 image tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile", [False, True])
def test_real_cuda_graphs_match_eager_with_teacache(compile):
    recipe = Recipe(steps=STEPS).replace(
        cache={"method": "teacache", "coefficients": LINEAR, "threshold": 0.15, "ret_steps": RET_STEPS})
    eager = load_pipeline("tiny", device="cuda", dtype=torch.float32)
    graphed = load_pipeline("tiny", device="cuda", dtype=torch.float32)
    apply(graphed, recipe.replace(cuda_graphs=True, compile=compile))
    graphs = cudagraphs.graphs_of(graphed.transformer)
    for size in (64, 32):
        r = recipe.replace(height=size, width=size)
        want = generate(eager, PROMPTS, [3, 4], r)
        got = generate(graphed, PROMPTS, [3, 4], r.replace(cuda_graphs=True, compile=compile))
        for a, b, ra, rb in zip(want.images, got.images, want.records, got.records):
            assert ra.skipped_steps == rb.skipped_steps
            diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()
            assert diff <= (2 if compile else 1)
    assert graphs.captures == 2 * len(cudagraphs.repeated_blocks(graphed.transformer))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_cuda_graphs_over_nccl_exit_cleanly(tmp_path):
    """The graphs capture Ulysses' NCCL all-to-alls; the job must still end by itself (it hung at exit once)."""
    recipe = Recipe(steps=STEPS, cuda_graphs=True).replace(
        cache={"method": "teacache", "coefficients": LINEAR, "threshold": 0.15, "ret_steps": RET_STEPS})
    config, prompts, out = _config(tmp_path, recipe), _prompts(tmp_path), tmp_path / "out"
    start = time.monotonic()
    proc = _torchrun(2, ["--config", str(config), "--prompts", str(prompts), "--out", str(out), "--warmup", "1",
                         "--pg-timeout", "60"], device="cuda")
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, log[-4000:]
    summary = json.loads((out / run.SUMMARY).read_text())
    assert summary["images_made"] == 2 and summary["cuda_graph_captures"] > 0
    assert time.monotonic() - start < 200
