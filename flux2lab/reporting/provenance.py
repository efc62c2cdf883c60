"""The provenance section, always in the report: library versions now, versions the artefacts recorded, the
commands that made them, and the hashes that tie recipes, configs and results together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flux2lab import dist_version
from flux2lab.common.formatting import fmt_number
from flux2lab.reporting.discovery import Found
from flux2lab.reporting.document import Bullets, Section, Table, file_sha256, read_json, relative_path, short_json_hash
from flux2lab.reporting.sections.search import LoadedStudy


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


def provenance_section(found: Found, studies: Sequence[LoadedStudy], demo: dict[str, Any],
                       command: str | None) -> Section:
    sec = Section("provenance", "Provenance")
    root = found.root
    benches = {folder: read_json(folder / "bench.json") or {} for folder in found.benches}
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
        recorded.append([relative_path(folder / "bench.json", root), env.get("flux2lab"), env.get("diffusers"),
                         env.get("torch")])
    for path in found.frozen:
        prov = (read_json(path) or {}).get("provenance") or {}
        recorded.append([relative_path(path, root), prov.get("flux2lab_version"), "—", "—"])
    if recorded:
        sec.blocks.append(Table(["artefact", "flux2lab", "diffusers", "torch"],
                                [[str(c) if c else "—" for c in row] for row in recorded],
                                "Versions recorded by the artefacts themselves when they were made."))

    commands = []
    if demo:
        commands.append(["demo", demo.get("command", ""), fmt_number(demo.get("wall_s"), ".0f", " s")])
        commands += [[s["name"], s.get("command", ""), fmt_number(s.get("wall_s"), ".0f", " s")]
                     for s in demo.get("stages") or []]
    for bench in benches.values():
        if bench.get("command") and not demo:
            commands.append(["bench", bench["command"], fmt_number(bench.get("wall_s"), ".0f", " s")])
    if command:
        commands.append(["report", command, ""])
    if commands:
        sec.blocks.append(Table(["stage", "command", "wall time"], commands,
                                "The demo runs its stages in one process through the library; each row is the "
                                "command that does the same stage on its own." if demo else ""))

    hashes = []
    for run in found.calibrations:
        hashes.append([relative_path(run / "fit.json", root), "calibration fit (sha256 of the file)",
                       file_sha256(run / "fit.json")[:12]])
    for s in studies:
        hashes.append([f"study {s.name}", "study configuration (sha256 of its canonical JSON)",
                       short_json_hash(s.config.to_dict())])
    for folder in found.comparisons:
        data = read_json(folder / "metrics.json") or {}
        hashes.append([relative_path(folder / "metrics.json", root), "compare: recipe A / recipe B",
                       f"{short_json_hash(data['a']['recipe'])} / {short_json_hash(data['b']['recipe'])}"])
    for path in found.frozen:
        hashes.append([relative_path(path, root), "frozen config (recorded sha256)",
                       str((read_json(path) or {}).get("sha256", ""))[:12]])
    for folder in found.runs:
        hashes.append([relative_path(folder / "summary.json", root), "run: config it ran",
                       str((read_json(folder / "summary.json") or {}).get("config_sha256", ""))[:12]])
    for folder in found.benches:
        hashes.append([relative_path(folder / "bench.json", root), "benchmark result (sha256 of the file)",
                       file_sha256(folder / "bench.json")[:12]])
    if hashes:
        sec.blocks.append(Table(["artefact", "what is hashed", "sha256 (first 12)"], hashes))
    if demo and demo.get("notes"):
        sec.blocks.append(Bullets(list(demo["notes"])))
    return sec

