"""The search section: each Optuna study's space (methods and settings), its one Pareto front across the methods
(the search's own figure, frozen trials starred), every trial with its method and settings, and the winner.

Reads the studies in every storage found (`studies.db` under the experiments folder, or `--storage` URLs) through
`flux2lab.study`, and the frozen configs' provenance to know which trial was frozen into which file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flux2lab.common.errors import Flux2LabError
from flux2lab.common.formatting import fmt_number, fmt_percent
from flux2lab.reporting.document import (
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
    """The search's Pareto figure (flux2lab.study.pareto_figure) with the frozen trials starred."""
    from flux2lab.study import pareto_figure as draw

    fig = draw(s.name, s.trials, s.config, s.front, frozen=set(s.frozen), metrics=TRIAL_METRICS)
    if fig is None:
        return None
    caption = (f"Study {s.name}: speed against each quality metric (measured against the uncached reference on the "
               "same prompts and seeds), one colour per cache method. Black line: the Pareto front of the study's "
               "two objectives across every method (numbers are trial numbers); gold star: the trial that was "
               "frozen.")
    return figure_from_matplotlib(fig, caption, f"search-{slug(s.name)}-pareto")


def _space_text(space: dict) -> str:
    methods = "; ".join(f"{m} " + " x ".join(f"{k} {v}" for k, v in settings.items())
                        for m, settings in space["methods"].items())
    precisions = space.get("transformer_precision")
    return methods + (f"; transformer precision {precisions}" if precisions else "")


def _calibration_text(c) -> str:
    cal = c.calibration
    if not cal:
        return "Calibration: none (TeaCache with the published FLUX.2 [dev] coefficients; no MagCache)."
    used = ", ".join(n for k, n in (("coefficients", "TeaCache coefficients"), ("mag_ratios", "MagCache ratios"))
                     if cal.get(k))
    return f"Calibration: fit {cal['path']} (sha256 {cal['sha256'][:12]}): {used}."


def search_section(studies: Sequence[LoadedStudy], problems: Sequence[str]) -> Section:
    from optuna.trial import TrialState

    from flux2lab.study import describe_point, measured_metrics, settings_text

    sec = Section("search", "Search: step caches against quality")
    for s in studies:
        c = s.config
        speed = "time per image" if c.speed_metric == "time" else "fraction of the block stack computed"
        sec.blocks.append(Heading(f"Study {s.name} — model {c.model}, {len(c.prompts)} prompts"))
        sec.blocks.append(Text(f"Space: {_space_text(c.space)} ({c.sampler} sampler). Objectives: {speed} and "
                               f"{c.quality_metric}. Base recipe: {describe_recipe(c.base_recipe)}. "
                               + _calibration_text(c)))
        sec.blocks.append(Text(model_note(c.model)))
        fig = pareto_figure(s)
        if fig:
            sec.blocks.append(fig)
        metric_names = measured_metrics(s.trials, TRIAL_METRICS)
        rows = []
        for t in sorted(s.trials, key=lambda t: t.number):
            a = t.user_attrs
            point = c.trial_point(t) or {}
            head = [str(t.number), point.get("method", "—"), settings_text(point) or "—"]
            if t.state == TrialState.COMPLETE:
                m = a.get("metrics") or {}
                mark = ("★ frozen" if t.number in s.frozen else "") + (" front" if t.number in s.front else "")
                rows.append([*head, "complete",
                             fmt_percent(a.get("computed_fraction")), fmt_number(a.get("time_per_image"), ".3f"),
                             fmt_number(a.get("speedup"), ".2f", "x"),
                             *(fmt_number(m.get(n), ".5g") for n in metric_names), mark.strip()])
            elif t.state == TrialState.FAIL:
                reason = a.get("fail_reason") or a.get("interrupted") or "interrupted"
                rows.append([*head, "failed", *(["—"] * (3 + len(metric_names))), reason[:120]])
        sec.blocks.append(Table(
            ["trial", "method", "settings", "state", "block stack computed", "s/image", "speedup", *metric_names, ""],
            rows, "Every trial, every method; speedup is over the uncached reference's time per image in the same "
                  "worker."))
        if s.frozen:
            by_number = {t.number: t for t in s.trials}
            for number, paths in sorted(s.frozen.items()):
                point = c.trial_point(by_number[number]) if number in by_number else None
                sec.blocks.append(Text(f"Trial {number} was frozen into {', '.join(paths)}"
                                       + (f": {describe_point(point)}." if point else ".")))
        else:
            sec.blocks.append(Text("No frozen config in this folder comes from this study."))
    for p in problems:
        sec.blocks.append(Text(f"Could not read a study: {p}"))
    return sec

