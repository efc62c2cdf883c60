"""What a benchmark run writes and prints: bench.json, bench.md (the table, the floor, the targets), bench.png
(the ladder as bars, like NVIDIA's Figure 4) and the command's console lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flux2lab.common.files import atomic_write, atomic_write_text
from flux2lab.common.formatting import fmt_number, fmt_percent


def write_report(result: dict[str, Any], out: Path) -> list[Path]:
    """bench.json, bench.md (the table, the floor, the targets) and bench.png (the ladder as bars)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.md", out / "bench.png"]
    atomic_write_text(paths[0], json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(paths[1], markdown(result))
    atomic_write(paths[2], lambda tmp: chart(result, tmp))
    return paths


def console_lines(result: dict[str, Any]) -> list[str]:
    """One line per rung (times, speedup, distance from the floor) and one per target met or missed here."""
    lines = []
    for r in result["rungs"]:
        if r["status"] == "ok":
            lines.append(f"{r['name']:>14}: {r['step_s']['median']:.3f} s/step, {r['image_s']['median']:.2f} s/image, "
                         f"{r['speedup']:.2f}x"
                         + (f", {r['floor_ratio']:.2f}x the floor" if r.get("floor_ratio") else "")
                         + (f", {r['cache_method']} computing {fmt_percent(r.get('computed_fraction'))} of the block "
                            "stack" if r.get("cache_method") else ""))
        else:
            lines.append(f"{r['name']:>14}: {r['status']} ({r['reason']})")
    for t in result["targets"]:
        if t["met"] is not None and t["applies_here"]:
            lines.append(f"target {'met' if t['met'] else 'NOT met'}: {t['target']} ({t['value']:.2f}x)")
    return lines


def _title(result: dict[str, Any]) -> str:
    env = result["environment"]
    return (f"FLUX.2 {result['model']['source']} · {result['width']}x{result['height']} · {result['steps']} steps · "
            f"{env['device_name']}")


def markdown(result: dict[str, Any]) -> str:
    env, settings, floor = result["environment"], result["settings"], result.get("floor") or {}
    ok = [r for r in result["rungs"] if r["status"] == "ok"]
    base = ok[0]["name"] if ok else "the first rung"
    lines = [
        f"# Speed ladder: {_title(result)}", "",
        f"Command: `{result['command']}` ({result.get('measured', 'time not recorded')})", "",
        f"- Card: {env['device_name']}" + (f" (sm{env['compute_capability']}, {env['memory_gib']:.0f} GiB, "
                                             f"driver {env.get('driver')}, CUDA {env['cuda_runtime']})"
                                             if env.get("cuda") else ""),
        (f"- Software: torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}, "
         f"torchao {env['torchao']}, flux2lab {env['flux2lab']} (git {str(env.get('git_commit'))[:12]}"
         f"{', uncommitted changes' if env.get('git_dirty') else ''})"),
        f"- Model: {result['model']['source']} ({result['model']['kind']}); covers the {result['coverage']}",
        (f"- Timing: {result['timing']}. {settings['reps']} timed image(s) per rung after {settings['warmup']} "
         f"warm-up image(s) of {settings['warmup_steps']} steps (cache rungs warm up on the full schedule)."),
    ]
    if settings["timed_steps"] != result["steps"]:
        lines.append(f"- Timed images run {settings['timed_steps']} steps; per-image times of rungs without TeaCache "
                     f"are extrapolated to {result['steps']} steps (measured wall + remaining steps x median step).")
    if settings.get("cache_point"):
        point = settings["cache_point"]
        recorded = (f"; it computed {fmt_percent(point['recorded_fraction'])} of the block stack on "
                    f"{point['recorded_on']}" if point.get("recorded_fraction") is not None else "")
        lines.append(f"- Cache point: {point['method']} from {point['source']}{recorded}.")
    if settings.get("cache_schedule"):
        marked = (" **Marked: a threshold method's own decisions on random weights say nothing about its speed on "
                  "real weights.**" if settings.get("cache_schedule_meaningless") else "")
        lines.append(f"- Cache rung's schedule: {settings['cache_schedule']}.{marked}")
    lines += [
        "", (f"| rung | adds | s/step median [p25–p75] | s/image ({result['steps']} steps) median [min–max] | "
             f"block stack computed | peak GPU mem | speedup vs {base} | vs rung below | step / floor |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in result["rungs"]:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['adds']} | **{r['status']}** (note {len(notes) + 1}) | | | | | | |")
            notes.append(f"{r['name']} {r['status']}: {r['reason']}")
            continue
        st, im = r.get("computed_step_s") or r["step_s"], r["image_s"]
        extra = []
        if r.get("cache_schedule"):
            extra.append(f"{r['cache_schedule']}; skipped {len(r['skipped_steps'])}/{r['steps']}"
                         + (" (MARKED: own decisions on random weights)" if r.get("cache_schedule_meaningless") else ""))
        if r.get("without"):
            extra.append(f"without {', '.join(r['without'])}"
                         + (f": {r['without_because']}" if r.get("without_because") else ""))
        adds = r["adds"] + (f" ({'; '.join(extra)})" if extra else "")
        lines.append(
            f"| {r['name']} | {adds} | {fmt_number(st['median'], '.3f')} [{fmt_number(st['p25'], '.3f')}–"
            f"{fmt_number(st['p75'], '.3f')}] | {fmt_number(im['median'], '.2f')} [{fmt_number(im['min'], '.2f')}–"
            f"{fmt_number(im['max'], '.2f')}]{' (extrap.)' if r.get('image_extrapolated') else ''} | "
            f"{fmt_percent(r.get('computed_fraction'))} | {fmt_number(r.get('peak_mem_gib'), '.1f', ' GiB')} | "
            f"{fmt_number(r.get('speedup'), '.2f', 'x')} | {fmt_number(r.get('speedup_vs_previous'), '.2f', 'x')} | "
            f"{fmt_number(r.get('floor_ratio'), '.2f', 'x')} |"
        )
    if any(r.get("cache_method") for r in ok):
        lines.append("\nCache rows show the median *computed* step; their per-image time includes the skipped ones. "
                     "Block stack computed: the fraction of the transformer blocks' work that ran (counted by "
                     "flux2lab.hooks.block_counter; under CUDA graphs, the blocks replayed).")
    if notes:
        lines += [""] + [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    spent = [f"{r['name']}: load {fmt_number(r.get('load_s'), '.0f')} s, apply {fmt_number(r.get('apply_s'), '.0f')} s, "
             f"warm-up {fmt_number(r.get('warmup_s'), '.0f')} s, timed {fmt_number(r.get('timed_s'), '.0f')} s"
             for r in ok]
    if spent:
        lines += ["", f"Time spent (whole run {fmt_number(result.get('wall_s'), '.0f')} s): " + "; ".join(spent) + "."]
    if "bf16" in floor:
        lines += _floor_lines(floor, result["steps"])
    elif floor.get("skipped"):
        lines += ["", f"Floor not measured: {floor['skipped']}."]
    lines += ["", "## Targets", ""]
    if result["targets"] and not result["targets"][0]["applies_here"]:
        lines += [("The targets are set for the full-size model at 1024x1024, 50 steps on an H100/H200; this run "
                   "is not that, so the verdicts below only show the arithmetic."), ""]
    for t in result["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        value = "" if t["value"] is None else f": {t['value']:.2f}x"
        lines.append(f"- **{verdict}** — {t['target']}{value} ({t['detail']})")
    return "\n".join(lines) + "\n"


def _floor_lines(floor: dict[str, Any], steps: int) -> list[str]:
    """The floor section of bench.md: one step's work, and its time at the model dtype and in FP8."""
    lines = [
        "", (f"## Floor: one step = {floor['tflop_per_step']:.4g} TFLOP ({floor['gemm_tflop']:.4g} in GEMMs, "
             f"{floor['attention_tflop']:.4g} in attention; {floor['image_tokens']} image + "
             f"{floor['text_tokens']} text tokens)"), "",
        f"Measured on this card in the same run: {floor['note']}.", "",
        "| GEMMs in | GEMMs | attention | floor per step | GEMM rate | floor per image |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in (("bf16", floor["dtype"]), ("fp8", "fp8 (row-wise)")):
        fl = floor[key]
        lines.append(f"| {label} | {fl['gemm_s']:.3f} s | {fl['attention_s']:.3f} s | {fl['step_s']:.3f} s | "
                     f"{fmt_number(fl['gemm_tflops'], '.4g', ' TFLOP/s')} | {fl['step_s'] * steps:.2f} s |")
    lines.append(f"\nThe FP8 floor keeps the layers flux2lab.quantizers's rule keeps in high precision at "
                 f"{floor['dtype']} ({floor['fp8']['kept_high_tflop']:.4g} TFLOP a step), as the FP8 rung does.")
    if floor["fp8"]["gemms_not_in_fp8"]:
        lines.append(f"\nGEMMs without an FP8 kernel here (counted at {floor['dtype']}): "
                     + "; ".join(floor["fp8"]["gemms_not_in_fp8"]))
    return lines


def chart(result: dict[str, Any], path: Path) -> None:
    """Bars of the speedup per rung over the first, labelled like NVIDIA's Figure 4 ("1.0x", "1.7x"...); a PNG."""
    from matplotlib.figure import Figure

    rungs = result["rungs"]
    fig = Figure(figsize=(1.6 * max(len(rungs), 3) + 1.5, 4.8), dpi=120)
    ax = fig.subplots()
    names = [r["name"] for r in rungs]
    heights = [r.get("speedup") or 0 for r in rungs]
    top = max([h for h in heights if h] + [1.0])
    floor, ok = result.get("floor") or {}, [r for r in rungs if r["status"] == "ok"]
    lines = []
    if "bf16" in floor and ok and ok[0]["recipe"]["transformer_precision"] == "bf16":
        base = ok[0]["image_s"]["median"]
        lines = [(base / (floor[k]["step_s"] * result["steps"]), label)
                 for k, label in (("bf16", f"{floor['dtype']} arithmetic floor"), ("fp8", "FP8 arithmetic floor"))]
        lines = [(v, label) for v, label in lines if v <= 3 * top]  # far above every bar they only squash it
        top = max([top] + [v for v, _ in lines])
    bars = ax.bar(names, heights, color=["#76b900" if r["status"] == "ok" else "#dddddd" for r in rungs],
                  edgecolor="#333333", width=0.65)
    for bar, r in zip(bars, rungs):
        label = f"{r['speedup']:.1f}x" if r["status"] == "ok" else r["status"]
        y = bar.get_height() if r["status"] == "ok" else 0
        ax.text(bar.get_x() + bar.get_width() / 2, y + top * 0.015, label, ha="center", va="bottom",
                fontsize=11, fontweight="bold" if r["status"] == "ok" else "normal",
                color="#222222" if r["status"] == "ok" else "#888888")
    for value, label in lines:
        ax.axhline(value, color="#555555", linestyle="--", linewidth=1)
        ax.text(len(rungs) - 0.5, value, f" {label} ({value:.1f}x)", va="bottom", ha="right", fontsize=8,
                color="#555555")
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel(f"speedup over {ok[0]['name'] if ok else 'the first rung'} (per image)")
    ax.set_title(_title(result) + f"\n{result['coverage'].split(':')[0]}", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, format="png")
