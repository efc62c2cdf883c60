"""`python -m flux2lab.frozen`: freeze a recipe (or re-freeze an edited frozen config), or check one."""

from __future__ import annotations

import argparse
from pathlib import Path

from flux2lab.cli import run_main
from flux2lab.common.errors import Flux2LabError
from flux2lab.pipeline.frozen import load_frozen, refreeze


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flux2lab.frozen",
        description="Freeze a recipe (or re-freeze an edited frozen config) into a hashed, versioned config; "
                    "or --check one.",
    )
    p.add_argument("source", type=Path, help="a recipe JSON, or a frozen config to check / re-freeze")
    p.add_argument("--out", type=Path, help="where to write the (re-)frozen config")
    p.add_argument("--model", help="model the recipe is for (tiny | full-random | hub id | folder); "
                                   "default: the one the config names")
    p.add_argument("--revision", help="the model's revision or weight checksum, if known")
    p.add_argument("--check", action="store_true", help="only verify SOURCE and print what it holds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check:
        f = load_frozen(args.source)
        print(f"{args.source}: OK (sha256 {f.sha256}, schema {f.schema_version}, model {f.model.source}"
              f"{' @ ' + f.model.revision if f.model.revision else ''})")
        return 0
    if args.out is None:
        raise Flux2LabError("give --out NEW.json (or --check to only verify).")
    model = {"source": args.model, "revision": args.revision} if args.model else None
    f = refreeze(args.source, model).save(args.out)
    print(f"frozen config written: {f} (sha256 {load_frozen(f).sha256})")
    return 0


if __name__ == "__main__":
    run_main(main)
