"""What each step cache itself costs: a computed step with the cache attached, a cached step, the memory it adds.

On `full-random` (the full FLUX.2 [dev] transformer, random weights) at 1024x1024, eager, the transformer is
called step by step exactly as `Flux2Pipeline` calls it, with descending timesteps, in these variants:

- normal:          no cache attached;
- METHOD computed: the cache attached with settings under which every step computes, so each step pays for what
                   the method measures, decides and stores (TeaCache's distance, TaylorSeer's Taylor factors,
                   MagCache's residual, FirstBlockCache's head residual, SeaCache's spectral indicator);
- METHOD cached:   settings under which every step it may reuse is reused (TeaCache replaying a skip of every
                   step after the first; the others with thresholds no distance reaches, or an interval longer
                   than the image), so those steps show what a cached step costs.

Which steps computed is read off one counted image per variant (flux2lab.hooks.block_counter: a step is cached
when less than the whole block stack ran); the timed images run without the counter. Each step is timed with CUDA
events (time.perf_counter on CPU), over `--rounds` images per variant, the first `--warmup` steps of every image
left out; medians are reported. Peak memory: the most allocated during a variant's images, less the normal
variant's. Targets (issue 14): a computed step costs < 2% more than a normal one, a cached step < 10% of a normal
one, a method adds < 15 GiB. Results are written after every method.

    python scripts/gpu_cache_overhead.py --out reports/benchmarks/cache-overhead        # one H100/H200, ~3-4 min
    python scripts/gpu_cache_overhead.py --model tiny --device cpu --steps 5 --out /tmp/o   # CPU check
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"computed_overhead_pct": 2.0, "cached_cost_pct": 10.0, "added_peak_gib": 15.0}
GIB = 2**30
NEVER = 1e9  # a threshold no relative distance reaches


def variants(steps: int) -> dict[str, tuple[str, dict, dict]]:
    """name -> (method, settings that compute every step, settings that reuse every step they may)."""
    return {
        "teacache": ("teacache", {"threshold": 0.0, "ret_steps": 0},
                     {"ret_steps": 0, "replay_skips": tuple(range(1, steps))}),
        "taylorseer": ("taylorseer", {"cache_interval": 1, "disable_cache_before_step": 1},
                       {"cache_interval": 2 * steps, "disable_cache_before_step": 2}),
        "taylorseer_lite": ("taylorseer", {"cache_interval": 1, "disable_cache_before_step": 1, "use_lite_mode": True},
                            {"cache_interval": 2 * steps, "disable_cache_before_step": 2, "use_lite_mode": True}),
        "magcache": ("magcache", {"mag_ratios": [1.5] * steps, "threshold": 0.0, "retention_ratio": 0.0},
                     {"mag_ratios": [1.0] * steps, "threshold": 1.0, "retention_ratio": 0.0, "max_skip_steps": steps}),
        "first_block": ("first_block", {"threshold": 0.0}, {"threshold": NEVER}),
        "seacache": ("seacache", {"threshold": 0.0},
                     {"threshold": NEVER, "max_consecutive_cached": 0, "cache_end_steps": 0}),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="full-random", help="full-random (default) | tiny | a FLUX.2 folder or hub id")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if present)")
    p.add_argument("--size", type=int, default=None, help="height = width (default: the model's, 1024; tiny: 64)")
    p.add_argument("--steps", type=int, default=8, help="steps per image (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="leading steps of each image left out (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="timed images per variant (default 2)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of: " + ", ".join(variants(2)) + " (default: all)")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "cache-overhead")
    return p


def transformer_inputs(pipe, size: int) -> dict:
    """The transformer's inputs for one 1-image step at `size` x `size`, built by the pipeline's own helpers."""
    from flux2lab.pipeline.core import synthetic_prompt_embeds

    t = pipe.transformer
    latents, latent_ids = pipe.prepare_latents(1, t.config.in_channels // 4, size, size, t.dtype, t.device,
                                               torch.Generator(device="cpu").manual_seed(0))
    embeds = synthetic_prompt_embeds(pipe, "a photograph of a lighthouse on a cliff at sunset")
    return {"hidden_states": latents, "encoder_hidden_states": embeds, "img_ids": latent_ids,
            "txt_ids": pipe._prepare_text_ids(embeds).to(t.device),
            "guidance": torch.full([1], 4.0, device=t.device, dtype=torch.float32), "return_dict": False}


class Attached:
    """One cache attached to the transformer for the `with` block; `image()` runs one image under it."""

    def __init__(self, transformer, method: str | None, settings: dict, steps: int) -> None:
        self.t, self.method, self.settings, self.steps = transformer, method, settings, steps

    def __enter__(self) -> Attached:
        from flux2lab.hooks import step_caches, teacache

        if self.method == "teacache":
            teacache.apply_teacache(self.t, teacache.TeaCacheConfig(num_inference_steps=self.steps, **self.settings))
        elif self.method is not None:
            step_caches.apply_step_cache(self.t, self.method, self.settings, self.steps)
        return self

    def __exit__(self, *exc) -> None:
        from flux2lab.hooks import step_caches, teacache

        teacache.remove_teacache(self.t)
        step_caches.remove_step_cache(self.t)

    @torch.no_grad()
    def image(self, inputs: dict) -> list[float]:
        """One image's worth of steps (timestep 1 -> 1/steps); each step's time in ms."""
        from contextlib import nullcontext

        from flux2lab.benchmark import DeviceClock
        from flux2lab.hooks import step_caches, teacache

        t = self.t
        if self.method == "teacache":
            teacache.reset_teacache(t)
        scope = nullcontext() if self.method in (None, "teacache") else step_caches.step_cache_context(t)
        clock = DeviceClock(t.device)  # CUDA events: the gaps a host sync opens inside a step are counted
        spans = []
        with scope:
            for i in range(self.steps):
                timestep = torch.full([1], 1.0 - i / self.steps, device=t.device, dtype=t.dtype)
                start = clock.mark()
                t(timestep=timestep, **inputs)
                spans.append((start, clock.mark()))
        clock.sync()
        return [clock.seconds(a, b) * 1e3 for a, b in spans]


def run_variant(t, inputs: dict, method: str | None, settings: dict, args: argparse.Namespace) -> dict:
    """One counted image (which steps computed; also the warm-up), then `rounds` timed ones."""
    from flux2lab.hooks.block_counter import BlockCounter

    with Attached(t, method, settings, args.steps) as cache:
        with BlockCounter(t) as counter:
            cache.image(inputs)
            fractions = counter.step_fractions()
        if t.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(t.device)
        times = [cache.image(inputs)[args.warmup:] for _ in range(args.rounds)]
    peak = torch.cuda.max_memory_allocated(t.device) / GIB if t.device.type == "cuda" else None
    timed = range(args.warmup, args.steps)
    computed = [ms for image in times for i, ms in zip(timed, image) if fractions[i] >= 1]
    cached = [ms for image in times for i, ms in zip(timed, image) if fractions[i] < 1]
    return {"step_fractions": fractions, "cached_steps": [i for i in timed if fractions[i] < 1],
            "computed_median_ms": statistics.median(computed) if computed else None,
            "cached_median_ms": statistics.median(cached) if cached else None, "step_ms": times, "peak_gib": peak}


def measure_method(t, inputs: dict, name: str, args: argparse.Namespace, normal: dict) -> dict:
    method, computing, caching = variants(args.steps)[name]
    computed = run_variant(t, inputs, method, computing, args)
    cached = run_variant(t, inputs, method, caching, args)
    base = normal["computed_median_ms"]
    out = {
        "method": method, "computed_settings": computing, "cached_settings": caching,
        "computed": computed, "cached": cached,
        "computed_overhead_pct": (100 * (computed["computed_median_ms"] - base) / base
                                  if computed["computed_median_ms"] else None),
        "cached_cost_pct": 100 * cached["cached_median_ms"] / base if cached["cached_median_ms"] else None,
        "added_peak_gib": (max(computed["peak_gib"], cached["peak_gib"]) - normal["peak_gib"]
                           if normal["peak_gib"] is not None else None),
    }
    out["targets"] = {k: {"limit": v, "met": None if out[k] is None else out[k] < v} for k, v in TARGETS.items()}
    return out


def _cell(value: float | None, spec: str, unit: str, target: dict) -> str:
    """`value` formatted with `spec` and `unit`, and whether it met its target."""
    if value is None:
        return "—"
    return f"{value:{spec}}{unit} ({'met' if target['met'] else 'MISSED'})"


def markdown(report: dict) -> str:
    r = report
    lines = [
        "# Step cache overhead per step", "",
        (f"{r['model']} on {r['device_name']} ({r['dtype']}), {r['size']}x{r['size']} ({r['image_tokens']} image + "
         f"{r['text_tokens']} text tokens), eager; median over {r['rounds']} images x {r['steps'] - r['warmup']} "
         f"timed steps per variant. A normal step (no cache): {r['normal']['computed_median_ms']:.2f} ms. Produced "
         "by `scripts/gpu_cache_overhead.py`."), "",
        (f"| method | computed step, ms | added cost (< {TARGETS['computed_overhead_pct']:g}%) | cached step, ms | "
         f"of a normal step (< {TARGETS['cached_cost_pct']:g}%) | block stack run on a cached step | added peak "
         f"memory (< {TARGETS['added_peak_gib']:g} GiB) |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in r["methods"].items():
        c, k, t = m["computed"], m["cached"], m["targets"]
        fractions = [m["cached"]["step_fractions"][i] for i in m["cached"]["cached_steps"]]
        lines.append(
            f"| {name} | {c['computed_median_ms'] or float('nan'):.2f} | "
            f"{_cell(m['computed_overhead_pct'], '+.2f', '%', t['computed_overhead_pct'])} | "
            f"{k['cached_median_ms'] or float('nan'):.2f} | "
            f"{_cell(m['cached_cost_pct'], '.2f', '%', t['cached_cost_pct'])} | "
            f"{100 * statistics.mean(fractions) if fractions else float('nan'):.0f}% | "
            f"{_cell(m['added_peak_gib'], '.2f', ' GiB', t['added_peak_gib'])} |")
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "cache_overhead.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flux2lab.cli import quiet_libraries
    from flux2lab.pipeline.models import load_pipeline, model_info

    quiet_libraries()
    names = list(variants(args.steps)) if args.methods is None else [m.strip() for m in args.methods.split(",")]
    unknown = [n for n in names if n not in variants(args.steps)]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(variants(args.steps))}")
    if not 0 <= args.warmup < args.steps - 2:
        raise SystemExit(f"--warmup {args.warmup} must leave at least 3 timed steps of --steps {args.steps}")
    started = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", file=sys.stderr, flush=True)

    say(f"loading {args.model}")
    pipe = load_pipeline(args.model, device=args.device)
    size = args.size or model_info(pipe).height
    t = pipe.transformer
    inputs = transformer_inputs(pipe, size)
    say("normal (no cache)")
    normal = run_variant(t, inputs, None, {}, args)
    report = {
        "model": args.model, "size": size, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "device_name": torch.cuda.get_device_name(t.device) if t.device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(t.dtype).replace("torch.", ""), "torch": torch.__version__,
        "image_tokens": inputs["hidden_states"].shape[1], "text_tokens": inputs["encoder_hidden_states"].shape[1],
        "targets": TARGETS, "normal": normal, "methods": {},
    }
    for name in names:
        say(f"{name}: computed and cached steps")
        report["methods"][name] = measure_method(t, inputs, name, args, normal)
        report["wall_s"] = time.perf_counter() - started
        write(report, args.out)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
