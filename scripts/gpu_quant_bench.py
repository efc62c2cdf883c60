"""Step time and memory of the FLUX.2 [dev] transformer: BF16, FP8 (+compile), NVFP4-emulated, one card.

The full-size transformer with random weights (`full-random`: time per step does not depend on weight
values) runs one denoising step's forward on inputs of the real shapes, variant after variant on the same
GPU, each built from scratch and freed before the next. Quantized variants are materialised and quantized
one transformer block at a time, so a 60 GiB BF16 copy never has to exist next to them.

    python scripts/gpu_quant_bench.py --height 1024 --width 1024          # one 80 GB H100 / H200
    python scripts/gpu_quant_bench.py --tiny --variants bf16,fp8,nvfp4-emulated   # CPU smoke test

Writes quant_bench_<H>x<W>.json and .md under --out (default reports/benchmarks), with the targets of
issue 4 checked against the eager BF16 row.
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
from diffusers import Flux2Pipeline
from torch import nn

from flux2lab.benchmark import DeviceClock
from flux2lab.cli import run_main
from flux2lab.common.errors import Flux2LabError
from flux2lab.pipeline.models import (
    FULL_TEXT_TOKENS,
    TINY_TRANSFORMER,
    build_transformer_on_meta,
    free_memory,
    materialize_random,
)
from flux2lab.quantizers import QuantReport, module_bytes, quantize, select_layers

# name -> (precision, backend, compile). FP8 "auto" is torchao's real kernel on sm89+ (emulated on CPU).
VARIANTS = {
    "bf16": ("bf16", "auto", False),
    "bf16-compile": ("bf16", "auto", True),
    "fp8": ("fp8", "auto", False),
    "fp8-compile": ("fp8", "auto", True),
    "nvfp4-emulated": ("nvfp4", "emulated", False),
    "nvfp4-emulated-compile": ("nvfp4", "emulated", True),
}
DEFAULT_VARIANTS = "bf16,fp8-compile,nvfp4-emulated,nvfp4-emulated-compile"

# Issue 4's targets, relative to eager BF16: (variant, metric, bound, <= or >=).
TARGETS = [
    ("fp8-compile", "speedup", 1.8, ">="),
    ("fp8-compile", "weights_ratio", 0.55, "<="),
    ("nvfp4-emulated", "weights_ratio", 0.35, "<="),
    ("nvfp4-emulated", "step_ratio", 2.5, "<="),
]


def make_inputs(config, height: int, width: int, text_tokens: int, device, dtype) -> dict:
    """Transformer inputs as Flux2Pipeline builds them: latents (H/16 x W/16 tokens of in_channels) and
    position ids from the pipeline's own helpers."""
    if height % 16 or width % 16:
        raise Flux2LabError(f"--height/--width must be multiples of 16, got {height}x{width}.")
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, config.in_channels, height // 16, width // 16, generator=gen)
    text = torch.randn(1, text_tokens, config.joint_attention_dim, generator=gen)
    return {
        "hidden_states": latents.flatten(2).transpose(1, 2).to(device, dtype),
        "encoder_hidden_states": text.to(device, dtype),
        "timestep": torch.full([1], 0.5, device=device, dtype=dtype),
        "img_ids": Flux2Pipeline._prepare_latent_ids(latents).to(device),
        "txt_ids": Flux2Pipeline._prepare_text_ids(text).to(device),
        "guidance": torch.full([1], 4.0, device=device, dtype=torch.float32),
        "return_dict": False,
    }


def build(config: dict, precision: str, backend: str, device, dtype) -> tuple[nn.Module, QuantReport | None]:
    """Random-weight transformer; quantized variants are built block by block (see module docstring)."""
    model = build_transformer_on_meta(**config)
    if precision == "bf16":
        return materialize_random(model, device, dtype), None
    expected, kept = select_layers(model)  # the rule on the full model's names
    blocks = {f"{group}.{i}": b for group in ("transformer_blocks", "single_transformer_blocks")
              for i, b in enumerate(getattr(model, group))}
    for name, child in model.named_children():
        if name not in ("transformer_blocks", "single_transformer_blocks"):
            materialize_random(child, device, dtype)
    total = QuantReport(precision, "", bytes_before=0)
    for i, (prefix, block) in enumerate(blocks.items()):
        materialize_random(block, device, dtype, seed=i + 1)
        r = quantize(block, precision, backend)
        total.backend = r.backend
        total.quantized += [f"{prefix}.{n}" for n in r.quantized]
        total.bytes_before += r.bytes_before
        total.bytes_after += r.bytes_after
    if sorted(total.quantized) != sorted(expected):
        raise AssertionError("block-wise quantization did not select the layers the full-model rule selects")
    rest = module_bytes(model) - total.bytes_after
    total.bytes_before += rest
    total.bytes_after += rest
    total.kept = kept
    return model, total


def run_variant(name: str, args, config: dict, device: torch.device, dtype) -> dict:
    precision, backend, compiled = VARIANTS[name]
    cuda = device.type == "cuda"
    base = torch.cuda.memory_allocated(device) if cuda else 0
    t0 = time.perf_counter()
    model, report = build(config, precision, backend, device, dtype)
    build_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize(device)
    weights = torch.cuda.memory_allocated(device) - base if cuda else module_bytes(model)
    inputs = make_inputs(model.config, args.height, args.width, args.text_tokens, device, dtype)
    if compiled:
        model.compile_repeated_blocks(fullgraph=True)
    clock = DeviceClock(device)

    def forward_ms() -> float:
        """One forward's time (CUDA events on a GPU), synchronised before it returns."""
        start = clock.mark()
        model(**inputs)
        end = clock.mark()
        clock.sync()
        return clock.seconds(start, end) * 1e3

    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(max(args.warmup, 3 if compiled else 1)):
            forward_ms()
        warmup_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = [forward_ms() for _ in range(args.steps)]
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    row = {
        "variant": name, "precision": precision, "backend": report.backend if report else "none",
        "compile": compiled, "step_ms": statistics.median(times), "step_ms_all": times,
        "weights_gib": weights / 2**30, "peak_gib": peak / 2**30 if peak is not None else None,
        "model_bytes": module_bytes(model), "build_s": build_s, "warmup_s": warmup_s,
        "quantized_layers": len(report.quantized) if report else 0,
        "kept_layers": len(report.kept) if report else None,
    }
    return row


def check_targets(rows: dict[str, dict]) -> list[dict]:
    base = rows.get("bf16")
    out = []
    for variant, metric, bound, op in TARGETS:
        row = rows.get(variant)
        if not base or "step_ms" not in base or not row or "step_ms" not in row:
            out.append({"variant": variant, "metric": metric, "bound": bound, "op": op, "value": None,
                        "ok": None})
            continue
        value = {"speedup": base["step_ms"] / row["step_ms"], "step_ratio": row["step_ms"] / base["step_ms"],
                 "weights_ratio": row["weights_gib"] / base["weights_gib"]}[metric]
        ok = value >= bound if op == ">=" else value <= bound
        out.append({"variant": variant, "metric": metric, "bound": bound, "op": op, "value": value, "ok": ok})
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        (f"# Quantization benchmark: FLUX.2 [dev] transformer ({result['model']}), "
         f"{result['height']}x{result['width']}"),
        "",
        (f"{env['device']}; torch {env['torch']}, torchao {env['torchao']}, diffusers {env['diffusers']}; "
         f"{result['image_tokens']} image + {result['text_tokens']} text tokens; one transformer forward "
         f"(one denoising step, batch 1), median of {result['steps']} after warm-up."),
        "",
        ("| variant | backend | step (ms) | speed-up vs eager bf16 | weights (GiB) | vs bf16 | peak (GiB) "
         "| quantized layers |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = result["rows"].get("bf16", {})
    for name, r in result["rows"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | | | | |")
            continue
        speed = f"{base['step_ms'] / r['step_ms']:.2f}x" if "step_ms" in base else ""
        mem = f"{r['weights_gib'] / base['weights_gib']:.1%}" if "weights_gib" in base else ""
        peak = f"{r['peak_gib']:.3g}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {name} | {r['backend']} | {r['step_ms']:.1f} | {speed} | {r['weights_gib']:.3g} "
                     f"| {mem} "
                     f"| {peak} | {r['quantized_layers']} |")
    lines += ["", "Targets (issue 4):", ""]
    for t in result["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["ok"]]
        value = f"{t['value']:.3f}" if t["value"] is not None else "-"
        lines.append(f"- {t['variant']} {t['metric']} {t['op']} {t['bound']}: {value} ({verdict})")
    lines += ["", ("weights = GPU memory held by the transformer after building (and quantizing) it; "
                   "peak = highest GPU memory during the timed steps. Random weights: speed and memory only, "
                   "no quality.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--text-tokens", type=int, default=None,
                   help=f"default {FULL_TEXT_TOKENS} (64 with --tiny)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=5, help="timed forwards per variant (median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards first (at least 3 when compiled)")
    p.add_argument("--tiny", action="store_true", help="toy-size transformer (CPU smoke test of this script)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--out", default="reports/benchmarks")
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise Flux2LabError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}.")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda" and not args.tiny:
        raise Flux2LabError("the full-size transformer needs a CUDA GPU (80 GB); on CPU use --tiny.")
    args.text_tokens = args.text_tokens or (64 if args.tiny else FULL_TEXT_TOKENS)
    config = {**TINY_TRANSFORMER} if args.tiny else {}

    import diffusers
    import torchao

    result = {
        "model": "tiny (random)" if args.tiny else "full-random (FLUX.2 [dev] architecture, random weights)",
        "height": args.height, "width": args.width, "image_tokens": (args.height // 16) * (args.width // 16),
        "text_tokens": args.text_tokens, "steps": args.steps,
        "environment": {
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else platform.processor() or "cpu"),
            "torch": torch.__version__, "torchao": torchao.__version__, "diffusers": diffusers.__version__,
            "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "rows": {},
    }
    for name in names:
        print(f"[{name}] building and timing ...", flush=True)
        try:
            row = run_variant(name, args, config, device, torch.bfloat16)
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others' numbers
            row = {"variant": name, "error": f"{type(e).__name__}: {e}"[:300]}
        torch._dynamo.reset()
        free_memory()
        result["rows"][name] = row
        done = row.get("error") or f"{row['step_ms']:.1f} ms/step, {row['weights_gib']:.3g} GiB"
        print(f"[{name}] {done}", flush=True)
    result["targets"] = check_targets(result["rows"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"quant_bench_{args.height}x{args.width}" + ("_tiny" if args.tiny else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
