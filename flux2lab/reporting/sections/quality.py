"""The quality section: each comparison of recipe B against recipe A, with its image grid and metrics.

Reads what `python -m flux2lab.compare` wrote: `metrics.json` (recipes, per-metric values with bootstrap
intervals) and `grid.png`; names the default metrics that were not measured and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flux2lab.common.formatting import fmt_number
from flux2lab.quality.comparison import DEFAULT_METRICS
from flux2lab.reporting.document import (
    METRIC_INFO,
    Bullets,
    Heading,
    Section,
    Table,
    Text,
    describe_recipe,
    figure_from_file,
    model_note,
    read_json,
    short_json_hash,
    slug,
)


def quality_section(comparisons: Sequence[Path], skipped: dict[str, str]) -> Section:
    sec = Section("quality", "Quality: the accelerated recipe against BF16")
    sec.blocks.append(Text("B is generated with the same prompts and seeds as A; paired metrics compare each "
                           "image of B with A's image of the same prompt and seed. Intervals are 95% bootstrap "
                           "confidence intervals of the mean over prompts."))
    for folder in comparisons:
        data = read_json(folder / "metrics.json")
        a, b = data["a"], data["b"]
        sec.blocks.append(Heading(f"{a['label']} (A) vs {b['label']} (B) — {folder.name}"))
        revision = f" @ {data['revision']}" if data.get("revision") else ""
        sec.blocks.append(Text(f"Measured on model {data.get('model')}{revision}, {len(data.get('prompts', []))} "
                               f"prompts. {model_note(data.get('model'))}"))
        sec.blocks.append(Table(["side", "recipe", "recipe hash", "s/image"], [
            [f"A: {a['label']}", describe_recipe(a["recipe"]), short_json_hash(a["recipe"]),
             fmt_number((data.get("seconds_per_image") or {}).get("a"), ".3f")],
            [f"B: {b['label']}", describe_recipe(b["recipe"]), short_json_hash(b["recipe"]),
             fmt_number((data.get("seconds_per_image") or {}).get("b"), ".3f")],
        ]))
        fig = figure_from_file(folder / "grid.png", f"{a['label']} | {b['label']} | per-pixel difference (mean "
                               "|A - B| over RGB, 0-255 pixel levels, one colour scale for all rows).",
                               f"quality-{slug(folder.name)}-grid")
        if fig:
            sec.blocks.append(fig)
        rows = []
        for name, m in (data.get("metrics") or {}).items():
            label, better = METRIC_INFO.get(name, (name, ""))
            s = m.get("summary")
            if s:
                finite = s["n"] - s["n_inf"]
                ci = f"[{fmt_number(s['low'])}, {fmt_number(s['high'])}]" if finite > 1 else "—"
                n = f"{s['n']}" + (f" ({s['n_inf']} identical)" if s["n_inf"] else "")
            else:
                ci, n = "— (one number for the set)", "set"
            rows.append([label, fmt_number(m.get("value")), ci, n, better])
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

