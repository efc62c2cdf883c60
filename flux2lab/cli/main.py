"""The `flux2lab <command> [args]` script (and `python -m flux2lab`): one name for every command module.

`flux2lab generate ...` runs exactly what `python -m flux2lab.generate ...` runs; the zoo's commands are
`flux2lab zoo-train`, `zoo-evaluate` and `zoo-world`. Listing the commands reads each module's docstring
without importing it, so `flux2lab --help` stays fast.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import sys
from importlib.util import find_spec

from flux2lab import __version__
from flux2lab.cli import quiet_libraries, run_main, set_prog

# Command name -> module under flux2lab, in the order of the main job.
COMMANDS = {
    "generate": "generate", "calibrate": "calibrate", "search": "search", "compare": "compare",
    "frozen": "frozen", "run": "run", "bench": "bench", "report": "report", "demo": "demo",
    "zoo-train": "zoo.train", "zoo-evaluate": "zoo.evaluate", "zoo-world": "zoo.world",
}


def summary(module: str) -> str:
    """The first line of flux2lab.<module>'s docstring, without its "`python -m flux2lab.X`: " prefix."""
    spec = find_spec(f"flux2lab.{module}")
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    line = re.sub(r"^`python -m flux2lab\.[\w.]+`: ", "", doc.split("\n", 1)[0]).rstrip(".")
    return line if line[1:2].isupper() else line[:1].lower() + line[1:]


def build_parser(prog: str) -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS)) + 2
    listing = "\n".join(f"  {name:<{width}}{summary(module)}" for name, module in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog=prog, usage="%(prog)s <command> [args]", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make FLUX.2 [dev] fast and prove what the speed costs in image quality.",
        epilog=f"commands:\n{listing}\n\n`{prog} <command> --help` shows a command's options. `{prog} X` runs "
               "`python -m flux2lab.X` (zoo-X: flux2lab.zoo.X).",
    )
    p.add_argument("--version", action="version", version=f"flux2lab {__version__}")
    p.add_argument("command", choices=COMMANDS, metavar="<command>", help=argparse.SUPPRESS)
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, prog: str = "flux2lab") -> None:
    parser = build_parser(prog)
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.print_help(sys.stderr)
        sys.exit(2)
    args = parser.parse_args(argv)
    module = COMMANDS[args.command]
    set_prog(module, f"{prog} {args.command}")
    quiet_libraries()  # before the import: some command modules import torch, diffusers and torchao at the top
    run_main(importlib.import_module(f"flux2lab.{module}").main, args.args)


if __name__ == "__main__":
    main()
