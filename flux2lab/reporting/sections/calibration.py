"""The TeaCache calibration section: each fit with its plot, coefficients, diagnostics and threshold advice.

Reads what `python -m flux2lab.calibrate` wrote into a run folder: `fit.json`, `run.json` and `fit.png`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flux2lab.common.formatting import fmt_number, fmt_percent
from flux2lab.reporting.document import (
    Bullets,
    Heading,
    Section,
    Table,
    Text,
    figure_from_file,
    model_note,
    read_json,
    relative_path,
    slug,
)


def calibration_section(runs: Sequence[Path], root: Path | None) -> Section:
    from flux2lab.pipeline.recipe import FLUX2_DEV_COEFFICIENTS

    sec = Section("calibration", "TeaCache calibration")
    sec.blocks.append(Text("Each step of an uncached run gives one point: x = how much the timestep-modulated "
                           "input of the first block changed (relative L1), y = how much the model output "
                           "changed. TeaCache rescales x with the fitted polynomial and skips steps while the "
                           "rescaled sum stays under its threshold."))
    for run in runs:
        fit = read_json(run / "fit.json") or {}
        meta = fit.get("run") or read_json(run / "run.json") or {}
        sec.blocks.append(Heading(f"{run.name} — model {meta.get('model')}, {meta.get('prompts')} prompts, "
                                  f"{meta.get('steps')} steps"))
        sec.blocks.append(Text(model_note(meta.get("model"))))
        fig = figure_from_file(run / "fit.png", f"{run.name}: samples by kind with the degree-{fit.get('degree')} "
                               "fit (left) and residuals of held-out prompts against a fit on the other prompts "
                               "(right). Both axes: relative L1 change between consecutive steps (unitless).",
                               f"calibration-{slug(run.name)}")
        sec.blocks.append(fig or Text(f"{relative_path(run / 'fit.png', root)} is missing; rerun "
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
            ["R² of the fit", fmt_number(fit.get("r2"), ".4f")],
            ["held-out R² (prompts left out of the fit)",
             fmt_number(held.get("r2"), ".4f") + f" on {held.get('prompts')} prompts"
             + (f" — {held['note']}" if held.get("note") else "")],
            ["residual std / median |r| / p95 |r|",
             f"{fmt_number(res.get('std'))} / {fmt_number(res.get('abs_median'))} / {fmt_number(res.get('abs_p95'))}"],
            ["observed x range", " to ".join(fmt_number(v) for v in fit.get("x_range") or [])],
            ["observed y range", " to ".join(fmt_number(v) for v in fit.get("y_range") or [])],
            ["R² of the published coefficients on these samples", fmt_number(pub.get("r2_on_these_samples"), ".4f")],
        ]
        for kind, k in (fit.get("per_kind") or {}).items():
            diag.append([f"{kind}: samples (prompts), R², mean residual",
                         (f"{k.get('samples')} ({k.get('prompts')}), {fmt_number(k.get('r2'), '.4f')}, "
                         f"{fmt_number(k.get('mean_residual'))}")])
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
                  str(t["max_consecutive_skips"]), fmt_percent(t["max_skipped_fraction"]), str(t["max_skipped_steps"])]
                 for t in limits.get("thresholds") or []],
                "What the fitted curve's lowest value over the observed x allows at each threshold (upper "
                "bounds: real runs skip fewer where the input changes more)."))
    return sec

