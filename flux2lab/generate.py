"""`python -m flux2lab.generate`: images for prompts, plus a JSON record of what happened."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flux2lab.cli import add_model_args, command_parser, positive_float, positive_int, run_main, seed_int, shape_overrides


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "generate",
        description="Generate images with FLUX.2 (optionally accelerated by a recipe) and record timings.",
    )
    add_model_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts", type=Path, help="a prompt file (.jsonl manifest or one prompt a line)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the first image; the next get seed+1...")
    p.add_argument("--recipe", type=Path, help="a recipe JSON (default: plain BF16, no acceleration)")
    p.add_argument("--steps", type=positive_int, help="denoising steps (overrides the recipe)")
    p.add_argument("--height", type=int, help="image height (overrides the recipe; default: the model's)")
    p.add_argument("--width", type=int, help="image width (overrides the recipe; default: the model's)")
    p.add_argument("--offload", choices=["none", "model", "group"],
                   help="diffusers' offloading (overrides the recipe): model = one component on the card at a time, "
                        "group = one block at a time; same images, less memory, slower")
    p.add_argument("--gpu-memory", type=positive_float, metavar="GIB",
                   help="plan for a card of this many GiB (default: what the card has free)")
    p.add_argument("--release-text-encoder", action="store_true",
                   help="encode every prompt first, then free the text encoder's memory for the denoising (with "
                        "--offload model, the transformer and VAE then stay on the card when they fit there together)")
    p.add_argument("--out", type=Path, required=True, help="output folder for PNGs and record.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flux2lab.common.errors import Flux2LabError
    from flux2lab.common.files import prepare_output_dir
    from flux2lab.pipeline.core import Prompt, generate
    from flux2lab.pipeline.memory import load_for
    from flux2lab.pipeline.models import check_source, model_info
    from flux2lab.pipeline.prompts import PromptEntry, load_prompts, seeds_for
    from flux2lab.pipeline.recipe import Recipe

    check_source(args.model)
    entries = load_prompts(args.prompts) if args.prompts else []
    entries += [PromptEntry(Prompt(t), None, f"prompt-{i}") for i, t in enumerate(args.prompt, start=1)]
    if not entries:
        raise Flux2LabError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE.")
    prompts, seeds = [e.prompt for e in entries], seeds_for(entries, args.seed)
    recipe = (Recipe.load(args.recipe) if args.recipe else Recipe()).replace(**shape_overrides(args))
    if args.offload is not None:
        recipe = recipe.replace(offload=args.offload)
    prepare_output_dir(args.out, "--out")

    # The memory plan refuses, with the fix, a recipe that cannot fit the card, before any weight is read.
    pipe = load_for(args.model, recipe, device=args.device, dtype=args.dtype, gpu_memory_gib=args.gpu_memory)
    result = generate(pipe, prompts, seeds, recipe, time_steps=True, progress=True,
                      release_text_encoder=args.release_text_encoder)

    files = []
    for i, (image, rec) in enumerate(zip(result.images, result.records)):
        if hasattr(image, "save"):
            name = f"{i:04d}_seed{rec.seed}.png"
            image.save(args.out / name)
            files.append(name)
        else:  # models without a VAE return latents
            files.append(None)
    record = {
        "model": args.model, "revision": model_info(pipe).revision, "recipe": recipe.to_dict(),
        "images": [{"file": f, **r.to_dict()} for f, r in zip(files, result.records)],
    }
    (args.out / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{len(result.records)} image(s) in {args.out} (mean {result.mean_wall_s:.2f} s/image); "
          f"record: {args.out / 'record.json'}")
    return 0


if __name__ == "__main__":
    run_main(main)
