"""The quality/speed tradeoff report: what an experiments folder holds, as one HTML page and one markdown file.

Results are shared as reports, so the report reads exactly what the stages wrote (DESIGN.md's data flow) and
nothing else: calibration runs, Optuna studies, comparisons, frozen configs, run outputs, benchmarks and the demo's
own record. `discovery` finds them, `sections/` makes one section per kind, `provenance` adds versions, commands
and hashes, `build` puts the `document` together and `render` writes it.

    report = build("experiments/demo", bench_dirs=["reports/benchmarks/h100"])
    paths = write(report, "reports/demo")          # {"html": ..., "markdown": ..., "images": ...}
"""

from flux2lab.reporting.build import build
from flux2lab.reporting.document import Bullets, Code, Figure, Heading, Report, Section, Table, Text
from flux2lab.reporting.render import to_html, to_markdown, write

__all__ = ["Bullets", "Code", "Figure", "Heading", "Report", "Section", "Table", "Text", "build", "to_html",
           "to_markdown", "write"]
