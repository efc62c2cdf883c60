"""The memory plan on a real card: the whole FLUX.2 [dev] pipeline (full size, random weights) under an 80 GiB cap.

On one H200 (141 GiB), `torch.cuda.set_per_process_memory_fraction(80 GiB / total)` makes the card an 80 GB one
for this process. Each run is a precision for the transformer and the text encoder, an offload mode, and
optionally the text encoder released after encoding (spec `transformer/text_encoder/offload[/release]`):

1. the memory plan is made first (`flux2lab.pipeline.memory.plan`, components on the meta device, the card's
   budget read under the cap); a run it refuses is recorded as refused, with the fixes it names
   (`--ignore-plan` runs it anyway, to check the refusal was right);
2. the pipeline is built staged in host memory: each component gets random weights on the card, then moves to
   host memory, one at a time;
3. one warm-up image (2 steps) applies the recipe: components are quantized one at a time on the card, then
   placed there or handed to diffusers' offloading;
4. `--images` images are timed (the text encoding is inside each image's time, except in `release` runs,
   where all prompts are encoded up front in the warm-up).

Recorded per run: seconds per image, the peak of allocated and reserved memory while building and applying, and
while generating, next to the plan's estimate. Each run is a child process, so one that runs out of memory does
not take the others with it; results are merged into OUT/memory_plan.json as they arrive (a rerun skips runs
already recorded, `--redo` repeats them). Host memory: the BF16 pipeline takes 104 GiB of it; group offloading
pins a second copy, so `bf16/bf16/group` needs about 210 GiB of host memory.

    python scripts/gpu_memory_plan.py --out reports/benchmarks/memory-plan-h200            # one H200
    python scripts/gpu_memory_plan.py --runs bf16/bf16/model,fp8/fp8/none --images 1 ...     # a subset
    python scripts/gpu_memory_plan.py --tiny --device cpu --steps 3 --out /tmp/memory-plan   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
PROMPT = "a red fox standing in fresh snow at golden hour, detailed fur, soft light"
DEFAULT_RUNS = (
    "bf16/bf16/none", "bf16/bf16/model", "bf16/bf16/model/release", "bf16/bf16/group",
    "fp8/fp8/none", "fp8/fp8/model", "fp8/fp8/group", "fp8/bf16/none",
    "nvfp4/fp8/none", "nvfp4/fp8/model", "nvfp4/fp8/group", "nvfp4/bf16/none",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                   help="comma-separated transformer/text_encoder/offload[/release] specs (default: all of them)")
    p.add_argument("--cap-gib", type=float, default=80.0, help="memory cap for the process in GiB (default 80)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if present)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps per timed image (default 50)")
    p.add_argument("--images", type=int, default=2, help="timed images per run (default 2)")
    p.add_argument("--size", type=int, default=None, help="height = width (default: the model's, 1024 / tiny 64)")
    p.add_argument("--tiny", action="store_true", help="the tiny pipeline instead of the full-size one (smoke)")
    p.add_argument("--ignore-plan", action="store_true", help="run what the plan refuses, to check the refusal")
    p.add_argument("--redo", action="store_true", help="repeat runs already recorded in OUT")
    p.add_argument("--child-timeout", type=int, default=1800, help="seconds one run may take (default 1800)")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "memory-plan")
    p.add_argument("--child", help=argparse.SUPPRESS)  # run this one spec here and print its JSON record
    return p


def parse_spec(spec: str):
    from flux2lab.pipeline.recipe import Recipe

    parts = spec.split("/")
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "release"):
        raise SystemExit(f"run {spec!r}: write transformer/text_encoder/offload[/release], e.g. fp8/fp8/model")
    recipe = Recipe(transformer_precision=parts[0], text_encoder_precision=parts[1], offload=parts[2])
    return recipe, len(parts) == 4


def components(tiny: bool, dtype: torch.dtype) -> tuple[dict, dict]:
    """The components as module trees (meta device at full size) and the model's native size."""
    from flux2lab.pipeline import memory

    if tiny:
        return memory.components_of("tiny", dtype)
    from flux2lab.benchmark import full_size_text_encoder_and_vae
    from flux2lab.pipeline.models import FULL_TEXT_TOKENS, build_transformer_on_meta

    text_encoder, vae = full_size_text_encoder_and_vae()
    return ({"transformer": build_transformer_on_meta(), "text_encoder": text_encoder, "vae": vae},
            {"height": 1024, "width": 1024, "text_tokens": FULL_TEXT_TOKENS})


def build_staged(tiny: bool, device: torch.device, dtype: torch.dtype):
    """The pipeline in host memory, to compute on `device`: each full-size component gets random weights on the
    card and moves to host memory before the next one is made."""
    from flux2lab.pipeline.models import load_pipeline

    if tiny:
        return load_pipeline("tiny", device=str(device), dtype=dtype, staged=True)
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    from flux2lab.pipeline import tokenizer as tok
    from flux2lab.pipeline.models import FULL_TEXT_TOKENS, ModelInfo, compute_on, free_memory, materialize_random

    metas, _ = components(False, dtype)
    parts = {}
    for seed, (name, module) in enumerate(metas.items()):
        parts[name] = materialize_random(module, device, dtype, seed).to("cpu")
        free_memory()
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), tokenizer=tok.build_processor(), **parts)
    pipe.set_progress_bar_config(disable=True)
    pipe.flux2lab_model = ModelInfo(source="full-random (whole pipeline)", kind="full-random", height=1024,
                                    width=1024, max_sequence_length=FULL_TEXT_TOKENS,
                                    text_encoder_out_layers=(10, 20, 30))
    return compute_on(pipe, device)


def peaks(device: torch.device) -> dict[str, float | None]:
    if device.type != "cuda":
        return {"allocated_gib": None, "reserved_gib": None}
    return {"allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


def progress(started: float, phase: str, device: torch.device) -> None:
    """One line on stderr per phase, so a run that times out still says how far it got and what memory it held."""
    host = ""
    try:
        import psutil  # optional: present with torch on most machines

        vm = psutil.virtual_memory()
        host = f", host available {vm.available / GIB:.1f} of {vm.total / GIB:.1f} GiB"
    except ImportError:
        pass
    card = f", card reserved {torch.cuda.memory_reserved(device) / GIB:.1f} GiB" if device.type == "cuda" else ""
    print(f"[memory-plan {time.perf_counter() - started:6.1f} s] {phase}{card}{host}", file=sys.stderr, flush=True)


def run_one(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    from flux2lab.common.errors import Flux2LabError
    from flux2lab.pipeline import memory
    from flux2lab.pipeline.core import generate
    from flux2lab.pipeline.models import default_dtype

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = default_dtype(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total), device)
    recipe, release = parse_spec(spec)
    recipe = recipe.replace(steps=args.steps, height=args.size, width=args.size)
    comps, native = components(args.tiny, dtype)
    card = memory.card_memory(device, None if device.type == "cuda" else args.cap_gib)
    plan = memory.plan("tiny" if args.tiny else "FLUX.2 [dev] (random weights)", comps, recipe,
                       height=native["height"], width=native["width"], text_tokens=native["text_tokens"],
                       dtype=dtype, card=card)
    record: dict[str, Any] = {"run": spec, "release_text_encoder": release, "plan": plan.to_dict(),
                              "plan_need_gib": plan.need / GIB, "status": "ok"}
    if not plan.fits and not args.ignore_plan:
        try:
            plan.check()
        except Flux2LabError as refusal:
            return {**record, "status": "refused by the plan", "refusal": str(refusal)}
    started = start = time.perf_counter()
    progress(started, "building the pipeline staged in host memory", device)
    pipe = build_staged(args.tiny, device, dtype)
    record["build_s"] = time.perf_counter() - start
    prompts = [PROMPT] * args.images
    progress(started, "built; applying the recipe and one warm-up image", device)
    start = time.perf_counter()
    warm = generate(pipe, prompts[:1], 0, recipe.replace(steps=2), release_text_encoder=release)
    record.update(apply_and_warmup_s=time.perf_counter() - start, encode_s=warm.encode_s,
                  peak_build_and_apply=peaks(device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    progress(started, f"warmed up; timing {args.images} image(s) of {args.steps} steps", device)
    timed = generate(pipe, prompts, list(range(1, args.images + 1)), recipe)
    progress(started, "done", device)
    record.update(seconds_per_image=timed.mean_wall_s, image_s=[r.wall_s for r in timed.records],
                  peak_generate=peaks(device), text_encoding_in_image_time=not release,
                  transformer_after=str(next(pipe.transformer.parameters()).device))
    return record


def run_child(spec: str, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """One run in a fresh process; an out-of-memory or a crash is recorded, not fatal."""
    cmd = [sys.executable, __file__, *argv, "--child", spec]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as timeout:
        stderr = timeout.stderr.decode(errors="replace") if isinstance(timeout.stderr, bytes) else timeout.stderr
        reached = [line for line in (stderr or "").splitlines() if line.startswith("[memory-plan")]
        return {"run": spec, "status": f"timed out after {args.child_timeout} s", "progress": reached}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    reached = [line for line in done.stderr.splitlines() if line.startswith("[memory-plan")]
    if done.returncode == 0 and lines:
        return {**json.loads(lines[-1]), "progress": reached}
    tail = (done.stderr or done.stdout).strip().splitlines()[-25:]  # the traceback: which call failed
    return {"run": spec, "status": f"failed (exit {done.returncode})", "error": "\n".join(tail), "progress": reached}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(runs: list[dict[str, Any]]) -> str:
    rows = ["| run | status | plan GiB | peak reserved GiB (build / generate) | s per image |", "|---|---|---|---|---|"]
    for r in runs:
        build, gen = (r.get(k, {}).get("reserved_gib") for k in ("peak_build_and_apply", "peak_generate"))
        rows.append(f"| {r['run']} | {r['status']} | {_fmt(r.get('plan_need_gib'))} | {_fmt(build)} / {_fmt(gen)} | "
                    f"{_fmt(r.get('seconds_per_image'))} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    from flux2lab.benchmark import environment
    from flux2lab.pipeline.models import default_device

    args.device = args.device or default_device()
    if args.child:
        print(json.dumps(run_one(args.child, args)))
        return 0
    specs = [s.strip() for s in args.runs.split(",") if s.strip()]
    for spec in specs:
        parse_spec(spec)  # every spec is checked before the first run
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "memory_plan.json"
    report = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    report.update(environment=environment(torch.device(args.device)), cap_gib=args.cap_gib, steps=args.steps,
                  images=args.images, model="tiny" if args.tiny else "FLUX.2 [dev] full size, random weights")
    done = {r["run"] for r in report["runs"]}
    for spec in specs:
        if spec in done and not args.redo:
            print(f"{spec}: recorded already (--redo repeats it)")
            continue
        result = run_child(spec, args, argv)
        report["runs"] = [r for r in report["runs"] if r["run"] != spec] + [result]
        path.write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "memory_plan.md").write_text(table(report["runs"]))
        per_image = result.get("seconds_per_image")
        print(f"{spec}: {result['status']}" + (f", {per_image:.2f} s/image" if per_image is not None else ""))
    print(f"wrote {path} and {args.out / 'memory_plan.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
