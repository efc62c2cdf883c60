"""Bad inputs across every command: refused with exit 2 and `error: ...` naming the flag, file or field, before
any model is loaded wherever the mistake is knowable then (issue 15, deliverables 4 and 5).

Each case runs a command's main(argv) in this process the way `python -m flux2lab.<command>` does
(`flux2lab.cli.run_main`). Loading a model raises AssertionError("model loaded"), so a mistake found only after
loading fails its case as a late failure; a traceback fails it with its own type, and an accepted input fails it
with exit 0. argparse's own refusals (`usage: ...` then `PROG: error: argument --flag: ...`, exit 2) count as
clear errors too.
"""

from __future__ import annotations

import importlib
import json
import shlex
from pathlib import Path

import pytest

from flux2lab.cli import run_main

BIG_SEED = str(2**63)  # one past the largest seed torch takes
FOLDER = ("folder", "directory")  # an `expect` entry that is a tuple: any one of its words
TEXT = "this is not a weight file, an image or a model\n"


@pytest.fixture
def ws(tmp_path):
    """Files the cases point at, by name: good inputs, and each kind of bad one."""
    from flux2lab.pipeline.frozen import freeze
    from flux2lab.pipeline.recipe import Recipe

    def write(name: str, content: str | bytes) -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def manifest(name: str, *rows: dict) -> str:
        return write(name, "".join(json.dumps(r) + "\n" for r in rows))

    (tmp_path / "adir").mkdir()
    (tmp_path / "refs" / "adir.png").mkdir(parents=True)
    write("refs/fake.png", TEXT)
    for name, x, y in (("good", lambda p, s: 0.02 * s + 0.003 * p, lambda x, p, s: 2 * x + 0.5 * x * x + 0.001 * p),
                       ("degenerate", lambda p, s: 0.1 * (1 + s % 2), lambda x, p, s: x + 0.01 * ((p * s) % 3)),
                       ("flat", lambda p, s: 0.02 * s + 0.003 * p, lambda x, p, s: 0.5)):
        calibration_run(tmp_path / "cal" / name, x, y)
    return {
        "tmp": str(tmp_path),
        "out": str(tmp_path / "out"),
        "folder": str(tmp_path / "adir"),
        "missing": str(tmp_path / "missing.jsonl"),
        "file": write("file.txt", TEXT),
        "prompts": manifest("prompts.jsonl", {"prompt": "a red circle"}, {"prompt": "a blue square"}),
        "recipe": str(Recipe(steps=2, height=32, width=32).save(tmp_path / "recipe.json")),
        "frozen": str(freeze(Recipe(steps=2, height=32, width=32), "tiny").save(tmp_path / "frozen.json")),
        "fit": write("fit.json", json.dumps({"coefficients": [1.0, 0.0]})),
        "latin1_jsonl": write("latin1.jsonl", '{"prompt": "café"}\n'.encode("latin-1")),
        "latin1_txt": write("latin1.txt", "café au lait\n".encode("latin-1")),
        "latin1_json": write("latin1.json", '{"steps": 2, "guidance": 4.0} # café'.encode("latin-1")),
        "latin1_fit": write("latin1_fit.json", '{"coefficients": [1.0, 0.0], "note": "é"}'.encode("latin-1")),
        "latin1_grid": write("latin1_grid.json", '{"threshold": [0.1], "note": "é"}'.encode("latin-1")),
        "big_seed_manifest": manifest("big_seed.jsonl", {"prompt": "a red circle", "seed": 2**63}),
        "not_image_manifest": manifest("refs/m.jsonl", {"prompt": "edit it", "images": ["fake.png"]}),
        "folder_image_manifest": manifest("refs/d.jsonl", {"prompt": "edit it", "images": ["adir.png"]}),
        "escaping_id_manifest": manifest("ids.jsonl", {"prompt": "a red circle", "id": "../../escaped"}),
    }


@pytest.fixture
def no_model(monkeypatch):
    """Every way a command loads a model or starts training raises AssertionError("model loaded")."""
    from flux2lab.pipeline import models
    from flux2lab.zoo import mini, train

    def loaded(*args, **kwargs):
        raise AssertionError("model loaded")

    for name in list(models.BUILTIN):
        monkeypatch.setitem(models.BUILTIN, name, loaded)
    monkeypatch.setattr(models.Flux2Pipeline, "from_pretrained", loaded)
    for name in ("build_mini", "build_vae", "build_transformer", "build_frozen_text_encoder"):
        monkeypatch.setattr(mini, name, loaded)
    for name in ("train_vae", "train_yardstick", "train_transformer"):
        monkeypatch.setattr(train, name, loaded)


CAL_STEPS = 6


def calibration_run(folder, x, y, prompts: int = 8, torn: bool = False) -> None:
    """A recorded calibration run (run.json, samples.csv) with x(prompt, step) and y(x, prompt, step)."""
    from flux2lab.calibration import FIELDS

    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({
        "model": "tiny", "revision": None, "steps": CAL_STEPS, "height": 32, "width": 32, "guidance": 4.0,
        "manifest": "prompts.jsonl", "prompts": prompts}))
    rows = [",".join(FIELDS)]
    for p in range(prompts):
        for s in range(1, CAL_STEPS):
            row = {"prompt_id": f"p{p}", "kind": "t2i", "seed": p, "step": s, "timestep": 1000 - 150 * s,
                   "x": x(p, s), "y": y(x(p, s), p, s)}
            rows.append(",".join(str(row[f]) for f in FIELDS))
    text = "\n".join(rows) + "\n"
    (folder / "samples.csv").write_text(text[: text.rstrip("\n").rfind(",")] if torn else text)


COMMANDS = {
    "generate": "flux2lab.generate", "calibrate": "flux2lab.calibrate", "search": "flux2lab.search",
    "compare": "flux2lab.compare", "frozen": "flux2lab.frozen", "run": "flux2lab.run", "bench": "flux2lab.bench",
    "report": "flux2lab.report", "demo": "flux2lab.demo", "zoo.evaluate": "flux2lab.zoo.evaluate",
    "zoo.world": "flux2lab.zoo.world", "zoo.train": "flux2lab.zoo.train",
}


def run_command(command: str, argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of `python -m flux2lab.<command> ARGV`, run in this process (its stdout is left for
    the caller's `capsys.readouterr().out`)."""
    main = importlib.import_module(COMMANDS[command]).main
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_main(main, argv)
    out, err = capsys.readouterr()
    print(out, end="")
    return exited.value.code, err


def assert_refused(command: str, argv: list[str], expect: tuple[str | tuple[str, ...], ...], capsys) -> str:
    code, err = run_command(command, argv, capsys)
    assert code == 2, f"exit status {code} (accepted): {command} {shlex.join(argv)}\nstderr: {err[-2000:]}"
    argparse_error = err.startswith("usage: ") and ": error: " in err
    assert err.startswith("error: ") or argparse_error, f"not a user error:\n{err[-2000:]}"
    for want in expect:
        words = (want,) if isinstance(want, str) else want
        assert any(w.lower() in err.lower() for w in words), f"the message does not name {want!r}:\n{err}"
    return err


# Common tails: tiny, two steps, small images, outputs under tmp.
GEN = "--model tiny --steps 2 --height 32 --width 32 --prompt x"
CAL = "--model tiny --steps 3 --height 32 --width 32 --name c --out {tmp}/cal --prompts {prompts}"
CMP = "--model tiny --b nvfp4 --steps 2 --height 32 --width 32 --metrics psnr,ssim --cache {tmp}/cache"
SRCH = "--study s --experiments {tmp}/exp --model tiny --steps 2 --height 32 --width 32 --skip-missing"
RUN = "--config {frozen} --prompts {prompts}"
BENCH = "--model tiny --steps 2 --height 32 --width 32 --reps 1 --warmup 0 --no-floor --ladder eager-bf16 " \
        "--teacache-schedule 0"
EVAL = "--model tiny --n 2 --steps 2"
TRAIN = "--smoke --no-eval --max-steps 1"
DEMO = "--quick --model tiny"

CASES = [
    # --- out-of-range numbers
    pytest.param("generate", GEN + " --out {out} --steps 0", ("steps",), id="generate-steps-0"),
    pytest.param("generate", GEN + " --out {out} --steps -1", ("steps",), id="generate-steps-neg"),
    pytest.param("generate", GEN + " --out {out} --seed -1", ("seed", "-1"), id="generate-seed-neg"),
    pytest.param("generate", GEN + " --out {out} --seed " + BIG_SEED, ("seed",), id="generate-seed-2**63"),
    pytest.param("generate", "--model tiny --prompts {big_seed_manifest} --out {out}", ("seed", "line 1"),
                 id="generate-manifest-seed-2**63"),
    pytest.param("generate", GEN + " --out {out} --height 20", ("height",), id="generate-height-not-16x"),
    pytest.param("generate", "--model tiny --prompt a --prompt b --out {out} --seed " + str(2**63 - 1), ("seed",),
                 id="generate-seed-overflows-with-prompts"),
    pytest.param("generate", GEN + " --out {out} --dtype fp64", ("--dtype",), id="generate-dtype-unknown"),
    pytest.param("run", RUN + " --out {out} --seed " + str(2**63 - 1), ("--seed",), id="run-seed-overflows-with-prompts"),
    pytest.param("calibrate", CAL + " --steps 0", ("steps",), id="calibrate-steps-0"),
    pytest.param("calibrate", CAL + " --steps 1", ("steps",), id="calibrate-steps-1"),
    pytest.param("calibrate", CAL + " --limit 0", ("--limit",), id="calibrate-limit-0"),
    pytest.param("calibrate", CAL + " --limit -1", ("--limit",), id="calibrate-limit-neg"),
    pytest.param("calibrate", CAL + " --seed -1", ("seed",), id="calibrate-seed-neg"),
    pytest.param("calibrate", CAL + " --degree 0", ("--degree",), id="calibrate-degree-0"),
    pytest.param("calibrate", CAL + " --degree 7", ("--degree",), id="calibrate-degree-7"),
    pytest.param("calibrate", CAL + " --ret-steps -1", ("--ret-steps",), id="calibrate-ret-steps-neg"),
    pytest.param("calibrate", "--name good --out {tmp}/cal --fit-only --ret-steps -1", ("--ret-steps",),
                 id="calibrate-fit-only-ret-steps-neg"),
    pytest.param("calibrate", "--name good --out {tmp}/cal --fit-only --ret-steps 7", ("--ret-steps",),
                 id="calibrate-fit-only-ret-steps-over-steps"),
    pytest.param("calibrate", "--name good --out {tmp}/cal --fit-only --degree 0", ("--degree",),
                 id="calibrate-fit-only-degree-0"),
    pytest.param("calibrate", CAL + " --shard 2/2", ("--shard",), id="calibrate-shard-out-of-range"),
    pytest.param("compare", CMP + " --prompts {prompts} --out {out} --limit 0", ("--limit",), id="compare-limit-0"),
    pytest.param("compare", CMP + " --prompts {prompts} --out {out} --limit -1", ("--limit",),
                 id="compare-limit-neg"),
    pytest.param("compare", CMP + " --prompts {prompts} --out {out} --seed -1", ("seed",), id="compare-seed-neg"),
    pytest.param("compare", CMP + " --prompts {prompts} --out {out} --steps 0", ("steps",), id="compare-steps-0"),
    pytest.param("search", SRCH + " --prompts {prompts} --seed -1", ("seed",), id="search-seed-neg"),
    pytest.param("search", SRCH + " --prompts {prompts} --steps 0", ("steps",), id="search-steps-0"),
    pytest.param("search", SRCH + " --prompts {prompts} --workers 0", ("--workers",), id="search-workers-0"),
    pytest.param("search", SRCH + " --prompts {prompts} --keep-pipelines 0", ("--keep-pipelines",),
                 id="search-keep-pipelines-0"),
    pytest.param("search", SRCH + " --prompts {prompts} --sampler tpe --n-trials 0", ("--n-trials",),
                 id="search-n-trials-0"),
    pytest.param("search", SRCH + " --prompts {prompts} --threshold -0.1", ("threshold",),
                 id="search-threshold-neg"),
    pytest.param("search", SRCH + " --prompts {prompts} --ret-steps -1", ("ret",), id="search-ret-steps-neg"),
    pytest.param("run", RUN + " --out {out} --pg-timeout 0", ("--pg-timeout",), id="run-pg-timeout-0"),
    pytest.param("run", RUN + " --out {out} --pg-timeout -5", ("--pg-timeout",), id="run-pg-timeout-neg"),
    pytest.param("run", RUN + " --out {out} --warmup -1", ("--warmup",), id="run-warmup-neg"),
    pytest.param("run", RUN + " --out {out} --seed -1", ("seed",), id="run-seed-neg"),
    pytest.param("bench", BENCH + " --out {out} --reps 0", ("--reps",), id="bench-reps-0"),
    pytest.param("bench", BENCH + " --out {out} --steps 0", ("steps",), id="bench-steps-0"),
    pytest.param("bench", BENCH + " --out {out} --warmup -1", ("--warmup",), id="bench-warmup-neg"),
    pytest.param("bench", BENCH + " --out {out} --timed-steps 0", ("--timed-steps",), id="bench-timed-steps-0"),
    pytest.param("bench", BENCH + " --out {out} --gpus 0", ("--gpus",), id="bench-gpus-0"),
    pytest.param("demo", DEMO + " --out {out} --budget -1", ("--budget",), id="demo-budget-neg"),
    pytest.param("demo", DEMO + " --out {out} --budget nan", ("--budget",), id="demo-budget-nan"),
    pytest.param("zoo.evaluate", EVAL + " --batch-size 0", ("--batch-size",), id="evaluate-batch-size-0"),
    pytest.param("zoo.evaluate", EVAL + " --batch-size -1", ("--batch-size",), id="evaluate-batch-size-neg"),
    pytest.param("zoo.evaluate", EVAL + " --seed -1", ("--seed",), id="evaluate-seed-neg"),
    pytest.param("zoo.evaluate", "--model tiny --n 1", ("--n",), id="evaluate-n-1"),
    pytest.param("zoo.world", "--out {tmp}/w.jsonl --n 2 --seed -1", ("--seed",), id="world-seed-neg"),
    pytest.param("zoo.world", "--out {tmp}/w.jsonl --n 0", ("--n",), id="world-n-0"),
    pytest.param("zoo.train", TRAIN + " --out {out} --budget-s -1", ("--budget-s",), id="train-budget-neg"),
    pytest.param("zoo.train", TRAIN + " --out {out} --batch 0", ("--batch",), id="train-batch-0"),
    pytest.param("zoo.train", TRAIN + " --out {out} --max-steps 0", ("--max-steps",), id="train-max-steps-0"),
    pytest.param("zoo.train", "--smoke --max-steps 1 --out {out} --eval-steps 0", ("--eval-steps",),
                 id="train-eval-steps-0"),

    # --- 0 is not "not given" (more above: --steps 0, --limit 0, --timed-steps 0, --max-steps 0)
    pytest.param("zoo.evaluate", EVAL + " --steps 0", ("steps",), id="evaluate-steps-0-is-given"),
    pytest.param("search", SRCH + " --prompts {prompts} --sampler-seed -1", ("seed",),
                 id="search-sampler-seed-neg"),

    # --- non-UTF-8 files
    pytest.param("generate", "--model tiny --prompts {latin1_jsonl} --out {out}", ("latin1.jsonl", "utf-8"),
                 id="generate-prompts-latin1-jsonl"),
    pytest.param("generate", "--model tiny --prompts {latin1_txt} --out {out}", ("latin1.txt", "utf-8"),
                 id="generate-prompts-latin1-txt"),
    pytest.param("generate", GEN + " --out {out} --recipe {latin1_json}", ("latin1.json",),
                 id="generate-recipe-latin1"),
    pytest.param("calibrate", CAL.replace("{prompts}", "{latin1_jsonl}"), ("latin1.jsonl", "utf-8"),
                 id="calibrate-prompts-latin1"),
    pytest.param("compare", CMP + " --prompts {prompts} --out {out} --a {latin1_json}", ("latin1.json",),
                 id="compare-recipe-latin1"),
    pytest.param("compare", CMP + " --prompts {prompts} --out {out} --b teacache@{latin1_fit}", ("latin1_fit.json",),
                 id="compare-fit-latin1"),
    pytest.param("search", SRCH + " --prompts {latin1_jsonl}", ("latin1.jsonl", "utf-8"),
                 id="search-prompts-latin1"),
    pytest.param("search", SRCH + " --prompts {prompts} --calibration {latin1_fit}", ("latin1_fit.json",),
                 id="search-calibration-latin1"),
    pytest.param("search", SRCH + " --prompts {prompts} --grid {latin1_grid}", ("latin1_grid.json",),
                 id="search-grid-latin1"),
    pytest.param("run", "--config {latin1_json} --prompts {prompts} --out {out}", ("latin1.json", "utf-8"),
                 id="run-config-latin1"),
    pytest.param("run", "--config {frozen} --prompts {latin1_txt} --out {out}", ("latin1.txt", "utf-8"),
                 id="run-prompts-latin1"),
    pytest.param("frozen", "{latin1_json} --out {tmp}/f.json --model tiny", ("latin1.json", "utf-8"),
                 id="frozen-source-latin1"),

    # --- missing files
    pytest.param("generate", "--model tiny --prompts {missing} --out {out}", ("missing.jsonl",),
                 id="generate-prompts-missing"),
    pytest.param("generate", GEN + " --out {out} --recipe {tmp}/nope.json", ("nope.json",),
                 id="generate-recipe-missing"),
    pytest.param("calibrate", CAL.replace("{prompts}", "{missing}"), ("missing.jsonl",),
                 id="calibrate-prompts-missing"),
    pytest.param("calibrate", "--name nothing --out {tmp}/cal --fit-only", ("nothing",),
                 id="calibrate-fit-only-no-run"),
    pytest.param("compare", CMP + " --prompts {missing} --out {out}", ("missing.jsonl",),
                 id="compare-prompts-missing"),
    pytest.param("compare", CMP + " --prompts {prompts} --out {out} --b teacache@{tmp}/nofit.json", ("nofit.json",),
                 id="compare-fit-missing"),
    pytest.param("compare", "--model tiny --b nvfp4 --metrics lpips --lpips-weights {tmp}/nope.pth --prompts "
                 "{prompts} --out {out}", ("nope.pth",), id="compare-lpips-weights-missing"),
    pytest.param("search", SRCH + " --prompts {missing}", ("missing.jsonl",), id="search-prompts-missing"),
    pytest.param("search", SRCH + " --prompts {prompts} --calibration {tmp}/nofit.json", ("nofit.json",),
                 id="search-calibration-missing"),
    pytest.param("search", SRCH + " --prompts {prompts} --grid {tmp}/nogrid.json", ("nogrid.json",),
                 id="search-grid-missing"),
    pytest.param("run", "--config {tmp}/nocfg.json --prompts {prompts} --out {out}", ("nocfg.json",),
                 id="run-config-missing"),
    pytest.param("run", "--config {frozen} --prompts {missing} --out {out}", ("missing.jsonl",),
                 id="run-prompts-missing"),
    pytest.param("bench", BENCH + " --out {out} --recipe {tmp}/nope.json", ("nope.json",), id="bench-recipe-missing"),
    pytest.param("report", "--experiments {tmp}/noexp --out {out}", ("noexp",), id="report-experiments-missing"),
    pytest.param("report", "--bench {tmp}/nobench --out {out}", ("nobench",), id="report-bench-missing"),
    pytest.param("frozen", "{tmp}/nocfg.json --check", ("nocfg.json",), id="frozen-source-missing"),
    pytest.param("zoo.evaluate", EVAL + " --yardstick-weights {tmp}/noys.safetensors", ("noys.safetensors",),
                 id="evaluate-yardstick-missing"),
    pytest.param("zoo.train", TRAIN + " --out {out} --resume {tmp}/norun", ("norun",), id="train-resume-missing"),

    # --- folders given as files
    pytest.param("generate", "--model tiny --prompts {folder} --out {out}", ("adir", FOLDER), id="generate-prompts-dir"),
    pytest.param("generate", GEN + " --out {out} --recipe {folder}", ("adir", FOLDER), id="generate-recipe-dir"),
    pytest.param("compare", CMP + " --prompts {folder} --out {out}", ("adir", FOLDER), id="compare-prompts-dir"),
    pytest.param("compare", CMP + " --prompts {prompts} --out {out} --b teacache@{folder}", ("adir", FOLDER),
                 id="compare-fit-dir"),
    pytest.param("search", SRCH + " --prompts {prompts} --calibration {folder}", ("adir", FOLDER),
                 id="search-calibration-dir"),
    pytest.param("search", SRCH + " --prompts {prompts} --grid {folder}", ("adir", FOLDER), id="search-grid-dir"),
    pytest.param("run", "--config {folder} --prompts {prompts} --out {out}", ("adir", FOLDER), id="run-config-dir"),
    pytest.param("bench", BENCH + " --out {out} --recipe {folder}", ("adir", FOLDER), id="bench-recipe-dir"),
    pytest.param("frozen", "{folder} --check", ("adir", FOLDER), id="frozen-source-dir"),

    # --- files given as output folders
    pytest.param("generate", GEN + " --out {file}", ("file.txt",), id="generate-out-file"),
    pytest.param("generate", GEN + " --out {file}/x", ("file.txt",), id="generate-out-under-file"),
    pytest.param("calibrate", CAL.replace("{tmp}/cal", "{file}"), ("file.txt",), id="calibrate-out-file"),
    pytest.param("compare", CMP + " --prompts {prompts} --out {file}", ("file.txt",), id="compare-out-file"),
    pytest.param("compare", CMP + " --prompts {prompts} --out {out} --cache {file}", ("file.txt",),
                 id="compare-cache-file"),
    pytest.param("search", SRCH.replace("{tmp}/exp", "{file}") + " --prompts {prompts}", ("file.txt",),
                 id="search-experiments-file"),
    pytest.param("run", RUN + " --out {file}", ("file.txt",), id="run-out-file"),
    pytest.param("bench", BENCH + " --out {file}", ("file.txt",), id="bench-out-file"),
    pytest.param("report", "--experiments {tmp} --out {file}", ("file.txt",), id="report-out-file"),
    pytest.param("demo", DEMO + " --out {file}", ("file.txt",), id="demo-out-file"),
    pytest.param("frozen", "{recipe} --model tiny --out {file}/x.json", ("file.txt",), id="frozen-out-under-file"),
    pytest.param("frozen", "{recipe} --model tiny --out {folder}", ("adir", FOLDER), id="frozen-out-dir"),
    pytest.param("frozen", "{recipe} --model tiny --out {file}", ("--force",), id="frozen-out-exists"),
    pytest.param("zoo.evaluate", EVAL + " --out {file}/x.json", ("file.txt",), id="evaluate-out-under-file"),
    pytest.param("zoo.evaluate", EVAL + " --out {folder}", ("adir", FOLDER), id="evaluate-out-dir"),
    pytest.param("zoo.world", "--out {file}/w.jsonl --n 2", ("file.txt",), id="world-out-under-file"),
    pytest.param("zoo.world", "--out {folder} --n 2", ("adir", FOLDER), id="world-out-dir"),
    pytest.param("zoo.train", TRAIN + " --out {file}", ("file.txt",), id="train-out-file"),

    # --- device names
    *[pytest.param(cmd, tail + " --device gpu0", ("--device", "gpu0"), id=f"{cmd}-device-unknown")
      for cmd, tail in (("generate", GEN + " --out {out}"), ("calibrate", CAL),
                        ("compare", CMP + " --prompts {prompts} --out {out}"), ("search", SRCH + " --prompts {prompts}"),
                        ("run", RUN + " --out {out}"), ("bench", BENCH + " --out {out}"),
                        ("demo", DEMO + " --out {out}"), ("zoo.evaluate", EVAL), ("zoo.train", TRAIN + " --out {out}"))],
    pytest.param("generate", GEN + " --out {out} --device cuda:x", ("--device", "cuda:x"), id="generate-device-index"),

    # --- unknown models
    pytest.param("generate", "--model tyni --prompt x --out {out}", ("tyni", "unknown"), id="generate-model-unknown"),
    pytest.param("calibrate", CAL.replace("tiny", "tyni"), ("tyni", "unknown"), id="calibrate-model-unknown"),
    pytest.param("compare", CMP.replace("tiny", "tyni") + " --prompts {prompts} --out {out}", ("tyni", "unknown"),
                 id="compare-model-unknown"),
    pytest.param("search", SRCH.replace("tiny", "tyni") + " --prompts {prompts}", ("tyni", "unknown"),
                 id="search-model-unknown"),
    pytest.param("run", RUN + " --out {out} --model tyni", ("tyni", "unknown"), id="run-model-unknown"),
    pytest.param("bench", BENCH.replace("tiny", "tyni") + " --out {out}", ("tyni", "unknown"),
                 id="bench-model-unknown"),
    pytest.param("zoo.evaluate", EVAL.replace("tiny", "tyni"), ("tyni", "unknown"), id="evaluate-model-unknown"),
    pytest.param("generate", "--model {tmp}/no/such/folder --prompt x --out {out}",
                 ("no/such/folder", ("does not exist", "no such")), id="generate-model-missing-folder"),

    # --- weight files that are not weights
    *[pytest.param("compare", f"--model tiny --b nvfp4 --metrics {m} --{m}-weights {{file}} --prompts {{prompts}} "
                   "--out {out} --cache {tmp}/cache", ("file.txt",), id=f"compare-{m}-weights-text")
      for m in ("lpips", "fid", "clip")],
    pytest.param("search", SRCH + " --prompts {prompts} --lpips-weights {file}", ("file.txt",),
                 id="search-lpips-weights-text"),
    pytest.param("zoo.evaluate", EVAL + " --baseline bf16 --lpips-weights {file}", ("file.txt",),
                 id="evaluate-lpips-weights-text"),
    pytest.param("zoo.evaluate", EVAL + " --yardstick-weights {file}", ("file.txt",),
                 id="evaluate-yardstick-weights-text"),

    # --- names that escape the output folder
    pytest.param("calibrate", CAL.replace("--name c", "--name ../escaped"), ("--name",), id="calibrate-name-dotdot"),
    pytest.param("calibrate", CAL.replace("--name c", "--name {tmp}/abs"), ("--name",), id="calibrate-name-absolute"),
    pytest.param("search", SRCH.replace("--study s", "--study ../x") + " --prompts {prompts}", ("--study",),
                 id="search-study-dotdot"),
    pytest.param("compare", CMP + " --prompts {escaping_id_manifest} --out {out}", ("id", "line 1"),
                 id="compare-manifest-id-escapes"),

    # --- reference images that are not images
    pytest.param("generate", "--model tiny --prompts {not_image_manifest} --out {out}", ("fake.png", "line 1"),
                 id="generate-reference-not-image"),
    pytest.param("calibrate", CAL.replace("{prompts}", "{not_image_manifest}"), ("fake.png", "images"),
                 id="calibrate-reference-not-image"),
    pytest.param("generate", "--model tiny --prompts {folder_image_manifest} --out {out}", ("adir.png", FOLDER),
                 id="generate-reference-is-folder"),

    # --- storages that cannot be opened
    pytest.param("report", "--storage bogus://nowhere --out {out}", ("bogus://nowhere",), id="report-storage-scheme"),
    pytest.param("report", "--storage sqlite:///{tmp}/no/such/dir/x.db --out {out}", ("x.db",),
                 id="report-storage-unopenable"),
    pytest.param("search", "--study s --storage bogus://nowhere --prompts {prompts} --skip-missing",
                 ("bogus://nowhere",), id="search-storage-scheme"),
]


@pytest.mark.parametrize(("command", "argv", "expect"), CASES)
def test_bad_input_is_refused_before_model_work(command, argv, expect, ws, capsys, no_model):
    assert_refused(command, shlex.split(argv.format(**ws)), expect, capsys)


@pytest.mark.parametrize(("first", "again", "field"), [
    ("--threshold 0.1", "--threshold 0.2", "threshold"),
    pytest.param("--steps 2", "--steps 3", "steps"),
    ("--seed 0", "--seed 1", "seed"),
])
def test_a_study_rerun_with_a_changed_field_names_the_field(first, again, field, ws, capsys, no_model):
    argv = "--study s --experiments {tmp}/exp --model tiny --height 32 --width 32 --skip-missing --prompts {prompts} "
    with pytest.raises(AssertionError, match="model loaded"):  # the study is stored before its first trial loads
        run_command("search", shlex.split((argv + first).format(**ws)), capsys)
    assert_refused("search", shlex.split((argv + again).format(**ws)), (field,), capsys)


def test_a_degenerate_fit_is_refused(ws, capsys, no_model):
    assert_refused("calibrate", shlex.split("--name degenerate --out {tmp}/cal --fit-only".format(**ws)),
                   ("--degree", "distinct"), capsys)


def test_a_fit_of_y_without_variance_reports_r2_undefined(ws, capsys, no_model):
    code, _ = run_command("calibrate", shlex.split("--name flat --out {tmp}/cal --fit-only".format(**ws)), capsys)
    out = capsys.readouterr().out
    assert code == 0 and "undefined" in out
    assert json.loads((Path(ws["tmp"]) / "cal" / "flat" / "fit.json").read_text())["r2"] is None


def test_a_torn_last_line_of_calibration_samples_is_dropped_not_merged(tmp_path, capsys, no_model):
    run = tmp_path / "cal" / "torn"
    calibration_run(run, lambda p, s: 0.02 * s + 0.003 * p, lambda x, p, s: 2 * x + 0.001 * p, torn=True)
    code, err = run_command("calibrate", ["--name", "torn", "--out", str(tmp_path / "cal"), "--fit-only"], capsys)
    assert code == 0, err
    fit = json.loads((run / "fit.json").read_text())
    assert fit["prompts"] == 7 and fit["samples"] == 7 * (CAL_STEPS - 1)  # the torn prompt is left out whole
    text = (run / "samples.csv").read_text()
    assert text.endswith("\n") and "p7" not in text


# --- with the tiny model itself: what only shows while recording, running or denoising


def test_a_resumed_calibration_with_another_seed_refuses_or_records_anew(ws, capsys):
    argv = "--model tiny --steps 6 --height 32 --width 32 --degree 1 --name c --out {tmp}/cal --prompts {prompts}"
    code, err = run_command("calibrate", shlex.split((argv + " --seed 0").format(**ws)), capsys)
    assert code == 0, err
    code, err = run_command("calibrate", shlex.split((argv + " --seed 7").format(**ws)), capsys)
    if code == 2:
        assert err.startswith("error: ") and "seed" in err
    else:
        from flux2lab.calibration import read_rows

        assert code == 0, err
        assert {r["seed"] for r in read_rows(Path(ws["tmp"]) / "cal" / "c" / "samples.csv")} == {"7", "8"}


def test_a_torn_last_line_of_run_records_is_repaired_not_merged(ws, capsys):
    out = Path(ws["out"])
    out.mkdir()
    sha = json.loads(Path(ws["frozen"]).read_text())["sha256"]
    (out / "records.jsonl").write_text('{"id": "prompts-1", "config_sha256": "' + sha[:20])
    code, err = run_command("run", shlex.split((RUN + " --out {out}").format(**ws)), capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["prompts-1", "prompts-2"]


@pytest.mark.parametrize("steps", [3, 5])
def test_teacache_with_another_step_count_is_refused_at_step_0(steps, one_thread):
    import torch

    from flux2lab.common.errors import Flux2LabError
    from flux2lab.hooks import teacache
    from flux2lab.pipeline.core import apply
    from flux2lab.pipeline.models import load_pipeline, model_info
    from flux2lab.pipeline.recipe import Recipe

    pipe = load_pipeline("tiny", device="cpu")
    apply(pipe, Recipe(steps=4, height=32, width=32).replace(cache={"method": "teacache", "ret_steps": 0}))
    teacache.reset_teacache(pipe.transformer)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    info = model_info(pipe)
    with pytest.raises(Flux2LabError, match="steps"):
        pipe(prompt="a red circle", height=32, width=32, num_inference_steps=steps, output_type="latent",
             max_sequence_length=info.max_sequence_length, text_encoder_out_layers=info.text_encoder_out_layers,
             generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1  # refused at step 0, before any step was computed
