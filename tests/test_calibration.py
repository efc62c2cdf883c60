"""Calibration: the recorder measures what TeaCache and the output really do, the fit and its diagnostics,
the command (files, resume, shards, bad input) and the default set. (notebooks/calibration.ipynb runs in
test_notebooks.py.)"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from flux2lab import calibrate, calibration
from flux2lab.calibration import Samples
from flux2lab.common.errors import Flux2LabError
from flux2lab.hooks import teacache
from flux2lab.hooks.recorder import detach_recorder
from flux2lab.pipeline.prompts import load_prompts
from flux2lab.pipeline.recipe import FLUX2_DEV_COEFFICIENTS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SET = ROOT / "calibration_data" / "calibration.jsonl"


def synthetic(coefficients, prompts: int = 20, per_prompt: int = 12, noise: float = 0.0, seed: int = 0) -> Samples:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.02, 0.3, prompts * per_prompt)
    y = np.polyval(coefficients, x) + rng.normal(0, noise, x.shape)
    ids = np.array([f"p{i // per_prompt}" for i in range(len(x))], dtype=object)
    kinds = np.array(["multi-reference" if i // per_prompt % 5 == 0 else "t2i" for i in range(len(x))], dtype=object)
    return Samples(ids, kinds, x, y)


def test_fit_recovers_a_known_cubic():
    true = (12.0, -3.0, 0.9, 0.01)
    fit = calibration.fit_samples(synthetic(true))
    assert fit["degree"] == 3 and fit["coefficients"] == pytest.approx(true, rel=1e-6, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0) and fit["heldout"]["r2"] == pytest.approx(1.0)
    noisy = calibration.fit_samples(synthetic(true, noise=0.002, seed=1))
    assert noisy["coefficients"] == pytest.approx(true, rel=0.1, abs=0.01)
    assert 0.9 < noisy["heldout"]["r2"] < 1 and noisy["residual"]["std"] == pytest.approx(0.002, rel=0.2)
    assert noisy["samples"] == 240 and noisy["prompts"] == 20 and set(noisy["per_kind"]) == {"t2i", "multi-reference"}
    linear = calibration.fit_samples(synthetic(true), degree=1)
    assert len(linear["coefficients"]) == 2 and linear["r2"] < fit["r2"]


def test_heldout_prompts_are_whole_prompts_and_deterministic():
    ids = [f"prompt-{i}" for i in range(30)]
    held = calibration.heldout_prompts(ids)
    assert len(held) == 6 and held == calibration.heldout_prompts(list(reversed(ids)))
    assert calibration.heldout_prompts(["only"]) == set()
    s = synthetic((1.0, 0.0))
    fit = calibration.fit_samples(s)
    mask = fit["_heldout_mask"]
    assert not set(s.prompt_id[mask]) & set(s.prompt_id[~mask])  # no prompt on both sides


def test_published_polynomial_caps_threshold_005_at_every_other_step():
    low, at = calibration.polynomial_minimum(FLUX2_DEV_COEFFICIENTS, 0.0, 0.3)
    assert low == pytest.approx(0.0453, abs=5e-4) and at == pytest.approx(0.05, abs=0.005)
    limits = calibration.skip_limits(FLUX2_DEV_COEFFICIENTS, (0.0, 0.3), [0.04, 0.05, 0.1], steps=50, ret_steps=10)
    by_t = {row["threshold"]: row for row in limits["thresholds"]}
    assert by_t[0.04]["max_consecutive_skips"] == 0 and by_t[0.04]["max_skipped_steps"] == 0
    assert by_t[0.05]["max_consecutive_skips"] == 1 and by_t[0.05]["max_skipped_steps"] == 20  # 40 decided steps
    assert by_t[0.1]["max_consecutive_skips"] == 2
    advice = " ".join(limits["advice"])
    assert "At threshold 0.05: at most every other step can be skipped" in advice
    assert "At threshold 0.04: no step can be skipped" in advice
    # The bound is exact for the rule: a run that always sits at the curve's minimum skips exactly that often.
    config = teacache.TeaCacheConfig(num_inference_steps=50, threshold=0.05, ret_steps=10)
    pattern = teacache.plan_skips(config, [None] + [at] * 49)
    assert pattern.count(False) == 20 and not any(a is b is False for a, b in itertools.pairwise(pattern))


def test_a_curve_that_reaches_zero_is_reported_unbounded():
    limits = calibration.skip_limits((1.0, -0.1, 0.0025), (0.0, 0.3), [0.1], steps=20, ret_steps=2)  # (x-.05)^2
    assert limits["floor"] == 0 and limits["thresholds"][0]["max_consecutive_skips"] is None
    assert "any number of steps" in limits["advice"][0]


def test_nonfinite_samples_are_excluded_with_a_count_and_too_few_are_refused():
    s = synthetic((2.0, 0.1))
    s.y[:3] = np.nan
    s.x[5] = np.inf
    with pytest.warns(UserWarning, match="4 of 240 samples have NaN/inf"):
        fit = calibration.fit_samples(s)
    assert fit["excluded_nonfinite"] == 4 and fit["samples"] == 236
    with pytest.raises(Flux2LabError, match="too few samples.*11 usable from 1 prompt.*need at least 12"):
        calibration.fit_samples(synthetic((2.0, 0.1), prompts=1, per_prompt=11))


def test_recorder_measures_the_model_output_and_teacaches_input_distance(tiny_pipe):
    entry = load_prompts(DEFAULT_SET)[4]  # a multi-reference entry
    assert entry.kind == "multi-reference"
    t = tiny_pipe.transformer
    outputs, ids = [], []
    h1 = t.register_forward_hook(lambda m, a, kw, out: outputs.append(out[0]), with_kwargs=True)
    h2 = t.register_forward_pre_hook(lambda m, a, kw: ids.append(kw["img_ids"]), with_kwargs=True)
    try:
        rows = calibration.record_prompt(tiny_pipe, entry, 5, calibration.recording_recipe(4))
    finally:
        h1.remove()
        h2.remove()
        detach_recorder(t)
    generated = int((ids[0][0, :, 0] == 0).sum())
    assert generated < ids[0].shape[1]  # the reference tokens were there
    out = [o[:, :generated] for o in outputs]
    expected_y = [float((b - a).abs().sum() / a.abs().sum()) for a, b in itertools.pairwise(out)]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["y"] for r in rows] == pytest.approx(expected_y, rel=1e-5)
    assert [r["x"] for r in rows] == [e["rel_l1"] for e in teacache.teacache_log(t)[1:]]
    assert all(r["kind"] == "multi-reference" and r["prompt_id"] == entry.id and r["seed"] == 5 for r in rows)


def test_default_set_is_varied_and_its_images_are_small():
    entries = load_prompts(DEFAULT_SET)
    kinds = [e.kind for e in entries]
    assert kinds.count("t2i") >= 40 and kinds.count("multi-reference") >= 10
    assert "multi-reference" in kinds[:5]  # --limit keeps both kinds
    images = {p for e in entries for p in e.prompt.images}
    assert len(images) >= 10 and all(os.path.getsize(p) < 20_000 for p in images)
    assert "CC0" in (ROOT / "calibration_data" / "README.md").read_text()


def _calibrate(tmp_path, *extra: str) -> None:
    assert calibrate.main(["--model", "tiny", "--device", "cpu", "--name", "run", "--out", str(tmp_path),
                           "--steps", "4", "--limit", "5", *extra]) == 0


def test_command_writes_samples_fit_and_figure_and_resumes(tmp_path, capsys):
    _calibrate(tmp_path)
    run = tmp_path / "run"
    rows = calibration.read_rows(run / "samples.csv")
    assert len(rows) == 5 * 3 and {r["kind"] for r in rows} == {"t2i", "multi-reference"}
    fit = json.loads((run / "fit.json").read_text())
    assert fit["samples"] == 15 and fit["prompts"] == 5 and len(fit["coefficients"]) == 4
    assert {"r2", "heldout", "residual", "x_range", "skip_limits", "per_kind", "run"} <= set(fit)
    assert fit["run"]["steps"] == 4 and fit["skip_limits"]["advice"]
    assert (run / "fit.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "recorded 5 prompt(s), 0 already done" in out and "fit: degree 3" in out

    # An interruption in the middle of the last prompt: that prompt (only) is recorded again.
    lines = (run / "samples.csv").read_text().splitlines(keepends=True)
    (run / "samples.csv").write_text("".join(lines[:-2]) + lines[-2][:10])
    _calibrate(tmp_path)
    assert "recorded 1 prompt(s), 4 already done" in capsys.readouterr().out
    assert calibration.read_rows(run / "samples.csv") == rows

    with pytest.raises(Flux2LabError, match="steps: \\[4\\] there, \\[5\\] now"):
        calibrate.main(["--model", "tiny", "--device", "cpu", "--name", "run", "--out", str(tmp_path),
                        "--steps", "5", "--limit", "5"])
    assert calibrate.main(["--name", "run", "--out", str(tmp_path), "--fit-only", "--degree", "2"]) == 0
    assert len(json.loads((run / "fit.json").read_text())["coefficients"]) == 3


def test_shards_record_their_part_and_the_last_one_fits(tmp_path, capsys):
    _calibrate(tmp_path, "--shard", "1/2")
    run = tmp_path / "run"
    assert "3 prompt(s) of the set are not recorded yet" in capsys.readouterr().out
    assert not (run / "fit.json").exists()
    assert {r["prompt_id"] for r in calibration.read_rows(run / "samples.shard1of2.csv")} == {
        e.id for e in load_prompts(DEFAULT_SET)[1:5:2]}
    _calibrate(tmp_path, "--shard", "0/2")
    assert len(calibration.read_rows(run / "samples.csv")) == 15
    assert json.loads((run / "fit.json").read_text())["prompts"] == 5


@pytest.mark.parametrize("line, fragment", [
    ('{"prompt": "a cat"', "line 2: not valid JSON"),
    ('{"images": []}', "line 2: field 'prompt' is missing"),
    ('{"prompt": "a cat", "images": ["nope.png"]}', "line 2: field 'images' names nope.png"),
])
def test_bad_manifest_is_reported_before_any_model_work(tmp_path, capsys, line, fragment):
    manifest = tmp_path / "set.jsonl"
    manifest.write_text('{"prompt": "a dog"}\n' + line + "\n")
    # full-random cannot even load on this CPU machine: the manifest error must come first.
    with pytest.raises(SystemExit) as exit_:
        from flux2lab.cli import run_main

        run_main(calibrate.main, ["--model", "full-random", "--device", "cpu", "--prompts", str(manifest),
                                  "--name", "x", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(manifest) in err and fragment in err


def test_bad_shard_is_refused():
    with pytest.raises(Flux2LabError, match="0 <= i < n"):
        calibration.parse_shard("2/2")
    with pytest.raises(Flux2LabError, match="write it as i/n"):
        calibration.parse_shard("half")


# ------------------------------------------------------------------------------------- MagCache's ratios


def test_recorded_magnitude_ratios_are_diffusers_magcache_calibration(tiny_pipe):
    from flux2lab.hooks import step_caches
    from flux2lab.pipeline.core import generate
    from flux2lab.pipeline.recipe import Recipe

    entry = load_prompts(DEFAULT_SET)[0]
    try:
        rows = calibration.record_prompt(tiny_pipe, entry, 3, calibration.recording_recipe(5))
    finally:
        detach_recorder(tiny_pipe.transformer)
    # The same image under diffusers' MagCache in calibration mode (TeaCache at threshold 0 computed every step).
    generate(tiny_pipe, [entry.prompt], [3], Recipe(steps=5).replace(cache={"method": "magcache", "calibrate": True}))
    diffusers_ratios = step_caches.mag_ratios(tiny_pipe.transformer)
    generate(tiny_pipe, [entry.prompt], [3], Recipe(steps=5))  # detaches MagCache again
    assert len(diffusers_ratios) == 5 and diffusers_ratios[0] == 1.0
    assert [1.0] + [r["mag_ratio"] for r in rows] == pytest.approx(diffusers_ratios, rel=1e-5)


def test_command_records_magcache_ratios_that_resume_and_run_in_magcache(tmp_path, capsys, tiny_pipe):
    from flux2lab.pipeline.core import generate
    from flux2lab.pipeline.presets import resolve_recipe

    _calibrate(tmp_path)
    run = tmp_path / "run"
    data = json.loads((run / calibration.MAG_RATIOS).read_text())
    assert data["steps"] == 4 and data["prompts"] == 5 and data["run"]["steps"] == 4
    table = np.array(list(data["per_prompt"].values()))
    assert table.shape == (5, 4) and np.all(table[:, 0] == 1.0) and np.all(table > 0)
    assert data["mag_ratios"] == pytest.approx(table.mean(axis=0).tolist())
    ratios = calibration.mag_ratios_from_fit(run)
    assert ratios == data["mag_ratios"] == calibration.mag_ratios_from_fit(run / "fit.json")
    out = capsys.readouterr().out
    assert "MagCache: magnitude ratios of 5 prompts x 4 steps" in out and str(run / calibration.MAG_RATIOS) in out

    # An interruption while writing the last prompt's ratios: only those are recorded again, the samples stay.
    samples = calibration.read_rows(run / "samples.csv")
    lines = (run / "mag_ratios.jsonl").read_text().splitlines(keepends=True)
    (run / "mag_ratios.jsonl").write_text("".join(lines[:-1]) + lines[-1][:15])
    _calibrate(tmp_path)
    assert "recorded 1 prompt(s), 4 already done" in capsys.readouterr().out
    assert calibration.read_rows(run / "samples.csv") == samples
    again = json.loads((run / calibration.MAG_RATIOS).read_text())
    assert again["per_prompt"].keys() == data["per_prompt"].keys() and again["mag_ratios"] == pytest.approx(ratios)

    # A run recorded before the ratios were: --fit-only says so, a rerun records only the ratios.
    for path in (run / "mag_ratios.jsonl", run / calibration.MAG_RATIOS):
        path.unlink()
    assert calibrate.main(["--name", "run", "--out", str(tmp_path), "--fit-only"]) == 0
    assert "no ratios in this run" in capsys.readouterr().out
    with pytest.raises(Flux2LabError, match="holds no MagCache ratios.*same --name"):
        calibration.mag_ratios_from_fit(run / "fit.json")
    _calibrate(tmp_path)
    assert "recorded 5 prompt(s), 0 already done" in capsys.readouterr().out
    assert calibration.read_rows(run / "samples.csv") == samples
    assert calibration.mag_ratios_from_fit(run) == pytest.approx(ratios)

    # Fed to diffusers' MagCache (the preset), they run; 8 steps: MagCache maps the 4 ratios to them.
    recipe = resolve_recipe(f"magcache@{run}")
    assert recipe.cache.method == "magcache"
    for steps in (4, 8):
        generation = generate(tiny_pipe, ["a red fox"], 0, recipe.replace(steps=steps))
        assert generation.images[0].size == (64, 64)
    generate(tiny_pipe, ["a red fox"], 0, recipe.replace(steps=4, cache={"method": "none"}))


def test_shards_record_their_ratios_and_the_last_one_gathers_them(tmp_path):
    _calibrate(tmp_path, "--shard", "1/2")
    run = tmp_path / "run"
    assert not (run / calibration.MAG_RATIOS).exists()
    _calibrate(tmp_path, "--shard", "0/2")
    shard_ids = [{json.loads(line)["prompt_id"] for line in calibration.ratios_file(run, (i, 2)).read_text().splitlines()}
                 for i in range(2)]
    assert shard_ids == [{e.id for e in load_prompts(DEFAULT_SET)[i:5:2]} for i in range(2)]
    data = json.loads((run / calibration.MAG_RATIOS).read_text())
    assert set(data["per_prompt"]) == shard_ids[0] | shard_ids[1] and len(data["mag_ratios"]) == 4


def test_mag_ratios_reader_refuses_what_is_not_a_ratios_file(tmp_path):
    with pytest.raises(Flux2LabError, match="does not exist"):
        calibration.mag_ratios_from_fit(tmp_path / "nope")
    bad = tmp_path / calibration.MAG_RATIOS
    bad.write_text("{}")
    with pytest.raises(Flux2LabError, match="no 'mag_ratios' list"):
        calibration.mag_ratios_from_fit(tmp_path)
    bad.write_text(json.dumps({"mag_ratios": [1.0, -0.5]}))
    with pytest.raises(Flux2LabError, match="positive numbers"):
        calibration.mag_ratios_from_fit(bad)


def test_mini_calibrates_on_its_own_captions_by_default(tmp_path, capsys):
    from flux2lab.pipeline.prompt_sets import prompt_set
    from flux2lab.zoo.world import parse_caption

    assert calibrate.main(["--model", "mini", "--device", "cpu", "--name", "m", "--out", str(tmp_path),
                           "--steps", "5", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "prompts: mini's own: 4 held-out world captions" in out and "warning" not in out
    run = json.loads((tmp_path / "m" / "run.json").read_text())
    assert run["manifest"].startswith("mini's own") and run["prompts"] == 4
    rows = calibration.read_rows(tmp_path / "m" / "samples.csv")
    assert {r["prompt_id"] for r in rows} == {f"heldout-0-{i}" for i in range(4)}
    for e in prompt_set("mini", "calibration", limit=4).entries:
        parse_caption(e.prompt.text)  # a caption of mini's world
    # Photographic prompts on mini: named in a warning (their fit does not predict).
    photos = prompt_set("mini", "calibration", DEFAULT_SET, limit=3)
    assert "3 of 3 prompts" in photos.warning and "not captions of mini's world" in photos.warning
    assert prompt_set("tiny", "calibration", limit=3).source == str(DEFAULT_SET)
