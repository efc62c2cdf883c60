"""`python -m flux2lab.search` on the tiny model: grid, resume after SIGKILL, workers, failures, freeze, bad input;
studies across cache methods (grid and TPE), and on mini, quality falling as each method computes less."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from flux2lab import search
from flux2lab import study as st
from flux2lab.common.errors import Flux2LabError

ROOT = Path(__file__).resolve().parents[1]
# TeaCache alone, 3 x 2 (the flat flags are TeaCache's; its residual extrapolation left out)
GRID = ["--methods", "teacache", "--threshold", "0.05,0.2,0.5", "--ret-steps", "0,1", "--space",
        "teacache.residual_order=0"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def inputs(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    fit = tmp_path / "fit.json"
    fit.write_text(json.dumps({"coefficients": [1.0, 0.0], "diagnostics": {"r2": 1.0}}))
    return tmp_path, prompts, fit


def cli(tmp: Path, name: str, *extra: str, grid=GRID) -> list[str]:
    prompts, fit = tmp / "prompts.txt", tmp / "fit.json"
    return ["--study", name, "--model", "tiny", "--experiments", str(tmp / "exp"), "--prompts", str(prompts),
            "--calibration", str(fit),
            "--steps", "6", "--height", "32", "--width", "32", "--skip-missing", *grid, *extra]


def load(tmp: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{(tmp / 'exp' / 'studies.db').resolve()}")


def trial_states(db: Path, n_params: int = 1) -> list[str]:
    """Read-only look at a storage another process is writing (opening it with Optuna could race its set-up).
    A RUNNING trial that has all `n_params` of its parameters (so is inside the objective) reads
    "RUNNING with params"; one killed between two `suggest_*` calls would hold only some of them (a grid trial
    has one, the index of its point)."""
    import sqlite3

    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
            rows = con.execute("SELECT state, (SELECT COUNT(*) FROM trial_params p WHERE p.trial_id = t.trial_id) "
                               "FROM trials t")
            return [f"{state} with params" if state == "RUNNING" and n >= n_params else state for state, n in rows]
    except sqlite3.OperationalError:  # tables not created yet
        return []


def complete_per_point(study: optuna.Study) -> Counter:
    """Complete trials per point (method and settings, as the objective recorded it)."""
    return Counter(tuple(sorted(t.user_attrs["point"].items())) for t in study.get_trials(states=(TrialState.COMPLETE,)))


def teacache_point(threshold, ret_steps) -> tuple:
    return (("method", "teacache"), ("residual_order", 0), ("ret_steps", ret_steps), ("threshold", threshold))


def test_grid_runs_each_point_once_prints_pareto_and_freezes_the_fastest_within_budget(inputs, capsys):
    from flux2lab.pipeline.frozen import load_frozen
    from flux2lab.pipeline.recipe import Recipe

    tmp, _, _ = inputs
    search.main(cli(tmp, "g"))
    out = capsys.readouterr().out
    study = load(tmp, "g")
    assert len(study.trials) == 6
    assert complete_per_point(study) == Counter({teacache_point(th, r): 1 for th in (0.05, 0.2, 0.5) for r in (0, 1)})
    t0 = study.trials[0]
    assert {"time_per_image", "computed_fraction", "metrics", "recipe", "worker", "point"} <= set(t0.user_attrs)
    assert {"psnr", "ssim"} <= set(t0.user_attrs["metrics"]) and "lpips" not in t0.user_attrs["metrics"]
    assert "Pareto front" in out and re.search(r"trial +method +settings +computed +s/img", out)
    assert re.search(r"teacache +threshold=0\.\d+ ret_steps=\d residual_order=0", out)
    plot = tmp / "exp" / "studies" / "g" / "pareto.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp / "exp" / "studies" / "g" / "reference").glob("*.png"))) == 2

    search.main(cli(tmp, "g"))  # a finished study: nothing is recomputed
    assert len(load(tmp, "g").trials) == 6

    search.main(["--study", "g", "--experiments", str(tmp / "exp"), "--freeze", "--min-ssim", "0"])
    frozen = load_frozen(tmp / "exp" / "frozen" / "g.json")
    fastest = min(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.user_attrs["time_per_image"])
    assert frozen.provenance["trial"]["number"] == fastest.number
    assert frozen.recipe == Recipe.from_dict(fastest.user_attrs["recipe"])
    assert frozen.recipe.cache.method == "teacache"
    assert frozen.recipe.cache.threshold == fastest.user_attrs["point"]["threshold"]
    assert frozen.recipe.cache.ret_steps == fastest.user_attrs["point"]["ret_steps"]
    assert frozen.recipe.cache.coefficients == (1.0, 0.0) and frozen.recipe.steps == 6
    assert frozen.provenance["study"]["name"] == "g" and frozen.model.source == "tiny"
    assert frozen.provenance["metrics"]["ssim"] == fastest.user_attrs["metrics"]["ssim"]
    assert frozen.provenance["created"]

    with pytest.raises(Flux2LabError, match="not overwritten"):
        search.main(["--study", "g", "--experiments", str(tmp / "exp"), "--freeze", "--min-ssim", "0"])
    with pytest.raises(Flux2LabError, match=r"(?s)no trial of study 'g' meets --min-ssim 1\.5.*closest.*threshold"):
        search.main(["--study", "g", "--experiments", str(tmp / "exp"), "--freeze", "--min-ssim", "1.5"])
    with pytest.raises(Flux2LabError, match="measured lpips.*psnr, ssim"):
        search.main(["--study", "g", "--experiments", str(tmp / "exp"), "--freeze", "--max-lpips", "0.1"])
    with pytest.raises(Flux2LabError, match="needs a quality budget"):
        search.main(["--study", "g", "--experiments", str(tmp / "exp"), "--freeze"])
    with pytest.raises(Flux2LabError, match="no study named 'nope'.*studies there: g"):
        search.main(["--study", "nope", "--experiments", str(tmp / "exp"), "--freeze", "--min-ssim", "0"])


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # diffusers converting the NaN image
def test_trials_that_raise_or_make_nan_images_fail_with_their_reason_and_the_study_goes_on(inputs, monkeypatch,
                                                                                            capsys):
    import torch

    from flux2lab.pipeline import core

    tmp, _, _ = inputs
    real_generate = core.generate

    def generate(pipe, prompts, seeds, recipe, **kw):
        threshold = getattr(recipe.cache, "threshold", None)  # None: the uncached reference and warm-up
        if threshold == 0.2:
            raise RuntimeError("boom")
        if threshold == 0.5:  # the decoder emits NaNs: PIL would silently show black
            handle = pipe.vae.decoder.register_forward_pre_hook(
                lambda m, args: (torch.full_like(args[0], float("nan")), *args[1:]))
            try:
                return real_generate(pipe, prompts, seeds, recipe, **kw)
            finally:
                handle.remove()
        return real_generate(pipe, prompts, seeds, recipe, **kw)

    monkeypatch.setattr(core, "generate", generate)
    args = cli(tmp, "f", grid=["--methods", "teacache", "--threshold", "0.05,0.2,0.5", "--ret-steps", "1", "--space",
                               "teacache.residual_order=0"])
    search.main(args)
    out = capsys.readouterr().out
    study = load(tmp, "f")
    by_threshold = {t.user_attrs["point"]["threshold"]: t for t in study.trials}
    assert by_threshold[0.05].state == TrialState.COMPLETE
    assert by_threshold[0.2].state == TrialState.FAIL
    assert by_threshold[0.2].user_attrs["fail_reason"] == "RuntimeError: boom"
    assert by_threshold[0.5].state == TrialState.FAIL
    assert "NaN" in by_threshold[0.5].user_attrs["fail_reason"]
    assert "3/3 grid points done (1 complete, 2 failed)" in out and "RuntimeError: boom" in out

    search.main(args)  # failed points are kept as failed...
    assert len(load(tmp, "f").trials) == 3
    monkeypatch.setattr(core, "generate", real_generate)
    search.main([*args, "--retry-failed"])  # ...until asked to retry them
    study = load(tmp, "f")
    assert complete_per_point(study) == Counter({teacache_point(th, 1): 1 for th in (0.05, 0.2, 0.5)})
    assert len(study.trials) == 5


def test_sigkill_then_rerun_keeps_finished_trials_and_redoes_the_interrupted_one(inputs):
    tmp, _, _ = inputs
    args = cli(tmp, "k", "--quiet")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flux2lab.search", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the search made no progress"
            states = trial_states(tmp / "exp" / "studies.db")
            if states.count("COMPLETE") >= 2 and "RUNNING with params" in states:
                break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()

    before = load(tmp, "k").trials
    done_before = {t.number: (t.params, t.values) for t in before if t.state == TrialState.COMPLETE}
    killed = [t.number for t in before if t.state == TrialState.RUNNING]
    assert len(done_before) >= 2 and len(killed) <= 1

    search.main(args)  # the same command again
    study = load(tmp, "k")
    after = {t.number: t for t in study.trials}
    for number, (params, values) in done_before.items():  # finished trials kept, not recomputed
        assert after[number].state == TrialState.COMPLETE
        assert (after[number].params, after[number].values) == (params, values)
    assert set(complete_per_point(study).values()) == {1} and len(complete_per_point(study)) == 6
    for number in killed:  # the interrupted trial is failed and its point redone once
        assert after[number].state == TrialState.FAIL and "interrupted" in after[number].user_attrs
        retries = [t for t in study.trials if t.user_attrs.get("retry_of") == number]
        assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
        assert retries[0].params == after[number].params
    assert len(study.trials) == 6 + len(killed)


def test_workers_flag_two_processes_finish_the_grid_without_duplicates(inputs, capsys):
    tmp, _, _ = inputs
    search.main(cli(tmp, "w", "--workers", "2"))
    out = capsys.readouterr().out
    study = load(tmp, "w")
    assert sorted(complete_per_point(study).values()) == [1] * 6
    for t in study.trials:  # anything besides the 6 is a racing trial stopped before any work
        assert t.state == TrialState.COMPLETE or (t.state == TrialState.PRUNED and "duplicate_of" in t.user_attrs)
    assert len({t.user_attrs["worker"]["pid"] for t in study.trials}) <= 2
    assert "6/6 grid points done (6 complete, 0 failed)" in out and "Pareto front" in out


WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from flux2lab import study as st

    url, out, me = sys.argv[1], Path(sys.argv[2]), sys.argv[3]

    class Runner(st.TrialRunner):
        def ensure_reference(self):
            pass

        def measure(self, recipe):
            with open(out / "calls.txt", "a") as f:
                f.write(json.dumps([recipe.cache.threshold, recipe.cache.ret_steps]) + "\\n")
            (out / f"{me}.busy").touch()  # each holds its first point until the other has one too
            deadline = time.monotonic() + 60
            while not all((out / f"{w}.busy").exists() for w in "ab") and time.monotonic() < deadline:
                time.sleep(0.05)
            return {"time_per_image": recipe.cache.threshold, "computed_fraction": 1.0,
                    "metrics": {"ssim": 1 - recipe.cache.threshold}, "recipe": recipe.to_dict()}

    study, config = st.load_study("race", st.open_storage(url))
    (out / me).touch()
    while not all((out / w).exists() for w in ("a", "b")):  # start together
        time.sleep(0.05)
    st.run_worker(study, config, Runner(study, config, out, weights={}))
""")


def test_two_worker_processes_on_one_sqlite_study_share_the_grid_without_duplicates(tmp_path):
    """Storage-level race: two processes claim grid points at the same moment (model work stubbed out)."""
    from flux2lab.pipeline.recipe import Recipe

    url = st.default_storage(tmp_path)
    base = Recipe(steps=6)
    space = st.build_space(base, {"threshold": [0.1, 0.2, 0.3, 0.4], "ret_steps": [0, 1, 2],
                                  "teacache": {"residual_order": [0]}}, methods="teacache")
    config = st.StudyConfig(model="tiny", prompts=({"id": "p", "text": "x", "images": [], "seed": 0},),
                            base_recipe=base.to_dict(), space=space.to_dict())
    st.create_or_load("race", st.open_storage(url), config)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), url, str(tmp_path), w], env=env, stderr=subprocess.PIPE)
             for w in ("a", "b")]
    for p in procs:
        assert p.wait(timeout=240) == 0, p.stderr.read().decode()[-3000:]
        p.stderr.close()
    calls = Counter(tuple(json.loads(line)) for line in (tmp_path / "calls.txt").read_text().splitlines())
    assert len(calls) == 12 and set(calls.values()) == {1}  # every point evaluated exactly once
    study, _ = st.load_study("race", st.open_storage(url))
    assert sorted(complete_per_point(study).values()) == [1] * 12
    assert len({t.user_attrs["worker"]["pid"] for t in study.get_trials(states=(TrialState.COMPLETE,))}) == 2


def test_tpe_runs_the_requested_number_of_trials(inputs):
    tmp, _, _ = inputs
    search.main(cli(tmp, "tpe", "--quiet", "--sampler", "tpe", "--n-trials", "3", "--speed-metric", "computed"))
    study = load(tmp, "tpe")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert all(0.05 <= t.params["teacache.threshold"] <= 0.5 and t.params["teacache.ret_steps"] in (0, 1)
               for t in study.trials)
    # the share of the block stack computed (lower is faster) and ssim
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE, optuna.study.StudyDirection.MAXIMIZE]


def test_spawned_workers_get_one_gpu_each(monkeypatch, tmp_path):
    import torch

    started = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, env: started.append((cmd, env)))
    args = search.build_parser().parse_args(["--study", "s", "--workers", "3", "--skip-missing"])
    _, device = search._spawn(args, "sqlite:///x.db")
    assert device == "cuda:0"  # this process is the first worker
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["1", "0"]
    assert all(cmd[cmd.index("--storage") + 1] == "sqlite:///x.db" and "--skip-missing" in cmd for cmd, _ in started)


@pytest.mark.parametrize("extra, message", [
    (["--threshold=-0.1,0.05"], r"--threshold: grid point teacache threshold=-0.1 .*'cache.threshold' = -0.1 is invalid"),
    (["--ret-steps", "0,7"], r"--ret-steps: grid point .*ret_steps=7 .*'cache.ret_steps' = 7 is invalid; .*steps \(6\)"),
    (["--threshold", "0.05,0.05"], r"listed more than once"),
    (["--cutoff-steps", "0", "--ret-steps", "1"], r"grid point .* not a valid recipe: .*cutoff_steps"),
    (["--precision", "fp5"], r"--precision: .*'transformer_precision' = 'fp5' is invalid"),
    (["--sampler", "tpe"], r"needs --n-trials"),
    (["--storage", "not a url"], r"cannot open the study storage not a url"),
    (["--storage", "sqlite:////nonexistent/dir/s.db"], r"cannot open the study storage sqlite:////nonexistent"),
    (["--model", "full-random"], r"'full-random' has no VAE"),
    (["--quality-metric", "lpips"], r"lpips: weight file alexnet-owt-7be5be79.pth not found"),
])
def test_bad_input_fails_before_model_work(inputs, monkeypatch, extra, message):
    from flux2lab.pipeline import models

    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("model work before the error"))
    tmp, _, _ = inputs
    with pytest.raises(Flux2LabError, match=message):
        search.main(cli(tmp, "bad", *extra))


def test_bad_grid_file_calibration_and_changed_settings_fail_before_model_work(inputs, monkeypatch):
    from flux2lab.pipeline import models

    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("model work before the error"))
    tmp, _, fit = inputs
    grid = tmp / "grid.yaml"
    grid.write_text("threshold: [0.05, 0.1]\nret_step: [0, 1]\n")
    with pytest.raises(Flux2LabError, match=r"grid.yaml: unknown parameter 'ret_step'"):
        search.main(cli(tmp, "bad", "--grid", str(grid), grid=[]))
    grid.write_text("threshold: [0.05, 0.1]\nret_steps: [0, 12]\n")
    with pytest.raises(Flux2LabError, match=r"grid.yaml, ret_steps: grid point .*'cache.ret_steps' = 12 is invalid"):
        search.main(cli(tmp, "bad", "--grid", str(grid), grid=[]))
    fit.write_text(json.dumps({"diagnostics": {}}))
    with pytest.raises(Flux2LabError, match=r"fit.json: not a calibration fit \(no 'coefficients' list\)"):
        search.main(cli(tmp, "bad"))
    fit.unlink()
    with pytest.raises(Flux2LabError, match=r"calibration fit .*fit.json does not exist"):
        search.main(cli(tmp, "bad"))
    without_skip = [a for a in cli(tmp, "bad") if a != "--skip-missing"]
    with pytest.raises(Flux2LabError, match=r"(?s)lpips: weight file .* not found.*--skip-missing"):
        search.main(without_skip)  # LPIPS is measured when its weights exist; missing, the user decides
    with pytest.raises(Flux2LabError, match=r"study 'nope' does not exist yet; give --prompts"):
        search.main(["--study", "nope", "--experiments", str(tmp / "exp"), "--skip-missing"])

    fit.write_text(json.dumps({"coefficients": [1.0, 0.0]}))
    storage = st.open_storage(st.default_storage(tmp / "exp"))
    config = search._config_from_args(search.build_parser().parse_args(cli(tmp, "made")), {})
    st.create_or_load("made", storage, config)
    with pytest.raises(Flux2LabError, match=r"study 'made' already exists with other settings: space"):
        search.main(cli(tmp, "made", grid=["--threshold", "0.3"]))


# ------------------------------------------------------------------------------------------ across cache methods

TWO_METHODS = ["--methods", "teacache,taylorseer", "--threshold", "0.05,0.3", "--ret-steps", "1", "--space",
               "teacache.residual_order=0,1", "--space", "taylorseer.cache_interval=2,3", "--speed-metric", "computed"]


def test_a_grid_study_over_two_methods_runs_each_point_once_records_it_and_resumes(inputs, capsys):
    from flux2lab.pipeline.recipe import Recipe

    tmp, _, _ = inputs
    search.main(cli(tmp, "two", grid=TWO_METHODS))
    out = capsys.readouterr().out
    study = load(tmp, "two")
    # TeaCache 2 thresholds x order {0, 1} (slope 0.75 only with order 1), TaylorSeer 2 intervals (whole blocks)
    assert complete_per_point(study) == Counter({
        **{(("method", "teacache"), ("residual_order", 0), ("ret_steps", 1), ("threshold", th)): 1 for th in (0.05, 0.3)},
        **{(("method", "teacache"), ("residual_order", 1), ("residual_slope", 0.75), ("ret_steps", 1),
            ("threshold", th)): 1 for th in (0.05, 0.3)},
        **{(("cache_interval", i), ("method", "taylorseer"), ("use_lite_mode", True)): 1 for i in (2, 3)}})
    for t in study.trials:
        assert set(t.params) == {"point"}  # the grid's one categorical; the point itself is a user attribute
        recipe = Recipe.from_dict(t.user_attrs["recipe"])
        point = t.user_attrs["point"]
        assert recipe.cache.method == point["method"] and recipe.cache.to_dict().items() >= {
            k: v for k, v in point.items() if k != "method"}.items()
        assert recipe.cache.method != "teacache" or recipe.cache.coefficients == (1.0, 0.0)  # the calibration's
        assert 0 < t.user_attrs["computed_fraction"] <= 1
    assert "6/6 grid points done" in out and "Pareto front" in out
    search.main(cli(tmp, "two", grid=TWO_METHODS))  # resumed: finished, nothing recomputed
    assert len(load(tmp, "two").trials) == 6


def test_a_tpe_study_over_two_methods_records_each_methods_own_parameters_and_resumes(inputs):
    tmp, _, _ = inputs
    args = cli(tmp, "tpe2", "--quiet", "--sampler", "tpe", "--n-trials", "6", grid=TWO_METHODS)
    search.main(args)
    study = load(tmp, "tpe2")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6
    methods = {t.params["method"] for t in study.trials}
    assert methods == {"teacache", "taylorseer"}
    for t in study.trials:  # define-by-run: a trial holds its own method's parameters only
        method = t.params["method"]
        assert all(k == "method" or k.startswith(f"{method}.") for k in t.params)
        if method == "teacache":
            assert 0.05 <= t.params["teacache.threshold"] <= 0.3
            assert ("teacache.residual_slope" in t.params) == (t.params["teacache.residual_order"] == 1)
        else:
            assert 2 <= t.params["taylorseer.cache_interval"] <= 3 and t.params["taylorseer.use_lite_mode"] is True
        point = t.user_attrs["point"]
        assert point == {"method": method, **{k.split(".", 1)[1]: v for k, v in t.params.items() if k != "method"}}
        assert t.user_attrs["recipe"]["cache"]["method"] == method
    search.main(args)  # resumed: the budget is spent, no trial added
    assert len(load(tmp, "tpe2").trials) == 6


STUB_WORKER = {  # (time per image, ssim) per point: both methods on the front
    ("teacache", 0.1): (1.0, 0.99), ("teacache", 0.2): (0.8, 0.90),
    ("taylorseer", 2): (0.9, 0.98), ("taylorseer", 3): (0.7, 0.95),
}


class StubRunner(st.TrialRunner):
    """Trials without model work: speed and quality per point from STUB_WORKER."""

    def ensure_reference(self):
        pass

    def measure(self, recipe):
        key = (recipe.cache.method, recipe.cache.threshold if recipe.cache.method == "teacache"
               else recipe.cache.cache_interval)
        time_per_image, ssim = STUB_WORKER[key]
        return {"time_per_image": time_per_image, "computed_fraction": time_per_image / 2,
                "metrics": {"ssim": ssim, "psnr": 40 * ssim}, "recipe": recipe.to_dict(),
                "model": {"source": "tiny", "revision": None}}


def test_one_front_across_methods_and_freeze_picks_the_fastest_point_of_any_method(tmp_path, capsys):
    from flux2lab.pipeline.frozen import load_frozen
    from flux2lab.pipeline.recipe import Recipe

    exp = tmp_path / "exp"
    storage = st.open_storage(st.default_storage(exp))
    base = Recipe(steps=6)
    space = st.build_space(base, {"teacache": {"threshold": [0.1, 0.2], "ret_steps": [0], "residual_order": [0]},
                                  "taylorseer": {"cache_interval": [2, 3]}}, methods="teacache,taylorseer")
    config = st.StudyConfig(model="tiny", prompts=({"id": "p", "text": "x", "images": [], "seed": 0},),
                            base_recipe=base.to_dict(), space=space.to_dict())
    study, config = st.create_or_load("front", storage, config)
    st.run_worker(study, config, StubRunner(study, config, tmp_path, weights={}))

    front = st.pareto_front(study, config)
    table = st.format_table(front, config)
    assert [config.trial_point(t)["method"] for t in front] == ["taylorseer", "taylorseer", "teacache"]
    assert re.search(r"taylorseer +cache_interval=3 use_lite_mode=true", table)
    assert re.search(r"teacache +threshold=0.1 ret_steps=0 residual_order=0", table)
    fig = st.pareto_figure("front", study.trials, config, {t.number for t in front})
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[:2] == ["teacache", "taylorseer"] and "Pareto front" in legend

    search.main(["--study", "front", "--experiments", str(exp), "--freeze", "--min-ssim", "0.96"])
    out = capsys.readouterr().out
    frozen = load_frozen(exp / "frozen" / "front.json")
    assert frozen.recipe.cache.method == "taylorseer" and frozen.recipe.cache.cache_interval == 2
    assert frozen.recipe.cache.use_lite_mode is True and frozen.recipe.steps == 6
    assert frozen.provenance["trial"]["point"] == {"method": "taylorseer", "cache_interval": 2, "use_lite_mode": True}
    assert frozen.provenance["metrics"]["computed_fraction"] == 0.45
    assert "(taylorseer cache_interval=2 use_lite_mode=true) is the fastest within --min-ssim 0.96" in out
    search.main(["--study", "front", "--experiments", str(exp), "--freeze", "--min-ssim", "0.99", "--out",
                 str(tmp_path / "tc.json")])
    assert load_frozen(tmp_path / "tc.json").recipe.cache.threshold == 0.1


@pytest.mark.parametrize("extra, message", [
    (["--methods", "magcache"], r"--methods magcache: magcache needs MagCache's magnitude ratios"),
    (["--methods", "taylorseer", "--recipe", "{graphs}"], r"--methods taylorseer: .*cannot run with CUDA graphs"),
    (["--methods", "first_block", "--recipe", "{ulysses}"], r"--methods first_block: .*context parallelism"),
    (["--methods", "teacache,nope"], r"--methods: unknown method 'nope'"),
    (["--methods", "none"], r"--methods none: the uncached run is not a point"),
    (["--methods", "teacache", "--space", "taylorseer.cache_interval=2"],
     r"--space taylorseer.cache_interval: values for taylorseer, which this study does not search"),
    (["--recipe", "{graphs}", "--space", "taylorseer.cache_interval=2"],
     r"--space taylorseer.cache_interval: values for taylorseer, which cannot run here: .*CUDA graphs"),
    (["--methods", "taylorseer", "--space", "taylorseer.interval=2"], r"taylorseer has no setting 'interval'"),
    (["--methods", "teacache", "--space", "magcache.mag_ratios=1"], r"mag_ratios come from the calibration"),
    (["--methods", "seacache", "--space", "seacache.threshold=0.5,-1"],
     r"--space seacache.threshold: grid point seacache threshold=-1 .*not a valid recipe: .*must be non-negative"),
    (["--methods", "teacache", "--space", "cache_interval=2"], r"--space 'cache_interval=2': write METHOD.SETTING"),
])
def test_methods_that_cannot_run_and_bad_method_values_fail_before_model_work(inputs, monkeypatch, extra, message):
    from flux2lab.pipeline import models
    from flux2lab.pipeline.recipe import Recipe

    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("model work before the error"))
    tmp, _, _ = inputs
    Recipe(cuda_graphs=True).save(tmp / "graphs.json")
    Recipe(ulysses_degree=2).save(tmp / "ulysses.json")
    extra = [a.format(graphs=tmp / "graphs.json", ulysses=tmp / "ulysses.json") for a in extra]
    with pytest.raises(Flux2LabError, match=message):
        search.main(cli(tmp, "bad", *extra, grid=[]))


def test_an_older_teacache_only_study_is_refused_with_the_fix(tmp_path):
    storage = st.open_storage(st.default_storage(tmp_path))
    study = optuna.create_study(study_name="old", storage=storage, directions=["minimize", "maximize"])
    study.set_user_attr("flux2lab", {"version": 1, "space": {"threshold": [0.05]}})
    with pytest.raises(Flux2LabError, match=r"study 'old': .*older flux2lab .*TeaCache alone.*another --study name"):
        st.load_study("old", storage)


def test_on_mini_each_method_loses_quality_as_it_computes_less(tmp_path):
    """4 held-out captions, 10 steps: more skipping, lower PSNR against the uncached images (measured: TeaCache
    threshold 0.05 60% computed / 39 dB, 0.2 20% / 26 dB; TaylorSeer interval 2 60% / 44 dB, 5 50% / 32 dB)."""
    from flux2lab.zoo.world import sample_scenes

    prompts = tmp_path / "captions.txt"
    prompts.write_text("".join(s.caption + "\n" for s in sample_scenes(4, 0, split="heldout")))
    search.main(["--study", "mini", "--model", "mini", "--experiments", str(tmp_path / "exp"), "--prompts",
                 str(prompts), "--calibration", str(ROOT / "reports" / "mini" / "calibration" / "fit.json"),
                 "--steps", "10", "--methods", "teacache,taylorseer", "--threshold", "0.05,0.2", "--ret-steps", "1",
                 "--space", "teacache.residual_order=0", "--space", "taylorseer.cache_interval=2,5",
                 "--quality-metric", "psnr", "--speed-metric", "computed", "--skip-missing", "--quiet"])
    study = load(tmp_path, "mini")
    by_method: dict[str, list] = {}
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        by_method.setdefault(t.user_attrs["point"]["method"], []).append(
            (t.user_attrs["computed_fraction"], t.user_attrs["metrics"]["psnr"]))
    assert set(by_method) == {"teacache", "taylorseer"}
    for method, runs in by_method.items():
        (less, low), (more, high) = sorted(runs)
        assert less < more and low < high, f"{method}: {runs}"


def test_every_other_method_runs_through_search_and_freeze_magcache_with_the_calibrations_ratios(inputs, capsys):
    from flux2lab.pipeline.frozen import load_frozen

    tmp, _, fit = inputs
    ratios = [1.0, 0.98, 0.95, 0.93, 0.9, 0.88]
    (tmp / "mag_ratios.json").write_text(json.dumps({"mag_ratios": ratios}))  # calibrate writes it beside fit.json
    config = search._config_from_args(search.build_parser().parse_args(cli(tmp, "default", grid=[])), {})
    assert list(config.space["methods"]) == ["teacache", "taylorseer", "magcache", "first_block", "seacache"]
    assert config.calibration["mag_ratios"] == ratios and config.calibration["coefficients"] == [1.0, 0.0]

    args = cli(tmp, "others", grid=["--methods", "magcache,first_block,seacache", "--space", "magcache.threshold=0.5",
                                    "--space", "first_block.threshold=0.2", "--space", "seacache.threshold=0.5",
                                    "--space", "seacache.max_consecutive_cached=2", "--speed-metric", "computed"])
    search.main(args)
    study = load(tmp, "others")
    assert sorted(t.user_attrs["point"]["method"] for t in study.trials if t.state == TrialState.COMPLETE) == [
        "first_block", "magcache", "seacache"]
    magcache = next(t for t in study.trials if t.user_attrs["point"]["method"] == "magcache")
    search.main(["--study", "others", "--experiments", str(tmp / "exp"), "--freeze", "--min-ssim",
                 str(magcache.user_attrs["metrics"]["ssim"]), "--out", str(tmp / "mag.json")])
    frozen = load_frozen(tmp / "mag.json")  # MagCache computes least here (33% of the block stack on tiny)
    assert frozen.recipe.cache.method == "magcache" and frozen.recipe.cache.threshold == 0.5
    assert frozen.recipe.cache.mag_ratios == tuple(ratios)
    assert "magnitude ratios: calibration fit" in frozen.provenance["notes"]
    assert list(frozen.provenance["calibration"]["mag_ratios"]) == ratios
