"""The search's Pareto plot: speed against each measured quality metric, the study's Pareto front marked.

Drawn with Matplotlib's object API rather than optuna.visualization.matplotlib.plot_pareto_front, which draws
through pyplot (and sets a global style) and shows only the two objectives, not every measured metric."""

from __future__ import annotations

import math
from pathlib import Path

import optuna

from flux2lab.study.config import SPEED_METRICS, StudyConfig
from flux2lab.study.selection import complete_trials, measured_metrics


def plot_pareto(study: optuna.Study, config: StudyConfig, path: str | Path) -> Path | None:
    """Speed against each measured quality metric; the study's Pareto front in red. None if nothing finished."""
    from matplotlib.figure import Figure

    trials = complete_trials(study)
    if not trials:
        return None
    front = {t.number for t in study.best_trials}
    names = measured_metrics(trials)
    speed_attr = SPEED_METRICS[config.speed_metric][0]
    xlabel = "time per image (s)" if config.speed_metric == "time" else "skipped steps (fraction)"
    fig = Figure(figsize=(4.4 * len(names), 3.8))
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        pts = [(float(t.user_attrs[speed_attr]), float(t.user_attrs["metrics"][name]), t.number) for t in trials
               if name in t.user_attrs["metrics"] and math.isfinite(float(t.user_attrs["metrics"][name]))]
        rest = [p for p in pts if p[2] not in front]
        best = sorted(p for p in pts if p[2] in front)
        ax.scatter([p[0] for p in rest], [p[1] for p in rest], c="0.6", s=18, label="trials")
        ax.plot([p[0] for p in best], [p[1] for p in best], "o-", c="tab:red", ms=5, label="Pareto front")
        for x, y, n in best:
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        better = "lower" if name == "lpips" else "higher"
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{name} vs reference ({better} is better)")
        hidden = sum(1 for t in trials if name in t.user_attrs["metrics"]
                     and not math.isfinite(float(t.user_attrs["metrics"][name])))
        ax.set_title(name + (" (objective)" if name == config.quality_metric else "")
                     + (f"; {hidden} identical to the reference (inf) not shown" if hidden else ""), fontsize=9)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.suptitle(f"study {study.study_name}: {config.model}, {len(trials)} trials", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
