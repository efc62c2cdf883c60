"""The speed section: each benchmark's acceleration ladder on its card, with plot, table, notes and targets.

Reads what `python -m flux2lab.bench` wrote: `bench.json` and `bench.png`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flux2lab.common.formatting import fmt_number
from flux2lab.reporting.document import (
    Bullets,
    Code,
    Heading,
    Section,
    Table,
    Text,
    figure_from_file,
    read_json,
    relative_path,
    slug,
)


def speed_section(benches: Sequence[Path], root: Path | None) -> Section:
    sec = Section("speed", "Speed: the acceleration ladder")
    for folder in benches:
        r = read_json(folder / "bench.json")
        env, model = r.get("environment") or {}, r.get("model") or {}
        card = env.get("device_name") or env.get("device") or "unknown"
        sec.blocks.append(Heading(f"{card} — {model.get('source')}, {r.get('width')}x{r.get('height')}, "
                                  f"{r.get('steps')} steps ({relative_path(folder, root)})"))
        details = [f"Card: {card}" + (f" (sm{env['compute_capability']}, {env.get('memory_gib', 0):.0f} GiB, "
                                      f"driver {env.get('driver')}, CUDA {env.get('cuda_runtime')})"
                                      if env.get("cuda") else " (no GPU: CPU run)"),
                   f"Model: {model.get('source')} ({model.get('kind')}); covers the {r.get('coverage')}",
                   f"Timing: {r.get('timing')}"]
        settings = r.get("settings") or {}
        if settings.get("teacache_schedule"):
            details.append(f"TeaCache: {settings['teacache_schedule']}")
        sec.blocks.append(Bullets(details))
        fig = figure_from_file(folder / "bench.png", f"Speedup per rung over the first rung (per image) on {card}; "
                               "dashed lines: this card's arithmetic floor where measured.",
                               f"speed-{slug(str(card))}-{slug(folder.name)}")
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
            rows.append([rung["name"], rung.get("adds", ""), fmt_number(step.get("median"), ".4f"),
                         fmt_number((rung.get("image_s") or {}).get("median"), ".3f")
                         + (" (extrap.)" if rung.get("image_extrapolated") else ""),
                         fmt_number(rung.get("speedup"), ".2f", "x"),
                         fmt_number(rung.get("speedup_vs_previous"), ".2f", "x"),
                         fmt_number(rung.get("floor_ratio"), ".2f", "x")])
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
                                       f"({fmt_number(t['value'], '.2f', 'x')})" for t in targets]))
        if r.get("command"):
            sec.blocks.append(Code(r["command"]))
    return sec

