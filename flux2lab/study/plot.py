"""The search's Pareto figure: speed against each measured quality metric, one colour per cache method, the
study's Pareto front (one front across every method) joined, frozen trials starred. The search command saves it
(`plot_pareto`); the report embeds the same figure.

Drawn with Matplotlib's object API rather than optuna.visualization.matplotlib.plot_pareto_front, which draws
through pyplot (and sets a global style), shows only the two objectives and knows nothing of cache methods."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState

from flux2lab.study.config import SPEED_METRICS, StudyConfig
from flux2lab.study.selection import SHOWN_METRICS, measured_metrics
from flux2lab.study.space import METHOD

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METHOD_COLOURS = {"teacache": "tab:blue", "taylorseer": "tab:orange", "magcache": "tab:green",
                  "first_block": "tab:purple", "seacache": "tab:brown"}
LOWER_IS_BETTER = ("lpips", "fid", "domain_fid")  # the other quality metrics drawn are better higher


def pareto_figure(name: str, trials: Sequence[FrozenTrial], config: StudyConfig, front: Collection[int], *,
                  frozen: Collection[int] = (), metrics: Sequence[str] = SHOWN_METRICS) -> Figure | None:
    """Study `name`'s complete trials: speed against each of `metrics` measured, points coloured by method, the
    `front` trials (numbers) joined and labelled, the `frozen` ones starred in gold. None if nothing to draw."""
    from matplotlib.figure import Figure

    done = [t for t in trials if t.state == TrialState.COMPLETE]
    names = measured_metrics(done, metrics)
    if not done or not names:
        return None
    speed_attr = SPEED_METRICS[config.speed_metric][0]
    by_time = config.speed_metric == "time"
    xlabel = "time per image (s), lower is faster" if by_time else "block stack computed (%), lower is faster"
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.9 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, metric in zip(axes, names):
        pts = []  # (speed, value, trial number, method)
        for t in done:
            v, x = (t.user_attrs.get("metrics") or {}).get(metric), t.user_attrs.get(speed_attr)
            if v is not None and x is not None and math.isfinite(float(v)):
                method = (config.trial_point(t) or {}).get(METHOD, "?")
                pts.append((float(x) * (1 if by_time else 100), float(v), t.number, method))
        hidden = sum(1 for t in done if metric in (t.user_attrs.get("metrics") or {})) - len(pts)
        order = list(METHOD_COLOURS)
        for method in sorted({p[3] for p in pts}, key=lambda m: (order.index(m) if m in order else len(order), m)):
            mine = [p for p in pts if p[3] == method]
            ax.scatter([p[0] for p in mine], [p[1] for p in mine], s=26, alpha=0.85, label=method,
                       c=METHOD_COLOURS.get(method, "0.5"), zorder=2)
        best = sorted(p for p in pts if p[2] in front)
        ax.plot([p[0] for p in best], [p[1] for p in best], "-", c="black", lw=1.1, zorder=3, label="Pareto front")
        for x, y, n, _ in best:
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        stars = [p for p in pts if p[2] in frozen]
        if stars:
            ax.scatter([p[0] for p in stars], [p[1] for p in stars], marker="*", s=320, c="gold",
                       edgecolors="black", linewidths=1, zorder=5, label="frozen")
        better = "lower" if metric in LOWER_IS_BETTER else "higher"
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(f"{metric} vs uncached reference\n({better} is better)", fontsize=9)
        ax.set_title(metric + (" (objective)" if metric == config.quality_metric else "")
                     + (f"\n{hidden} trial(s) identical to the reference (inf) not drawn" if hidden else ""), fontsize=10)
        ax.ticklabel_format(axis="y", useOffset=False)  # SSIM 0.99996 reads as such, not as an offset
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"study {name}: {config.model}, {len(done)} complete trials", fontsize=11)
    fig.tight_layout()
    return fig


def plot_pareto(study: optuna.Study, config: StudyConfig, path: str | Path) -> Path | None:
    """The study's `pareto_figure` saved as a PNG at `path`; None if no trial finished."""
    fig = pareto_figure(study.study_name, study.get_trials(deepcopy=False), config,
                        {t.number for t in study.best_trials})
    if fig is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
