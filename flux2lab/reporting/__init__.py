"""The quality/speed tradeoff report: what an experiments folder holds, as one HTML page and one markdown file.

Results are shared as reports, so the report reads exactly what the stages wrote (DESIGN.md's data flow) and
nothing else: calibration runs (`fit.json` + `fit.png`), Optuna studies (`studies.db`), comparisons
(`metrics.json` + `grid.png`), frozen configs, run outputs (`summary.json` + `records.jsonl`), benchmarks
(`bench.json` + `bench.png`) and the demo's own record (`demo.json`). Each kind found becomes a section;
provenance (versions, commands, hashes) is always there.

`index.html` embeds every image as a base64 data URI and has no script and no external link, so it opens
anywhere, offline, as one file. `index.md` has the same content with the images as files in `images/`.

    report = build("experiments/demo", bench_dirs=["reports/benchmarks/h100"])
    paths = write(report, "reports/demo")          # {"html": ..., "markdown": ..., "images": ...}
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flux2lab import dist_version
from flux2lab.common.errors import Flux2LabError
from flux2lab.quality.comparison import DEFAULT_METRICS

# ---------------------------------------------------------------------------------------------- document


@dataclass
class Figure:
    """A PNG and what it shows; `name` becomes the file name beside index.md."""

    png: bytes
    caption: str
    name: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Text:
    """A paragraph; `code` spans are written between backticks."""

    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Code:
    text: str


@dataclass
class Heading:
    text: str


Block = Figure | Table | Text | Bullets | Code | Heading


@dataclass
class Section:
    id: str  # anchor in the HTML page (the screenshot test looks for these)
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Report:
    title: str
    source: str
    created: str
    sections: list[Section]

    def section(self, id: str) -> Section | None:
        return next((s for s in self.sections if s.id == id), None)


# How each quality number reads: label with unit, and which way is better. Shared by tables and plots.
METRIC_INFO = {
    "lpips": ("LPIPS (AlexNet)", "lower is better; 0 = identical"),
    "lpips_vgg": ("LPIPS (VGG)", "lower is better; 0 = identical"),
    "psnr": ("PSNR (dB)", "higher is better; inf = identical"),
    "ssim": ("SSIM", "higher is better; 1 = identical"),
    "fid": ("FID", "lower is better; set-level"),
    "clip_reference": ("CLIP score of A (points)", "prompt adherence of the reference"),
    "clip_candidate": ("CLIP score of B (points)", "prompt adherence of the candidate"),
    "clip_delta": ("CLIP score B - A (points)", "higher is better; 0 = no change"),
    "accuracy_reference": ("attribute accuracy of A (fraction)", "yardstick: prompt facts the image shows"),
    "accuracy_candidate": ("attribute accuracy of B (fraction)", "yardstick: prompt facts the image shows"),
    "accuracy_delta": ("attribute accuracy B - A (fraction)", "higher is better; 0 = no change"),
    "domain_fid": ("domain FID A vs B", "lower is better; yardstick features, set-level"),
}
# Paired quality metrics a search trial can be plotted on (change against the uncached reference).
TRIAL_METRICS = ("lpips", "psnr", "ssim", "clip_delta", "accuracy_delta", "domain_fid")


def model_note(source: str | None) -> str:
    """What a model's numbers can and cannot say (DESIGN.md: every quality claim names its model)."""
    if source == "tiny":
        return ("tiny: random weights. These numbers show the toolkit working; they say nothing about the "
                "image quality of FLUX.2 [dev].")
    if source == "full-random":
        return "full-random: the full-size architecture with random weights; good for speed only."
    if source == "mini":
        return ("mini: flux2lab's small FLUX.2 trained on a synthetic world of shapes; its numbers show how an "
                "acceleration behaves on a trained denoiser, not FLUX.2 [dev]'s own quality.")
    return f"{source}: pretrained weights."


# ---------------------------------------------------------------------------------------------- helpers


def _num(v: Any, spec: str = ".4g", unit: str = "") -> str:
    if v is None or v == "":
        return "—"
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(x):
        return "nan"
    return (f"{x:{spec}}" if math.isfinite(x) else ("inf" if x > 0 else "-inf")) + unit


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * float(v):.0f}%"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _json_hash(data: dict[str, Any]) -> str:
    from flux2lab.pipeline.frozen import json_sha256

    return json_sha256(data)[:12]


def _rel(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            pass
    return str(path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "figure"


def _png_figure(path: Path, caption: str, name: str) -> Figure | None:
    if not path.is_file():
        return None
    data = path.read_bytes()
    return Figure(data, caption, name) if data[:8] == b"\x89PNG\r\n\x1a\n" else None


def _render(fig, caption: str, name: str) -> Figure:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return Figure(buf.getvalue(), caption, name)


def describe_recipe(recipe: dict[str, Any]) -> str:
    """One line a reader can take in: precision, TeaCache, compile/graphs/GPUs, steps and size."""
    parts = [f"transformer {recipe.get('transformer_precision')}"]
    if recipe.get("text_encoder_precision") not in (None, "bf16"):
        parts.append(f"text encoder {recipe['text_encoder_precision']}")
    tc = recipe.get("teacache") or {}
    if tc.get("enabled"):
        parts.append(f"TeaCache threshold {tc.get('threshold'):g}, ret_steps {tc.get('ret_steps')}"
                     + (f", cutoff {tc['cutoff_steps']}" if tc.get("cutoff_steps") is not None else ""))
    else:
        parts.append("no TeaCache")
    parts += [name for name in ("compile", "cuda_graphs") if recipe.get(name)]
    if (recipe.get("ulysses_degree") or 1) > 1:
        parts.append(f"Ulysses x{recipe['ulysses_degree']}")
    size = (f"{recipe.get('width')}x{recipe.get('height')}" if recipe.get("height") else "native size")
    parts.append(f"{recipe.get('steps')} steps, {size}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- discovery


@dataclass
class Found:
    """The artefacts under an experiments folder (and extra benchmark folders), by kind."""

    root: Path | None
    calibrations: list[Path] = field(default_factory=list)  # run folders holding fit.json
    storages: list[str] = field(default_factory=list)  # Optuna storage URLs
    comparisons: list[Path] = field(default_factory=list)  # folders holding a compare metrics.json
    frozen: list[Path] = field(default_factory=list)  # frozen config files
    runs: list[Path] = field(default_factory=list)  # run output folders (summary.json + records.jsonl)
    benches: list[Path] = field(default_factory=list)  # folders holding bench.json
    demo: Path | None = None  # the demo's demo.json

    @property
    def empty(self) -> bool:
        return not (self.calibrations or self.storages or self.comparisons or self.frozen or self.runs
                    or self.benches)


_CACHE_KEY = re.compile(r"[0-9a-f]{24}")  # image cache entries (flux2lab.pipeline.imagecache): never anything else


def discover(experiments: str | Path | None, bench_dirs: Sequence[str | Path] = (),
             storages: Sequence[str] = ()) -> Found:
    """Walk the folder once and sort what the stages wrote by kind (by file name and content, not location)."""
    found = Found(Path(experiments) if experiments is not None else None, storages=list(storages))
    if experiments is not None:
        root = Path(experiments)
        if not root.is_dir():
            raise Flux2LabError(f"--experiments {root}: no such folder. Give the folder the stages wrote into "
                                "(e.g. experiments/ or the demo's --out).")
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            here = Path(folder)
            names = set(files)
            if "fit.json" in names and "run.json" in names:
                found.calibrations.append(here)
            if "studies.db" in names:
                found.storages.append(f"sqlite:///{(here / 'studies.db').resolve()}")
            if "metrics.json" in names and _is_comparison(_read_json(here / "metrics.json")):
                found.comparisons.append(here)
            if "summary.json" in names and "records.jsonl" in names:
                found.runs.append(here)
            if "bench.json" in names and _is_bench(_read_json(here / "bench.json")):
                found.benches.append(here)
            if "demo.json" in names and here == root:
                found.demo = here / "demo.json"
            for name in sorted(names):
                if name.endswith(".json") and not _CACHE_KEY.fullmatch(name[:-5]) and _is_frozen(here / name):
                    found.frozen.append(here / name)
    for d in bench_dirs:
        d = Path(d)
        if not _is_bench(_read_json(d / "bench.json")):
            raise Flux2LabError(f"--bench {d}: no bench.json from python -m flux2lab.bench there.")
        if d.resolve() not in {b.resolve() for b in found.benches}:
            found.benches.append(d)
    return found


def _is_comparison(data: Any) -> bool:
    return isinstance(data, dict) and {"a", "b", "metrics"} <= set(data)


def _is_bench(data: Any) -> bool:
    return isinstance(data, dict) and str(data.get("schema", "")).startswith("flux2lab.bench/")


def _is_frozen(path: Path) -> bool:
    try:
        if path.stat().st_size > 1_000_000:
            return False
        return '"flux2lab.frozen"' in path.read_text(errors="replace")
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- calibration


def calibration_section(runs: Sequence[Path], root: Path | None) -> Section:
    from flux2lab.pipeline.recipe import FLUX2_DEV_COEFFICIENTS

    sec = Section("calibration", "TeaCache calibration")
    sec.blocks.append(Text("Each step of an uncached run gives one point: x = how much the timestep-modulated "
                           "input of the first block changed (relative L1), y = how much the model output "
                           "changed. TeaCache rescales x with the fitted polynomial and skips steps while the "
                           "rescaled sum stays under its threshold."))
    for run in runs:
        fit = _read_json(run / "fit.json") or {}
        meta = fit.get("run") or _read_json(run / "run.json") or {}
        sec.blocks.append(Heading(f"{run.name} — model {meta.get('model')}, {meta.get('prompts')} prompts, "
                                  f"{meta.get('steps')} steps"))
        sec.blocks.append(Text(model_note(meta.get("model"))))
        fig = _png_figure(run / "fit.png", f"{run.name}: samples by kind with the degree-{fit.get('degree')} fit "
                          "(left) and residuals of held-out prompts against a fit on the other prompts (right). "
                          "Both axes: relative L1 change between consecutive steps (unitless).",
                          f"calibration-{_slug(run.name)}")
        sec.blocks.append(fig or Text(f"{_rel(run / 'fit.png', root)} is missing; rerun "
                                      f"`python -m flux2lab.calibrate --fit-only --name {run.name}`."))
        coeffs = fit.get("coefficients") or []
        degree = len(coeffs) - 1
        published = list(FLUX2_DEV_COEFFICIENTS) if degree == len(FLUX2_DEV_COEFFICIENTS) - 1 else []
        rows = [[f"x^{degree - i}" if degree - i > 1 else ("x" if degree - i == 1 else "1"), f"{c:.6e}",
                 f"{published[i]:.6e}" if published else "—"] for i, c in enumerate(coeffs)]
        sec.blocks.append(Table(["term", "fitted coefficient", "published FLUX.2 [dev] (NVIDIA)"], rows,
                                "Polynomial coefficients, highest degree first (numpy.poly1d order)."))
        held, res, pub = fit.get("heldout") or {}, fit.get("residual") or {}, fit.get("published_flux2_dev") or {}
        diag = [
            ["samples (prompts)", f"{fit.get('samples')} ({fit.get('prompts')})"],
            ["R² of the fit", _num(fit.get("r2"), ".4f")],
            ["held-out R² (prompts left out of the fit)",
             _num(held.get("r2"), ".4f") + f" on {held.get('prompts')} prompts"
             + (f" — {held['note']}" if held.get("note") else "")],
            ["residual std / median |r| / p95 |r|",
             f"{_num(res.get('std'))} / {_num(res.get('abs_median'))} / {_num(res.get('abs_p95'))}"],
            ["observed x range", " to ".join(_num(v) for v in fit.get("x_range") or [])],
            ["observed y range", " to ".join(_num(v) for v in fit.get("y_range") or [])],
            ["R² of the published coefficients on these samples", _num(pub.get("r2_on_these_samples"), ".4f")],
        ]
        for kind, k in (fit.get("per_kind") or {}).items():
            diag.append([f"{kind}: samples (prompts), R², mean residual",
                         (f"{k.get('samples')} ({k.get('prompts')}), {_num(k.get('r2'), '.4f')}, "
                         f"{_num(k.get('mean_residual'))}")])
        if fit.get("excluded_nonfinite"):
            diag.append(["samples left out (NaN/inf)", str(fit["excluded_nonfinite"])])
        sec.blocks.append(Table(["diagnostic", "value"], diag, "Fit diagnostics."))
        limits = fit.get("skip_limits") or {}
        if limits:
            sched = limits.get("schedule") or {}
            sec.blocks.append(Heading("Threshold advice"))
            sec.blocks.append(Bullets(list(limits.get("advice") or [])))
            sec.blocks.append(Table(
                ["threshold", "most consecutive skips", "most skipped (fraction)",
                 f"most skipped of {sched.get('steps')} steps (ret_steps {sched.get('ret_steps')})"],
                [[f"{t['threshold']:g}", "no bound" if t["max_consecutive_skips"] is None else
                  str(t["max_consecutive_skips"]), _pct(t["max_skipped_fraction"]), str(t["max_skipped_steps"])]
                 for t in limits.get("thresholds") or []],
                "What the fitted curve's lowest value over the observed x allows at each threshold (upper "
                "bounds: real runs skip fewer where the input changes more)."))
    return sec


# ---------------------------------------------------------------------------------------------- search


@dataclass
class _Study:
    name: str
    url: str
    config: Any  # flux2lab.study.StudyConfig
    trials: list  # every FrozenTrial
    front: set[int]
    frozen: dict[int, list[str]]  # trial number -> frozen config files made from it


def _load_studies(urls: Sequence[str], frozen: Sequence[Path], root: Path | None) -> tuple[list[_Study], list[str]]:
    import optuna

    from flux2lab import study as st

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    made_from: dict[str, dict[int, list[str]]] = {}
    for path in frozen:
        prov = (_read_json(path) or {}).get("provenance") or {}
        name = (prov.get("study") or {}).get("name")
        number = (prov.get("trial") or {}).get("number")
        if name is not None and number is not None:
            made_from.setdefault(name, {}).setdefault(int(number), []).append(_rel(path, root))
    studies, problems = [], []
    for url in urls:
        try:
            storage = st.open_storage(url)
            names = st.study_names(storage)
        except Flux2LabError as e:
            problems.append(str(e))
            continue
        for name in names:
            try:
                study, config = st.load_study(name, storage)
            except Flux2LabError as e:
                problems.append(f"{st.display_url(url)}: {e}")
                continue
            studies.append(_Study(name, url, config, study.get_trials(deepcopy=False),
                                  {t.number for t in study.best_trials}, made_from.get(name, {})))
    return studies, problems


def pareto_figure(s: _Study) -> Figure | None:
    """Speed against every quality metric, Pareto front joined, frozen trials starred.

    Drawn here rather than by flux2lab.study.plot_pareto because the report marks which point was frozen."""
    from matplotlib.figure import Figure as MplFigure
    from optuna.trial import TrialState

    from flux2lab.study import SPEED_METRICS, measured_metrics

    done = [t for t in s.trials if t.state == TrialState.COMPLETE]
    names = measured_metrics(done, TRIAL_METRICS)
    if not done or not names:
        return None
    speed_attr = SPEED_METRICS[s.config.speed_metric][0]
    by_time = s.config.speed_metric == "time"
    xlabel = "time per image (s), lower is faster" if by_time else "steps skipped (%), higher is faster"
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = MplFigure(figsize=(4.6 * cols, 3.9 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        pts = []
        for t in done:
            v = (t.user_attrs.get("metrics") or {}).get(name)
            if v is not None and math.isfinite(float(v)):
                x = float(t.user_attrs[speed_attr]) * (1 if by_time else 100)
                pts.append((x, float(v), t.number))
        hidden = sum(1 for t in done if name in (t.user_attrs.get("metrics") or {})) - len(pts)
        rest = [p for p in pts if p[2] not in s.front]
        best = sorted(p for p in pts if p[2] in s.front)
        ax.scatter([p[0] for p in rest], [p[1] for p in rest], c="0.6", s=22, label="trial")
        ax.plot([p[0] for p in best], [p[1] for p in best], "o-", c="tab:red", ms=6, label="Pareto front")
        for x, y, n in pts:
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
        stars = [p for p in pts if p[2] in s.frozen]
        if stars:
            ax.scatter([p[0] for p in stars], [p[1] for p in stars], marker="*", s=320, c="gold",
                       edgecolors="black", linewidths=1, zorder=5, label="frozen")
        label, better = METRIC_INFO.get(name, (name, ""))
        ax.set_xlabel(xlabel, fontsize=10)
        ax.set_ylabel(f"{label}\nvs uncached reference", fontsize=10)
        title = name + (" (objective)" if name == s.config.quality_metric else "") + f": {better.split(';')[0]}"
        if hidden:
            title += f"\n{hidden} trial(s) identical to the reference (inf) not drawn"
        ax.set_title(title, fontsize=10)
        ax.ticklabel_format(axis="y", useOffset=False)  # SSIM 0.99996 reads as such, not as an offset
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=9)
    fig.suptitle(f"study {s.name}: {s.config.model}, {len(done)} complete trials", fontsize=12)
    fig.tight_layout()
    return _render(fig, f"Study {s.name}: speed against each quality metric (measured against the uncached "
                        "reference on the same prompts and seeds). Red: the Pareto front of the study's two "
                        "objectives; gold star: the trial that was frozen; numbers are trial numbers.",
                   f"search-{_slug(s.name)}-pareto")


def search_section(studies: Sequence[_Study], problems: Sequence[str]) -> Section:
    from optuna.trial import TrialState

    from flux2lab.study import measured_metrics

    sec = Section("search", "Search: TeaCache settings against quality")
    for s in studies:
        c = s.config
        space = ", ".join(f"{k} {v}" for k, v in c.space.items())
        speed = "time per image" if c.speed_metric == "time" else "fraction of steps skipped"
        sec.blocks.append(Heading(f"Study {s.name} — model {c.model}, {len(c.prompts)} prompts"))
        sec.blocks.append(Text(f"Grid: {space} ({c.sampler} sampler). Objectives: {speed} and {c.quality_metric}. "
                               f"Base recipe: {describe_recipe(c.base_recipe)}. Coefficients: "
                               + (f"calibration fit {c.calibration['path']} (sha256 "
                                  f"{c.calibration['sha256'][:12]})" if c.calibration
                                  else "published FLUX.2 [dev] (NVIDIA)") + "."))
        sec.blocks.append(Text(model_note(c.model)))
        fig = pareto_figure(s)
        if fig:
            sec.blocks.append(fig)
        metric_names = measured_metrics(s.trials, TRIAL_METRICS)
        params = list(c.space)
        rows = []
        for t in sorted(s.trials, key=lambda t: t.number):
            a = t.user_attrs
            if t.state == TrialState.COMPLETE:
                m = a.get("metrics") or {}
                mark = ("★ frozen" if t.number in s.frozen else "") + (" front" if t.number in s.front else "")
                rows.append([str(t.number), *(str(t.params.get(p, "—")) for p in params), "complete",
                             _pct(a.get("skipped_fraction")), _num(a.get("time_per_image"), ".3f"),
                             _num(a.get("speedup"), ".2f", "x"),
                             *(_num(m.get(n), ".5g") for n in metric_names), mark.strip()])
            elif t.state == TrialState.FAIL:
                reason = a.get("fail_reason") or a.get("interrupted") or "interrupted"
                rows.append([str(t.number), *(str(t.params.get(p, "—")) for p in params), "failed",
                             *(["—"] * (3 + len(metric_names))), reason[:120]])
        sec.blocks.append(Table(
            ["trial", *params, "state", "steps skipped", "s/image", "speedup", *metric_names, ""], rows,
            "Every trial; speedup is over the uncached reference's time per image in the same worker."))
        if s.frozen:
            for number, paths in sorted(s.frozen.items()):
                sec.blocks.append(Text(f"Trial {number} was frozen into {', '.join(paths)}."))
        else:
            sec.blocks.append(Text("No frozen config in this folder comes from this study."))
    for p in problems:
        sec.blocks.append(Text(f"Could not read a study: {p}"))
    return sec


# ---------------------------------------------------------------------------------------------- quality


def quality_section(comparisons: Sequence[Path], skipped: dict[str, str]) -> Section:
    sec = Section("quality", "Quality: the accelerated recipe against BF16")
    sec.blocks.append(Text("B is generated with the same prompts and seeds as A; paired metrics compare each "
                           "image of B with A's image of the same prompt and seed. Intervals are 95% bootstrap "
                           "confidence intervals of the mean over prompts."))
    for folder in comparisons:
        data = _read_json(folder / "metrics.json")
        a, b = data["a"], data["b"]
        sec.blocks.append(Heading(f"{a['label']} (A) vs {b['label']} (B) — {folder.name}"))
        revision = f" @ {data['revision']}" if data.get("revision") else ""
        sec.blocks.append(Text(f"Measured on model {data.get('model')}{revision}, {len(data.get('prompts', []))} "
                               f"prompts. {model_note(data.get('model'))}"))
        sec.blocks.append(Table(["side", "recipe", "recipe hash", "s/image"], [
            [f"A: {a['label']}", describe_recipe(a["recipe"]), _json_hash(a["recipe"]),
             _num((data.get("seconds_per_image") or {}).get("a"), ".3f")],
            [f"B: {b['label']}", describe_recipe(b["recipe"]), _json_hash(b["recipe"]),
             _num((data.get("seconds_per_image") or {}).get("b"), ".3f")],
        ]))
        fig = _png_figure(folder / "grid.png", f"{a['label']} | {b['label']} | per-pixel difference (mean |A - B| "
                          "over RGB, 0-255 pixel levels, one colour scale for all rows).",
                          f"quality-{_slug(folder.name)}-grid")
        if fig:
            sec.blocks.append(fig)
        rows = []
        for name, m in (data.get("metrics") or {}).items():
            label, better = METRIC_INFO.get(name, (name, ""))
            s = m.get("summary")
            if s:
                finite = s["n"] - s["n_inf"]
                ci = f"[{_num(s['low'])}, {_num(s['high'])}]" if finite > 1 else "—"
                n = f"{s['n']}" + (f" ({s['n_inf']} identical)" if s["n_inf"] else "")
            else:
                ci, n = "— (one number for the set)", "set"
            rows.append([label, _num(m.get("value")), ci, n, better])
        sec.blocks.append(Table(["metric", "value (mean)", "95% CI", "images", "reads"], rows))
        present = {k.split("_")[0] for k in (data.get("metrics") or {})}
        # What compare measures by default; those absent from a comparison were not measured (weights missing).
        absent = [n for n in DEFAULT_METRICS if n not in present]
        if absent:
            why = [skipped[n] for n in absent if n in skipped]  # each message starts with the metric's name
            sec.blocks.append(Text(f"Not measured here: {', '.join(absent)}"
                                   + (" (weights not found offline; see below)." if why else
                                      " (not asked for, or their weights were missing when compare ran).")))
            if why:
                sec.blocks.append(Bullets(why))
    return sec


# ---------------------------------------------------------------------------------------------- frozen + run


def _thumbnails(folder: Path, rows: Sequence[dict[str, Any]], limit: int = 8) -> Figure | None:
    """A strip of the run's first images with what happened to each (the report shows them, not a listing)."""
    from matplotlib.figure import Figure as MplFigure
    from PIL import Image

    shown = [r for r in rows if str(r.get("file", "")).endswith(".png") and (folder / r["file"]).is_file()][:limit]
    if not shown:
        return None
    fig = MplFigure(figsize=(2.2 * len(shown), 2.9))
    for ax, r in zip(fig.subplots(1, len(shown), squeeze=False)[0], shown):
        with Image.open(folder / r["file"]) as im:
            im = im.convert("RGB")
            im.thumbnail((256, 256))
            ax.imshow(im)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{r['id'][:22]}\n{r['wall_s']:.2f} s, {len(r.get('skipped_steps') or [])}/{r['steps']} "
                     "skipped", fontsize=8)
    fig.tight_layout()
    return _render(fig, f"Images of the run in {folder.name}, with time per image (s) and TeaCache steps skipped.",
                   f"run-{_slug(folder.name)}")


def run_section(frozen: Sequence[Path], runs: Sequence[Path], root: Path | None) -> Section:
    from flux2lab.pipeline.frozen import load_frozen

    sec = Section("run", "Frozen configs and their runs")
    by_hash: dict[str, str] = {}
    if frozen:
        rows = []
        for path in frozen:
            try:
                f = load_frozen(path)
            except Flux2LabError as e:
                rows.append([_rel(path, root), "REFUSED", str(e)[:200], "", ""])
                continue
            by_hash[f.sha256] = _rel(path, root)
            prov = f.provenance
            study, trial = prov.get("study") or {}, prov.get("trial") or {}
            origin = (f"study {study.get('name')}, trial {trial.get('number')}" if study else "") or "—"
            metrics = prov.get("metrics") or {}
            shown = ", ".join(f"{k} {_num(v)}" for k, v in metrics.items()
                              if k in ("lpips", "psnr", "ssim", "speedup", "skipped_fraction"))
            rows.append([_rel(path, root), f"{f.sha256[:12]} (verified)",
                         f"{f.model.source}{' @ ' + f.model.revision if f.model.revision else ''}",
                         describe_recipe(f.recipe.to_dict()), f"{origin}; {shown}" if shown else origin])
        sec.blocks.append(Table(["frozen config", "sha256", "model", "recipe", "chosen from; metrics at freeze"],
                                rows, "Hashes are recomputed on load: an edited file would show REFUSED."))
    for folder in runs:
        summary = _read_json(folder / "summary.json") or {}
        records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()
                   if line.strip().startswith("{")]
        sha = summary.get("config_sha256", "")
        sec.blocks.append(Heading(f"Run {_rel(folder, root)}"))
        sec.blocks.append(Table(["field", "value"], [
            ["config", f"{summary.get('config')} (sha256 {sha[:12]}"
                       + (f", = {by_hash[sha]})" if sha in by_hash else ")")],
            ["model", f"{summary.get('model')}" + (f" @ {summary['revision']}" if summary.get("revision") else "")],
            ["device", f"{summary.get('device')} x {summary.get('ranks')}"],
            ["images", (f"{summary.get('images_made')} made this time, {summary.get('images_total')} in the set, "
                       f"{len(records)} recorded")],
            ["size, steps", f"{summary.get('width')}x{summary.get('height')}, {(summary.get('recipe') or {}).get('steps')}"],
            ["mean time per image", _num(summary.get("mean_wall_s"), ".3f", " s")],
            ["mean time per step", _num(summary.get("mean_step_s"), ".4f", " s")],
            ["steps skipped by TeaCache", _pct(summary.get("skipped_fraction"))],
        ]))
        fig = _thumbnails(folder, records)
        if fig:
            sec.blocks.append(fig)
    return sec


# ---------------------------------------------------------------------------------------------- speed


def speed_section(benches: Sequence[Path], root: Path | None) -> Section:
    sec = Section("speed", "Speed: the acceleration ladder")
    for folder in benches:
        r = _read_json(folder / "bench.json")
        env, model = r.get("environment") or {}, r.get("model") or {}
        card = env.get("device_name") or env.get("device") or "unknown"
        sec.blocks.append(Heading(f"{card} — {model.get('source')}, {r.get('width')}x{r.get('height')}, "
                                  f"{r.get('steps')} steps ({_rel(folder, root)})"))
        details = [f"Card: {card}" + (f" (sm{env['compute_capability']}, {env.get('memory_gib', 0):.0f} GiB, "
                                      f"driver {env.get('driver')}, CUDA {env.get('cuda_runtime')})"
                                      if env.get("cuda") else " (no GPU: CPU run)"),
                   f"Model: {model.get('source')} ({model.get('kind')}); covers the {r.get('coverage')}",
                   f"Timing: {r.get('timing')}"]
        settings = r.get("settings") or {}
        if settings.get("teacache_schedule"):
            details.append(f"TeaCache: {settings['teacache_schedule']}")
        sec.blocks.append(Bullets(details))
        fig = _png_figure(folder / "bench.png", f"Speedup per rung over the first rung (per image) on {card}; "
                          "dashed lines: this card's arithmetic floor where measured.",
                          f"speed-{_slug(str(card))}-{_slug(folder.name)}")
        if fig:
            sec.blocks.append(fig)
        rows, notes = [], []
        for rung in r.get("rungs") or []:
            if rung.get("status") != "ok":
                notes.append(f"{rung['name']} {rung['status']}: {rung.get('reason')}")
                rows.append([rung["name"], rung.get("adds", ""), f"{rung['status']} (note {len(notes)})",
                             "", "", "", ""])
                continue
            step = rung.get("computed_step_s") or rung.get("step_s") or {}
            rows.append([rung["name"], rung.get("adds", ""), _num(step.get("median"), ".4f"),
                         _num((rung.get("image_s") or {}).get("median"), ".3f")
                         + (" (extrap.)" if rung.get("image_extrapolated") else ""),
                         _num(rung.get("speedup"), ".2f", "x"), _num(rung.get("speedup_vs_previous"), ".2f", "x"),
                         _num(rung.get("floor_ratio"), ".2f", "x")])
        sec.blocks.append(Table(["rung", "adds", "s/step (median)", "s/image (median)", "speedup",
                                 "vs rung below", "step / floor"], rows,
                                f"Measured on {card}. TeaCache rows show the median computed step."))
        if notes:
            sec.blocks.append(Bullets([f"note {i}: {n}" for i, n in enumerate(notes, 1)]))
        targets = [t for t in r.get("targets") or [] if t.get("met") is not None]
        if targets:
            applies = targets[0].get("applies_here")
            sec.blocks.append(Text("Targets" + ("" if applies else " (set for the full-size model at 1024x1024, "
                                                "50 steps on an H100/H200; this run is not that, so they only "
                                                "show the arithmetic)") + ":"))
            sec.blocks.append(Bullets([f"{'met' if t['met'] else 'NOT met'}: {t['target']} "
                                       f"({_num(t['value'], '.2f', 'x')})" for t in targets]))
        if r.get("command"):
            sec.blocks.append(Code(r["command"]))
    return sec


# ---------------------------------------------------------------------------------------------- provenance


def versions() -> dict[str, str | None]:
    """Library versions and the code's git state at report time."""
    import torch

    from flux2lab.benchmark import environment

    env = environment(torch.device("cpu"))
    keys = ("flux2lab", "diffusers", "torch", "transformers", "torchao", "python", "platform", "git_commit",
            "git_dirty")
    out = {k: env.get(k) for k in keys}
    for dist in ("optuna", "torchmetrics", "open_clip_torch"):
        out[dist] = dist_version(dist)
    return out


def provenance_section(found: Found, studies: Sequence[_Study], demo: dict[str, Any],
                       command: str | None) -> Section:
    sec = Section("provenance", "Provenance")
    root = found.root
    benches = {folder: _read_json(folder / "bench.json") or {} for folder in found.benches}
    v = versions()
    sec.blocks.append(Table(["software", "version at report time"],
                            [[k, str(v[k])] for k in ("flux2lab", "diffusers", "torch", "transformers", "torchao",
                                                      "optuna", "torchmetrics", "open_clip_torch", "python",
                                                      "platform")]
                            + [["git commit", f"{str(v['git_commit'])[:12]}"
                                + (" (uncommitted changes)" if v["git_dirty"] else "")]]))
    recorded = []
    for folder, bench in benches.items():
        env = bench.get("environment") or {}
        recorded.append([_rel(folder / "bench.json", root), env.get("flux2lab"), env.get("diffusers"), env.get("torch")])
    for path in found.frozen:
        prov = (_read_json(path) or {}).get("provenance") or {}
        recorded.append([_rel(path, root), prov.get("flux2lab_version"), "—", "—"])
    if recorded:
        sec.blocks.append(Table(["artefact", "flux2lab", "diffusers", "torch"],
                                [[str(c) if c else "—" for c in row] for row in recorded],
                                "Versions recorded by the artefacts themselves when they were made."))

    commands = []
    if demo:
        commands.append(["demo", demo.get("command", ""), _num(demo.get("wall_s"), ".0f", " s")])
        commands += [[s["name"], s.get("command", ""), _num(s.get("wall_s"), ".0f", " s")]
                     for s in demo.get("stages") or []]
    for bench in benches.values():
        if bench.get("command") and not demo:
            commands.append(["bench", bench["command"], _num(bench.get("wall_s"), ".0f", " s")])
    if command:
        commands.append(["report", command, ""])
    if commands:
        sec.blocks.append(Table(["stage", "command", "wall time"], commands,
                                "The demo runs its stages in one process through the library; each row is the "
                                "command that does the same stage on its own." if demo else ""))

    hashes = []
    for run in found.calibrations:
        hashes.append([_rel(run / "fit.json", root), "calibration fit (sha256 of the file)",
                       _sha256_file(run / "fit.json")[:12]])
    for s in studies:
        hashes.append([f"study {s.name}", "study configuration (sha256 of its canonical JSON)",
                       _json_hash(s.config.to_dict())])
    for folder in found.comparisons:
        data = _read_json(folder / "metrics.json") or {}
        hashes.append([_rel(folder / "metrics.json", root), "compare: recipe A / recipe B",
                       f"{_json_hash(data['a']['recipe'])} / {_json_hash(data['b']['recipe'])}"])
    for path in found.frozen:
        hashes.append([_rel(path, root), "frozen config (recorded sha256)",
                       str((_read_json(path) or {}).get("sha256", ""))[:12]])
    for folder in found.runs:
        hashes.append([_rel(folder / "summary.json", root), "run: config it ran",
                       str((_read_json(folder / "summary.json") or {}).get("config_sha256", ""))[:12]])
    for folder in found.benches:
        hashes.append([_rel(folder / "bench.json", root), "benchmark result (sha256 of the file)",
                       _sha256_file(folder / "bench.json")[:12]])
    if hashes:
        sec.blocks.append(Table(["artefact", "what is hashed", "sha256 (first 12)"], hashes))
    if demo and demo.get("notes"):
        sec.blocks.append(Bullets(list(demo["notes"])))
    return sec


# ---------------------------------------------------------------------------------------------- build


def build(experiments: str | Path | None, *, bench_dirs: Sequence[str | Path] = (), storages: Sequence[str] = (),
          title: str | None = None, command: str | None = None) -> Report:
    """Scan the folder(s) and make a section for each kind found, in the order of the data flow (calibration,
    search, quality, frozen configs and runs, speed), then provenance."""
    found = discover(experiments, bench_dirs, storages)
    if found.empty:
        where = experiments if experiments is not None else "the --bench folders"
        raise Flux2LabError(f"nothing to report in {where}: no calibration fit.json, studies.db, compare "
                            "metrics.json, frozen config, run summary.json or bench.json there. Run a stage first "
                            "(python -m flux2lab.demo runs them all), or point --experiments at its output.")
    root = found.root
    demo = (_read_json(found.demo) if found.demo else None) or {}
    studies, problems = _load_studies(found.storages, found.frozen, root)
    sections = []
    if found.calibrations:
        sections.append(calibration_section(found.calibrations, root))
    if studies or problems:
        sections.append(search_section(studies, problems))
    if found.comparisons:
        sections.append(quality_section(found.comparisons, demo.get("skipped_metrics") or {}))
    if found.frozen or found.runs:
        sections.append(run_section(found.frozen, found.runs, root))
    if found.benches:
        sections.append(speed_section(found.benches, root))
    sections.append(provenance_section(found, studies, demo, command))
    source = str(root) if root is not None else ", ".join(str(b) for b in bench_dirs)
    return Report(title or f"flux2lab report: {Path(source).name or source}", source,
                  datetime.now(timezone.utc).isoformat(timespec="seconds"), sections)


# ---------------------------------------------------------------------------------------------- writing

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1180px; margin: 2em auto;
       padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { border-bottom: 3px solid #76b900; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2.2em; }
h3 { margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
caption { caption-side: bottom; text-align: left; color: #555; font-size: 13px; padding-top: 4px; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 13px; }
code, pre { background: #f6f6f6; font-size: 13px; }
pre { padding: .6em; overflow-x: auto; white-space: pre-wrap; }
nav li { display: inline; margin-right: 1.2em; }
"""


def _inline_html(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _html_block(b: Block) -> str:
    if isinstance(b, Figure):
        data = base64.b64encode(b.png).decode()
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.caption)}">'
                f"<figcaption>{_inline_html(b.caption)}</figcaption></figure>")
    if isinstance(b, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
        body = "".join("<tr>" + "".join(f"<td>{_inline_html(str(c))}</td>" for c in row) + "</tr>" for row in b.rows)
        cap = f"<caption>{_inline_html(b.caption)}</caption>" if b.caption else ""
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(b, Text):
        return f"<p>{_inline_html(b.text)}</p>"
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Code):
        return f"<pre><code>{html.escape(b.text)}</code></pre>"
    return f"<h3>{html.escape(b.text)}</h3>"


def to_html(report: Report) -> str:
    nav = "".join(f'<li><a href="#{s.id}">{html.escape(s.title)}</a></li>' for s in report.sections)
    body = "\n".join(f'<section id="{s.id}">\n<h2>{html.escape(s.title)}</h2>\n'
                     + "\n".join(_html_block(b) for b in s.blocks) + "\n</section>" for s in report.sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(report.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(report.title)}</h1>\n"
            f"<p>From <code>{html.escape(report.source)}</code>, made {html.escape(report.created)}.</p>\n"
            f"<nav><ul>{nav}</ul></nav>\n{body}\n</body>\n</html>\n")


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_block(b: Block, image_names: dict[int, str]) -> str:
    if isinstance(b, Figure):
        return f"![{_md_cell(b.caption)}](images/{image_names[id(b)]})\n\n*{b.caption}*"
    if isinstance(b, Table):
        lines = ["| " + " | ".join(_md_cell(h) for h in b.header) + " |", "|" + "---|" * len(b.header)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
        return "\n".join(lines) + (f"\n\n*{b.caption}*" if b.caption else "")
    if isinstance(b, Text):
        return b.text
    if isinstance(b, Bullets):
        return "\n".join(f"- {i}" for i in b.items)
    if isinstance(b, Code):
        return f"```\n{b.text}\n```"
    return f"### {b.text}"


def _figures(report: Report) -> Iterable[Figure]:
    for s in report.sections:
        yield from (b for b in s.blocks if isinstance(b, Figure))


def to_markdown(report: Report, image_names: dict[int, str]) -> str:
    parts = [f"# {report.title}", f"From `{report.source}`, made {report.created}.",
             "\n".join(f"- [{s.title}](#{s.id})" for s in report.sections)]
    for s in report.sections:
        parts.append(f'<a id="{s.id}"></a>\n\n## {s.title}')
        parts += [_md_block(b, image_names) for b in s.blocks]
    return "\n\n".join(parts) + "\n"


def write(report: Report, out: str | Path) -> dict[str, Path]:
    """index.html (self-contained), index.md and images/ (the markdown's pictures) under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = out / "images"
    if images.is_dir():
        shutil.rmtree(images)  # only pictures of an earlier report, which this one replaces
    images.mkdir()
    names: dict[int, str] = {}
    for fig in _figures(report):
        name = f"{fig.name}.png"
        k = 2
        while name in names.values():
            name, k = f"{fig.name}-{k}.png", k + 1
        names[id(fig)] = name
        (images / name).write_bytes(fig.png)
    (out / "index.html").write_text(to_html(report), encoding="utf-8")
    (out / "index.md").write_text(to_markdown(report, names), encoding="utf-8")
    return {"html": out / "index.html", "markdown": out / "index.md", "images": images}
