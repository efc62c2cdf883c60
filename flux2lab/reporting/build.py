"""Build a report: discover what an experiments folder holds and make one section per kind found.

Sections come in the order of the data flow (calibration, search, quality, frozen configs and runs, speed),
then provenance, which is always there.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from flux2lab.common.errors import Flux2LabError
from flux2lab.reporting.discovery import discover
from flux2lab.reporting.document import Report, read_json
from flux2lab.reporting.provenance import provenance_section
from flux2lab.reporting.sections.calibration import calibration_section
from flux2lab.reporting.sections.quality import quality_section
from flux2lab.reporting.sections.run import run_section
from flux2lab.reporting.sections.search import load_studies, search_section
from flux2lab.reporting.sections.speed import speed_section


def build(experiments: str | Path | None, *, bench_dirs: Sequence[str | Path] = (), storages: Sequence[str] = (),
          title: str | None = None, command: str | None = None) -> Report:
    """Scan the folder(s) and make a section for each kind found, in the order of the data flow (calibration,
    search, quality, frozen configs and runs, speed), then provenance. A storage given in `storages` must open
    (a studies.db found in the folder that cannot be read is reported in the search section instead)."""
    _check_storages(storages)
    found = discover(experiments, bench_dirs, storages)
    if found.empty:
        where = experiments if experiments is not None else "the --bench folders"
        raise Flux2LabError(f"nothing to report in {where}: no calibration fit.json, studies.db, compare "
                            "metrics.json, frozen config, run summary.json or bench.json there. Run a stage first "
                            "(python -m flux2lab.demo runs them all), or point --experiments at its output.")
    root = found.root
    demo = (read_json(found.demo) if found.demo else None) or {}
    studies, problems = load_studies(found.storages, found.frozen, root)
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


def _check_storages(urls: Sequence[str]) -> None:
    from flux2lab import study as st

    for url in urls:
        try:
            st.study_names(st.open_storage(url))
        except Flux2LabError as e:
            raise Flux2LabError(f"--storage: {e}") from None
