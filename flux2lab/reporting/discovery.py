"""Find what the stages wrote under an experiments folder (and extra benchmark folders), sorted by kind.

Artefacts are recognised by file name and content, not by where they sit, so any layout the stages were
pointed at is found: calibration runs, Optuna storages, comparisons, frozen configs, run outputs, benchmarks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flux2lab.common.errors import Flux2LabError
from flux2lab.reporting.document import read_json


@dataclass
class Found:
    """The artefacts under an experiments folder (and extra benchmark folders), by kind."""

    root: Path | None
    calibrations: list[Path] = field(default_factory=list)  # run folders holding fit.json
    storages: list[str] = field(default_factory=list)  # Optuna storage URLs
    comparisons: list[Path] = field(default_factory=list)  # folders holding a compare metrics.json
    frozen: list[Path] = field(default_factory=list)  # frozen config files
    runs: list[Path] = field(default_factory=list)  # run output folders (summary.json + records.jsonl)
    benches: list[Path] = field(default_factory=list)  # folders holding bench.json
    demo: Path | None = None  # the demo's demo.json

    @property
    def empty(self) -> bool:
        return not (self.calibrations or self.storages or self.comparisons or self.frozen or self.runs
                    or self.benches)


_CACHE_KEY = re.compile(r"[0-9a-f]{24}")  # image cache entries (flux2lab.pipeline.imagecache): never anything else


def discover(experiments: str | Path | None, bench_dirs: Sequence[str | Path] = (),
             storages: Sequence[str] = ()) -> Found:
    """Walk the folder once and sort what the stages wrote by kind (by file name and content, not location)."""
    found = Found(Path(experiments) if experiments is not None else None, storages=list(storages))
    if experiments is not None:
        root = Path(experiments)
        if not root.is_dir():
            raise Flux2LabError(f"--experiments {root}: no such folder. Give the folder the stages wrote into "
                                "(e.g. experiments/ or the demo's --out).")
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            here = Path(folder)
            names = set(files)
            if "fit.json" in names and "run.json" in names:
                found.calibrations.append(here)
            if "studies.db" in names:
                found.storages.append(f"sqlite:///{(here / 'studies.db').resolve()}")
            if "metrics.json" in names and _is_comparison(read_json(here / "metrics.json")):
                found.comparisons.append(here)
            if "summary.json" in names and "records.jsonl" in names:
                found.runs.append(here)
            if "bench.json" in names and _is_bench(read_json(here / "bench.json")):
                found.benches.append(here)
            if "demo.json" in names and here == root:
                found.demo = here / "demo.json"
            for name in sorted(names):
                if name.endswith(".json") and not _CACHE_KEY.fullmatch(name[:-5]) and _is_frozen(here / name):
                    found.frozen.append(here / name)
    for d in bench_dirs:
        d = Path(d)
        if not _is_bench(read_json(d / "bench.json")):
            raise Flux2LabError(f"--bench {d}: no bench.json from python -m flux2lab.bench there.")
        if d.resolve() not in {b.resolve() for b in found.benches}:
            found.benches.append(d)
    return found


def _is_comparison(data: Any) -> bool:
    """A metrics.json written by compare (not some other metrics file)."""
    return isinstance(data, dict) and {"a", "b", "metrics"} <= set(data)


def _is_bench(data: Any) -> bool:
    """A bench.json written by python -m flux2lab.bench."""
    return isinstance(data, dict) and str(data.get("schema", "")).startswith("flux2lab.bench/")


def _is_frozen(path: Path) -> bool:
    """A frozen config: a small JSON file that names its schema."""
    try:
        if path.stat().st_size > 1_000_000:
            return False
        return '"flux2lab.frozen"' in path.read_text(errors="replace")
    except OSError:
        return False

