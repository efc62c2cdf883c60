"""`python -m flux2lab.frozen`: freeze a recipe (or re-freeze an edited frozen config), or check one."""

from __future__ import annotations

import argparse
from pathlib import Path

from flux2lab.cli import command_parser, run_main
from flux2lab.common.errors import Flux2LabError


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "frozen",
        description="Freeze a recipe (or re-freeze an edited frozen config) into a hashed, versioned config; "
                    "or --check one.",
    )
    p.add_argument("source", type=Path, help="a recipe JSON, or a frozen config to check / re-freeze")
    p.add_argument("--out", type=Path, help="where to write the (re-)frozen config")
    p.add_argument("--model", help="model the recipe is for (tiny | full-random | hub id | folder); "
                                   "default: the one the config names")
    p.add_argument("--revision", help="the model's revision or weight checksum, if known")
    p.add_argument("--check", action="store_true", help="only verify SOURCE and print what it holds")
    p.add_argument("--sign", action="store_true", help="verify the frozen config SOURCE and write it to --out "
                                                       "unchanged, signed with FLUX2LAB_FROZEN_KEY")
    p.add_argument("--force", action="store_true", help="replace --out if it already exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flux2lab.pipeline.frozen import KEY_ENV, load_frozen, refreeze, signing_key

    if args.check:
        f = load_frozen(args.source)
        signed = "" if not f.signature else (", signature verified" if signing_key() else
                                             f", signature not checked: {KEY_ENV} is not set")
        print(f"{args.source}: OK (sha256 {f.sha256}, schema {f.schema_version}, model {f.model.source}"
              f"{' @ ' + f.model.revision if f.model.revision else ''}{signed})")
        return 0
    if args.out is None:
        raise Flux2LabError("give --out NEW.json (or --check to only verify).")
    if args.out.exists() and not args.out.is_dir() and not args.force:
        raise Flux2LabError(f"--out {args.out} already exists; choose another file, or add --force to replace it.")
    if args.sign:
        if args.model or args.revision:
            raise Flux2LabError("--sign writes SOURCE unchanged: drop --model/--revision, or re-freeze without --sign.")
        if signing_key() is None:
            raise Flux2LabError(f"--sign needs the signing key: set {KEY_ENV}.")
        frozen = load_frozen(args.source, require_signature=False)
    else:
        model = {"source": args.model, "revision": args.revision} if args.model else None
        frozen = refreeze(args.source, model)
    f = frozen.save(args.out)
    print(f"frozen config written: {f} (sha256 {load_frozen(f, require_signature=False).sha256})")
    return 0


if __name__ == "__main__":
    run_main(main)
