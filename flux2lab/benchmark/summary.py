"""What the measured rungs add up to: speedups, distance from the floor, and the issue's targets met or not."""

from __future__ import annotations

from typing import Any

from flux2lab.benchmark.ladder import CACHE_RUNGS
from flux2lab.common.formatting import fmt_percent

CACHE_POINT_SPEEDUP = 4.0  # FP8 + compile + the frozen best cache point, over eager BF16 per image


def summarize(result: dict[str, Any]) -> None:
    """Speedups (over the first rung that ran, and over the rung below), distance from the floor and the
    targets, recomputed over the rungs so far."""
    ok = [r for r in result["rungs"] if r["status"] == "ok"]
    previous = None
    for r in ok:
        img = r["image_s"]["median"]
        r["speedup"] = ok[0]["image_s"]["median"] / img
        r["speedup_over"] = ok[0]["name"]
        r["speedup_vs_previous"] = previous["image_s"]["median"] / img if previous else None
        previous = r
        r.update(floor_distance(r, result.get("floor") or {}))
    result["targets"] = targets(result)


def floor_distance(row: dict[str, Any], floor: dict[str, Any]) -> dict[str, Any]:
    """How far the rung's computed step is from the floor of its precision (split over its GPUs)."""
    if "bf16" not in floor:
        return {}
    precision = (row["recipe"] or {}).get("transformer_precision", "bf16")
    key = "bf16" if precision == "bf16" else "fp8"
    gpus = (row["recipe"] or {}).get("ulysses_degree", 1)
    floor_step = floor[key]["step_s"] / gpus
    step = (row.get("computed_step_s") or row["step_s"])["median"]
    out = {"floor_step_s": floor_step, "floor_kind": f"{key}" + (f" / {gpus} GPUs" if gpus > 1 else ""),
           "floor_ratio": step / floor_step if floor_step else None}
    if precision == "nvfp4":
        out["floor_note"] = "NVFP4 GEMMs are not timed; the FP8 floor is shown (the NVFP4 floor is lower)"
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each met / not met / not measured, with the number behind it."""
    rungs = {r["name"]: r for r in result["rungs"]}
    ok = {n: r for n, r in rungs.items() if r["status"] == "ok"}
    env = result["environment"]
    applicable = (result["model"]["kind"] in ("full-random", "pretrained") and env.get("cuda")
                  and (result["height"], result["width"], result["steps"]) == (1024, 1024, 50))
    base = ok.get("eager-bf16")
    precision_rung = next((n for n in rungs if n in ("+fp8", "+nvfp4")), "+fp8")
    cache_rung = next((n for n in rungs if n in CACHE_RUNGS), "+teacache")
    stack = ok.get(cache_rung)
    out = []

    def add(what: str, value: float | None, limit: float, higher: bool, detail: str) -> None:
        met = None if value is None else (value >= limit if higher else value <= limit)
        out.append({"target": what, "value": value, "limit": limit, "met": met, "detail": detail,
                    "applies_here": bool(applicable)})

    def speedup(name: str, over: dict | None) -> float | None:
        r = ok.get(name)
        return over["image_s"]["median"] / r["image_s"]["median"] if r and over else None

    add("compile >= 1.2x eager-bf16", speedup("compile", base), 1.2, True, "per-image time")
    add(f"{precision_rung} >= 1.8x eager-bf16", speedup(precision_rung, base), 1.8, True, "per-image time")
    schedule = (stack or {}).get("cache_schedule", "")
    add(f"full single-GPU stack ({cache_rung}) >= 3.0x eager-bf16", speedup(cache_rung, base), 3.0, True,
        f"per-image time; {schedule}" if schedule else "per-image time")
    value, detail = cache_point_speedup(ok.get("+cache"), base, result["settings"].get("cache_point"))
    add(f"{precision_rung} + compile + the frozen cache point (+cache) >= {CACHE_POINT_SPEEDUP}x eager-bf16", value,
        CACHE_POINT_SPEEDUP, True, detail)
    fp8 = ok.get(precision_rung)
    add(f"{precision_rung} compiled step <= 1.3x the floor", fp8.get("floor_ratio") if fp8 else None, 1.3, False,
        "median step / (FP8 GEMMs + attention floor measured in the same run)")
    for n, limit in ((2, 1.85), (4, 3.4)):
        add(f"x{n}-gpus >= {limit}x the 1-GPU full stack", speedup(f"x{n}-gpus", stack), limit, True,
            f"per-image time over {cache_rung} on one GPU")
    return out


def cache_point_speedup(row: dict[str, Any] | None, base: dict[str, Any] | None,
                        point: dict[str, Any] | None) -> tuple[float | None, str]:
    """The `+cache` rung's speedup over eager BF16 when it ran with low precision and compile, and what it was."""
    if point is None:
        return None, "not measured: give --cache with the search's frozen best point (bench --cache FROZEN.json)"
    if row is None or base is None:
        return None, f"not measured: the +cache rung or eager-bf16 did not run ({point['source']})"
    recipe = row["recipe"]
    if recipe["transformer_precision"] == "bf16" or not recipe["compile"]:
        return None, f"not measured: the +cache rung ran without {', '.join(row.get('without', [])) or 'FP8/compile'}"
    computed = fmt_percent(row.get("computed_fraction"), missing="an uncounted fraction")
    return base["image_s"]["median"] / row["image_s"]["median"], (
        f"per-image time; {point['method']} from {point['source']}, {computed} of the block stack computed; "
        f"{row.get('cache_schedule')}")
