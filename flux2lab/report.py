"""`python -m flux2lab.report`: the quality/speed tradeoff report of an experiments folder, as HTML and markdown.

    python -m flux2lab.report --experiments experiments/ --out reports/mine/
    python -m flux2lab.report --experiments experiments/demo --bench reports/benchmarks/h100 --out reports/h100/

The library is `flux2lab.reporting`; this module only turns flags into its calls and prints.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from flux2lab.cli import command_parser, run_main


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "report",
        description="Scan an experiments folder (calibration runs, studies, comparisons, frozen configs, run "
                    "outputs, benchmarks) and write one self-contained index.html (images embedded, no network "
                    "needed) and index.md (images beside it) with a section for each kind found, plus provenance.",
    )
    p.add_argument("--experiments", type=Path, help="folder the stages wrote into (e.g. experiments/ or the demo's "
                                                    "--out); optional when --bench is given")
    p.add_argument("--bench", type=Path, action="append", default=[], metavar="DIR",
                   help="a benchmark folder (bench.json from python -m flux2lab.bench), e.g. "
                        "reports/benchmarks/h100; repeat for several cards")
    p.add_argument("--storage", action="append", default=[], metavar="URL",
                   help="an Optuna storage URL to read studies from besides EXPERIMENTS/**/studies.db")
    p.add_argument("--out", type=Path, required=True, help="report folder: index.html, index.md, images/")
    p.add_argument("--title", help="report title (default: from the experiments folder's name)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flux2lab.common.errors import Flux2LabError
    from flux2lab.common.files import prepare_output_dir
    from flux2lab.reporting import build, write

    if args.experiments is None and not args.bench and not args.storage:
        raise Flux2LabError("give --experiments DIR (and/or --bench DIR, --storage URL): what to report on.")
    prepare_output_dir(args.out, "--out")
    words = sys.argv[1:] if argv is None else argv
    report = build(args.experiments, bench_dirs=args.bench, storages=args.storage, title=args.title,
                   command=f"python -m flux2lab.report {shlex.join(words)}")
    paths = write(report, args.out)
    print("sections: " + ", ".join(s.title for s in report.sections))
    print(f"report: {paths['html']} (markdown: {paths['markdown']})")
    return 0


if __name__ == "__main__":
    run_main(main)
