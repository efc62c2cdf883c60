"""`python -m flux2lab.demo --quick`: every stage end to end on the built-in model, and the report it ends with."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from pathlib import Path

import pytest

from flux2lab import demo
from flux2lab.cli import run_main
from flux2lab.common.errors import Flux2LabError
from flux2lab.quality.comparison import DEFAULT_METRICS

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["calibrate", "fit", "search", "compare", "freeze", "run", "bench", "report"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick demo (about a minute on 2 cores), in this process as the README's command runs it."""
    import torch

    out = tmp_path_factory.mktemp("demo") / "out"
    threads = torch.get_num_threads()
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), pytest.raises(SystemExit) as exit_:
            run_main(demo.main, ["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the demo runs the toy model on one thread; other tests keep theirs
    assert exit_.value.code == 0, stdout.getvalue()
    return out, stdout.getvalue()


def test_each_stage_prints_one_line_and_the_last_line_says_where_the_report_is(quick):
    out, stdout = quick
    lines = stdout.strip().splitlines()
    stage_lines = [line for line in lines if re.match(r"\[\d/8\] ", line)]
    assert [line.split()[1] for line in stage_lines] == STAGES
    assert lines[-1] == f"report: {out / 'report' / 'index.html'}"
    assert (out / "report" / "index.html").is_file()


def test_every_stage_wrote_its_artefacts_and_they_chain(quick):
    from flux2lab.pipeline.frozen import load_frozen

    out, _ = quick
    cal = out / "calibration" / "demo"
    assert {"samples.csv", "fit.json", "fit.png", "run.json"} <= {p.name for p in cal.iterdir()}
    fit = json.loads((cal / "fit.json").read_text())
    record = json.loads((out / "demo.json").read_text())
    kinds = {row.split(",")[1] for row in (cal / "samples.csv").read_text().splitlines()[1:]}
    # The calibration set mixes both kinds; mini's world captions (its yardstick can score them) are text only.
    assert kinds == ({"t2i"} if record["model"] == "mini" else {"t2i", "multi-reference"})
    assert [s["name"] for s in record["stages"]] == STAGES
    search_cmd = next(s["command"] for s in record["stages"] if s["name"] == "search")
    floor = fit["skip_limits"]["floor"]
    thresholds = [float(t) for t in re.search(r"--threshold (\S+)", search_cmd).group(1).split(",")]
    assert thresholds == sorted(float(f"{m * floor:.3g}") for m in demo.PLANS["quick"].threshold_multiples), \
        "the search grid is read off the fit"

    assert re.search(r"--methods (\S+)", search_cmd).group(1).split(",") == list(demo.PLANS["quick"].cache_space)
    frozen = load_frozen(out / "frozen" / "demo.json")  # verified hash
    assert frozen.provenance["calibration"]["sha256"] == hashlib.sha256((cal / "fit.json").read_bytes()).hexdigest()
    assert list(frozen.provenance["calibration"]["coefficients"]) == fit["coefficients"]
    assert frozen.provenance["study"]["name"] == "demo"
    # The search crossed methods; its TeaCache points carry the fit's coefficients and thresholds, and the frozen
    # recipe (of whichever method won) is its trial's.
    from flux2lab import study as st
    from flux2lab.pipeline.recipe import Recipe

    study, _ = st.load_study("demo", st.open_storage(st.default_storage(out)))
    recipes = {t.number: Recipe.from_dict(t.user_attrs["recipe"]) for t in study.trials if "recipe" in t.user_attrs}
    assert {r.cache.method for r in recipes.values()} == set(demo.PLANS["quick"].cache_space)
    teacache = [r.cache for r in recipes.values() if r.cache.method == "teacache"]
    assert teacache and all(c.coefficients == tuple(fit["coefficients"]) and c.threshold in thresholds
                            for c in teacache)
    assert frozen.recipe == recipes[frozen.provenance["trial"]["number"]]

    comparison = out / "compare" / "bf16-vs-nvfp4"
    metrics = json.loads((comparison / "metrics.json").read_text())
    assert metrics["b"]["recipe"]["transformer_precision"] == "nvfp4"
    assert {"psnr", "ssim"} <= set(metrics["metrics"])
    assert all((comparison / p).exists() for p in ("per_prompt.csv", "grid.png", "a", "b"))
    for name in DEFAULT_METRICS:  # each metric was measured, or skipped with the reason
        assert name in metrics["metrics"] or "not found" in record["skipped_metrics"][name]

    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["config_sha256"] == frozen.sha256 and summary["images_made"] == demo.PLANS["quick"].run_prompts
    bench = json.loads((out / "bench" / "bench.json").read_text())
    assert bench["rungs"][0]["name"] == "eager-bf16" and bench["rungs"][0]["status"] == "ok"


def test_the_report_has_every_section_with_content_from_this_run(quick, tmp_path):
    from test_report import assert_renders, assert_screenshot, chromium_render, parse

    out, _ = quick
    html_text = (out / "report" / "index.html").read_text()
    md = (out / "report" / "index.md").read_text()
    assert_renders(parse(html_text))

    fit = json.loads((out / "calibration" / "demo" / "fit.json").read_text())
    frozen = json.loads((out / "frozen" / "demo.json").read_text())
    metrics = json.loads((out / "compare" / "bf16-vs-nvfp4" / "metrics.json").read_text())
    summary = json.loads((out / "run" / "summary.json").read_text())
    bench = json.loads((out / "bench" / "bench.json").read_text())
    record = json.loads((out / "demo.json").read_text())
    assert f"{fit['coefficients'][0]:.6e}" in md
    assert re.search(rf"\| {frozen['provenance']['trial']['number']} \| [^\n]*★ frozen", md)
    assert f"| PSNR (dB) | {metrics['metrics']['psnr']['value']:.4g} |" in md
    assert f"{summary['mean_wall_s']:.3f} s" in md and frozen["sha256"][:12] in md
    assert f"| eager-bf16 | {bench['rungs'][0]['adds']} | {bench['rungs'][0]['step_s']['median']:.4f} |" in md
    assert f"Card: {bench['environment']['device_name']}" in md
    for stage in record["stages"][:-1]:
        assert stage["command"] in md, f"provenance lacks the {stage['name']} command"
    for name, why in record["skipped_metrics"].items():
        assert why in md, f"the report does not say why {name} was skipped"

    shot, dom = chromium_render(out / "report" / "index.html", tmp_path)
    assert_screenshot(shot)
    assert_renders(parse(dom))


def test_readme_main_job_is_exactly_the_demo_command():
    readme = (ROOT / "README.md").read_text()
    main_job = readme.split("## The main job", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"```bash\n(.*?)```", main_job, re.DOTALL) == ["python -m flux2lab.demo\n"]
    assert readme.index('pip install -e ".[dev]"') < readme.index("## The main job")
    assert "`python -m flux2lab.demo" in readme and "`python -m flux2lab.report" in readme, "command table rows"


def test_the_default_run_is_the_builtin_plan_and_scales_up_on_a_gpu():
    assert demo.build_parser().parse_args([]).out == Path("experiments/demo")
    assert demo.choose_plan("tiny", "cpu", quick=False) == demo.PLANS["builtin"]
    full = demo.choose_plan("black-forest-labs/FLUX.2-dev", "cuda", quick=False)
    assert full.steps == 50 and full.size is None  # the model's native 1024x1024
    assert demo.default_model() in ("mini", "tiny")


@pytest.mark.parametrize("args, message", [
    (["--model", "full-random"], "has no VAE"),
    (["--model", "black-forest-labs/FLUX.2-dev", "--device", "cpu"], "needs a CUDA GPU"),
])
def test_models_the_demo_cannot_run_here_fail_before_any_work(tmp_path, capsys, no_network, args, message):
    with pytest.raises(SystemExit) as exit_:
        run_main(demo.main, [*args, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_rerun_replaces_only_the_previous_demo(tmp_path):
    out = tmp_path / "out"
    (out / "run").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(Flux2LabError, match="not empty and holds no earlier demo"):
        demo.prepare_out(out)
    (out / "demo.json").write_text("{}")
    (out / "studies.db").write_text("")
    demo.prepare_out(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_thresholds_are_read_off_the_fit():
    assert demo.thresholds_from_fit({"skip_limits": {"floor": 0.08}}, (0.5, 1.5, 2.5)) == [0.04, 0.12, 0.2]
    from flux2lab.study import default_space

    assert (demo.thresholds_from_fit({"skip_limits": {"floor": 0.0}}, (0.5, 1.5))
            == default_space(50)["teacache"]["threshold"][:2])
