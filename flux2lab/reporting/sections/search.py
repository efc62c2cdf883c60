"""The search section: each Optuna study's grid, Pareto plot and every trial, with the frozen trial marked.

Reads the studies in every storage found (`studies.db` under the experiments folder, or `--storage` URLs) through
`flux2lab.study`, and the frozen configs' provenance to know which trial was frozen into which file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flux2lab.common.errors import Flux2LabError
from flux2lab.common.formatting import fmt_number, fmt_percent
from flux2lab.reporting.document import (
    METRIC_INFO,
    TRIAL_METRICS,
    Figure,
    Heading,
    Section,
    Table,
    Text,
    describe_recipe,
    figure_from_matplotlib,
    model_note,
    read_json,
    relative_path,
    slug,
)


@dataclass
class LoadedStudy:
    """An Optuna study as the report shows it: its config, trials, Pareto front and the trials frozen from it."""

    name: str
    url: str
    config: Any  # flux2lab.study.StudyConfig
    trials: list  # every FrozenTrial
    front: set[int]
    frozen: dict[int, list[str]]  # trial number -> frozen config files made from it


def load_studies(urls: Sequence[str], frozen: Sequence[Path], root: Path | None) -> tuple[list[LoadedStudy], list[str]]:
    """Every study in the storages, and a message for each storage or study that could not be read."""
    import optuna

    from flux2lab import study as st

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    made_from: dict[str, dict[int, list[str]]] = {}
    for path in frozen:
        prov = (read_json(path) or {}).get("provenance") or {}
        name = (prov.get("study") or {}).get("name")
        number = (prov.get("trial") or {}).get("number")
        if name is not None and number is not None:
            made_from.setdefault(name, {}).setdefault(int(number), []).append(relative_path(path, root))
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
            studies.append(LoadedStudy(name, url, config, study.get_trials(deepcopy=False),
                                       {t.number for t in study.best_trials}, made_from.get(name, {})))
    return studies, problems


def pareto_figure(s: LoadedStudy) -> Figure | None:
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
    caption = (f"Study {s.name}: speed against each quality metric (measured against the uncached reference on the "
               "same prompts and seeds). Red: the Pareto front of the study's two objectives; gold star: the trial "
               "that was frozen; numbers are trial numbers.")
    return figure_from_matplotlib(fig, caption, f"search-{slug(s.name)}-pareto")


def search_section(studies: Sequence[LoadedStudy], problems: Sequence[str]) -> Section:
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
                             fmt_percent(a.get("skipped_fraction")), fmt_number(a.get("time_per_image"), ".3f"),
                             fmt_number(a.get("speedup"), ".2f", "x"),
                             *(fmt_number(m.get(n), ".5g") for n in metric_names), mark.strip()])
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

