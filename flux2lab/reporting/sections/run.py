"""The run section: frozen configs (hashes verified on load) and the runs made from them, with their images.

Reads frozen config files through `flux2lab.pipeline.frozen.load_frozen` (an edited file shows as REFUSED) and
what `python -m flux2lab.run` wrote: `summary.json`, `records.jsonl` and the images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flux2lab.common.errors import Flux2LabError
from flux2lab.common.formatting import fmt_number, fmt_percent
from flux2lab.reporting.document import (
    Figure,
    Heading,
    Section,
    Table,
    describe_recipe,
    figure_from_matplotlib,
    read_json,
    relative_path,
    slug,
)


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
    return figure_from_matplotlib(fig, f"Images of the run in {folder.name}, with time per image (s) and TeaCache "
                                  "steps skipped.", f"run-{slug(folder.name)}")


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
                rows.append([relative_path(path, root), "REFUSED", str(e)[:200], "", ""])
                continue
            by_hash[f.sha256] = relative_path(path, root)
            prov = f.provenance
            study, trial = prov.get("study") or {}, prov.get("trial") or {}
            origin = (f"study {study.get('name')}, trial {trial.get('number')}" if study else "") or "—"
            metrics = prov.get("metrics") or {}
            shown = ", ".join(f"{k} {fmt_number(v)}" for k, v in metrics.items()
                              if k in ("lpips", "psnr", "ssim", "speedup", "computed_fraction"))
            rows.append([relative_path(path, root), f"{f.sha256[:12]} (verified)",
                         f"{f.model.source}{' @ ' + f.model.revision if f.model.revision else ''}",
                         describe_recipe(f.recipe.to_dict()), f"{origin}; {shown}" if shown else origin])
        sec.blocks.append(Table(["frozen config", "sha256", "model", "recipe", "chosen from; metrics at freeze"],
                                rows, "Hashes are recomputed on load: an edited file would show REFUSED."))
    for folder in runs:
        summary = read_json(folder / "summary.json") or {}
        records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()
                   if line.strip().startswith("{")]
        sha = summary.get("config_sha256", "")
        sec.blocks.append(Heading(f"Run {relative_path(folder, root)}"))
        sec.blocks.append(Table(["field", "value"], [
            ["config", f"{summary.get('config')} (sha256 {sha[:12]}"
                       + (f", = {by_hash[sha]})" if sha in by_hash else ")")],
            ["model", f"{summary.get('model')}" + (f" @ {summary['revision']}" if summary.get("revision") else "")],
            ["device", f"{summary.get('device')} x {summary.get('ranks')}"],
            ["images", (f"{summary.get('images_made')} made this time, {summary.get('images_total')} in the set, "
                       f"{len(records)} recorded")],
            ["size, steps", f"{summary.get('width')}x{summary.get('height')}, {(summary.get('recipe') or {}).get('steps')}"],
            ["mean time per image", fmt_number(summary.get("mean_wall_s"), ".3f", " s")],
            ["mean time per step", fmt_number(summary.get("mean_step_s"), ".4f", " s")],
            ["cache", str(summary.get("cache_method", "-"))],
            ["block stack computed", fmt_percent(summary.get("computed_fraction"))],
            ["steps skipped by TeaCache", fmt_percent(summary.get("skipped_fraction"))],
        ]))
        fig = _thumbnails(folder, records)
        if fig:
            sec.blocks.append(fig)
    return sec

