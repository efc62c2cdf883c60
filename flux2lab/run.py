"""`python -m flux2lab.run`: run a frozen config on prompts, on one GPU or many.

    python -m flux2lab.run --config experiments/frozen/x.json --prompts prompts.jsonl --out out/
    torchrun --nproc-per-node 4 -m flux2lab.run --config ... --prompts ... --out ...

The frozen config is applied as frozen; under torchrun with N processes the transformer runs Ulysses of degree N.
Its step cache takes the same decision on every rank (TeaCache reduces its distance over the ranks; TaylorSeer and
MagCache follow fixed schedules); FirstBlockCache and SeaCache decide from each rank's own tokens, so a config
with one of them is refused on more than one process before any model work.
Rank 0 writes the images, `records.jsonl` and `summary.json`; a rerun into the same --out skips finished images.
How ranks agree, fail and tear down: docs/DESIGN.md, "Running on many GPUs".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from flux2lab.cli import command_parser, device_name, non_negative_int, positive_float, run_main, seed_int

RECORDS = "records.jsonl"
SUMMARY = "summary.json"


def build_parser() -> argparse.ArgumentParser:
    from flux2lab.parallel import DEFAULT_TIMEOUT_S

    p = command_parser(
        "run",
        description="Run a frozen flux2lab config on a prompt set: one GPU, or several under "
                    "`torchrun --nproc-per-node N -m flux2lab.run ...` (Ulysses sequence parallelism).",
    )
    p.add_argument("--config", type=Path, required=True, help="frozen config JSON (from search --freeze or "
                                                             "python -m flux2lab.frozen)")
    p.add_argument("--prompts", type=Path, required=True, help="prompt file (.jsonl manifest or one prompt a line)")
    p.add_argument("--out", type=Path, required=True, help="output folder: images, records.jsonl, summary.json")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of prompts without their own: seed + position")
    p.add_argument("--model", help="load the weights from here instead of the model the config names (e.g. a "
                                   "local copy); a differing revision is warned about")
    p.add_argument("--device", type=device_name, help="cpu | cuda (default: cuda if present); under torchrun rank r uses "
                                    "cuda:LOCAL_RANK")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="model dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--warmup", type=non_negative_int, default=0, metavar="N",
                   help="run N untimed, unsaved images first (compilation, graph capture) so records and the "
                        "summary show steady-state speed")
    p.add_argument("--gpu-memory", type=positive_float, metavar="GIB",
                   help="plan for a card of this many GiB (default: what the card has free); a frozen recipe that "
                        "cannot fit is refused before loading, with the fix")
    p.add_argument("--pg-timeout", type=positive_float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="how long ranks wait for each other before the job fails")
    return p


def _file_stem(entry_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", entry_id)


def _done(out: Path, sha256: str) -> set[tuple[str, int]]:
    """(id, seed) pairs already written for this config; refuses a folder holding another config's images. A last
    line cut short by an interruption is cut off (that image is made again), so the next record starts a line."""
    path = out / RECORDS
    if not path.is_file():
        return set()
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)
    done = set()
    from flux2lab.common.errors import Flux2LabError

    for n, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a damaged line: that image is made again
        if rec.get("config_sha256") != sha256:
            raise Flux2LabError(
                f"{path}, line {n}: {out} holds images of another config ({str(rec.get('config_sha256'))[:12]}); "
                "use a new --out for this config."
            )
        if rec.get("file") and (out / rec["file"]).is_file():
            done.add((rec["id"], rec["seed"]))
    return done


def _save(image: Any, out: Path, stem: str) -> str:
    """Write atomically (temp file, then rename) so an interrupted run never leaves a half image behind."""
    import torch

    if hasattr(image, "save"):
        name = f"{stem}.png"
        tmp = out / f".{name}.tmp"
        image.save(tmp, format="PNG")
    else:  # models without a VAE return latents
        name = f"{stem}.pt"
        tmp = out / f".{name}.tmp"
        torch.save(image.detach().cpu(), tmp)
    os.replace(tmp, out / name)
    return name


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flux2lab import parallel
    from flux2lab.pipeline.models import check_source

    if args.model is not None:
        check_source(args.model)
    env = parallel.init(args.device, args.pg_timeout)
    try:
        return _run(args, env)
    finally:
        parallel.shutdown(args.pg_timeout)


def _run(args: argparse.Namespace, env: Any) -> int:
    import torch
    from tqdm.auto import tqdm

    from flux2lab import parallel
    from flux2lab.common.errors import Flux2LabError
    from flux2lab.common.files import prepare_output_dir
    from flux2lab.pipeline.core import generate, resolution
    from flux2lab.pipeline.frozen import load_frozen
    from flux2lab.pipeline.memory import load_for
    from flux2lab.pipeline.models import model_info
    from flux2lab.pipeline.prompts import load_prompts, seeds_for
    from flux2lab.pipeline.recipe import RecipeError

    def say(msg: str) -> None:
        if env.is_main:
            print(msg, file=sys.stderr, flush=True)

    frozen = load_frozen(args.config)
    entries = load_prompts(args.prompts)
    seeds = seeds_for(entries, args.seed)
    stems = [_file_stem(e.id) for e in entries]
    if len(set(stems)) != len(stems):
        raise Flux2LabError(f"{args.prompts}: prompt ids must stay distinct as file names; {stems} collide.")
    recipe = frozen.recipe
    if recipe.ulysses_degree != env.world_size:
        say(f"note: config {frozen.short_hash} was frozen with ulysses_degree {recipe.ulysses_degree}; running "
            f"with {env.world_size} process(es), so Ulysses degree {env.world_size}.")
        try:  # a step cache that decides from each rank's own tokens is refused here, before the model loads
            recipe = recipe.replace(ulysses_degree=env.world_size)
        except RecipeError as e:
            raise Flux2LabError(f"config {frozen.short_hash} cannot run on {env.world_size} processes (Ulysses "
                                f"degree {env.world_size}): {e}") from None
    prepare_output_dir(args.out, "--out")

    pipe = load_for(args.model or frozen.model.source, recipe, device=str(env.device), dtype=args.dtype,
                    gpu_memory_gib=args.gpu_memory)
    info = model_info(pipe)
    for warning in frozen.model_warnings(info):
        say(f"warning: {warning}")
    height, width = resolution(pipe, recipe)
    parallel.check_sequence(pipe, height, width, info.max_sequence_length, env.world_size)

    done = parallel.broadcast_object(_done(args.out, frozen.sha256) if env.is_main else None)
    todo = [(e, s, stem) for e, s, stem in zip(entries, seeds, stems) if (e.id, s) not in done]
    say(f"config {frozen.short_hash} on {env.world_size} x {env.device.type}: {len(todo)} image(s) to make, "
        f"{len(entries) - len(todo)} already in {args.out}")

    for _ in range(args.warmup if todo else 0):
        generate(pipe, [todo[0][0].prompt], [todo[0][1]], recipe)

    made = []
    for entry, seed, stem in tqdm(todo, desc="images", unit="img", disable=not env.is_main):
        rec = generate(pipe, [entry.prompt], [seed], recipe, time_steps=True)
        record, image = rec.records[0], rec.images[0]
        # Every rank must take the same cache decision at every step (else the next all-to-all deadlocks or the
        # image is wrong): TeaCache's skipped steps and the block stack each step really computed.
        decisions = parallel.all_gather_object((record.skipped_steps, record.step_fractions))
        if any(d != decisions[0] for d in decisions):
            raise RuntimeError(f"{recipe.cache.method} cache decisions differ between ranks for '{entry.id}': "
                               f"{decisions}. Every rank must decide alike; this is a flux2lab bug.")
        if not env.is_main:
            continue
        row = {
            "id": entry.id, "config_sha256": frozen.sha256, "file": _save(image, args.out, stem), "seed": seed,
            "prompt": entry.prompt.text, "reference_images": record.reference_images,
            "ranks": env.world_size, "height": height, "width": width, "steps": recipe.steps,
            "wall_s": record.wall_s, "step_s": record.step_s, "mean_step_s": _mean(record.step_s or []),
            "skipped_steps": record.skipped_steps, "teacache": record.teacache, "cache_method": record.cache_method,
            "computed_fraction": record.computed_fraction, "step_fractions": record.step_fractions,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if env.world_size > 1:
            row["skipped_steps_by_rank"] = [d[0] for d in decisions]
            row["step_fractions_by_rank"] = [d[1] for d in decisions]
        with open(args.out / RECORDS, "a") as f:
            f.write(json.dumps(row) + "\n")
        made.append(row)

    if env.is_main:
        from flux2lab.hooks.cudagraphs import graphs_of

        graphs = graphs_of(pipe.transformer)
        walls = [r["wall_s"] for r in made]
        steps = [s for r in made for s in r["step_s"] or []]
        skipped = sum(len(r["skipped_steps"]) for r in made)
        fractions = [r["computed_fraction"] for r in made if r["computed_fraction"] is not None]
        summary = {
            "config": str(args.config), "config_sha256": frozen.sha256, "model": info.source,
            "revision": info.revision, "recipe": recipe.to_dict(), "ranks": env.world_size,
            "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu",
            "height": height, "width": width, "warmup_images": args.warmup if todo else 0,
            "images_made": len(made), "images_total": len(entries),
            "mean_wall_s": _mean(walls), "mean_step_s": _mean(steps),
            "skipped_fraction": skipped / (len(made) * recipe.steps) if made else None,
            "cache_method": recipe.cache.method,
            "computed_fraction": _mean(fractions) if len(fractions) == len(made) else None,
            "cache_decisions_identical_on_all_ranks": True,
            "cuda_graph_captures": graphs.captures if graphs else None,
        }
        (args.out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        mean = ""
        if made:
            counted = summary["computed_fraction"]
            counted = "" if counted is None else f", {counted:.0%} of the block stack computed"
            mean = f" (mean {summary['mean_wall_s']:.2f} s/image{counted})"
        print(f"{len(made)} image(s) written to {args.out}{mean}; records: {args.out / RECORDS}")
    return 0


if __name__ == "__main__":
    run_main(main)
