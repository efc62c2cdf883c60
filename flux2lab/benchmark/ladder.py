"""The rungs of the speed ladder, in NVIDIA's Figure 4 order, and which of them a run times.

Each rung is a set of Recipe changes on top of the rung below (eager BF16, torch.compile, CUDA graphs, FP8 or
NVFP4, a step cache, several GPUs), so a rung's recipe holds every acceleration beneath it. The cache rung is
`+teacache` (NVIDIA's TeaCache settings) or, given a frozen point (`bench --cache`), `+cache` with its method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flux2lab.common.errors import Flux2LabError
from flux2lab.pipeline.recipe import FLUX2_DEV_RET_STEPS, Recipe, RecipeError


@dataclass(frozen=True)
class Rung:
    """One step of the ladder: the recipe fields it adds on top of the rung below."""

    name: str
    changes: dict[str, Any]
    adds: str

    @property
    def gpus(self) -> int:
        return self.changes.get("ulysses_degree", 1)


def default_precision(device: torch.device) -> str:
    """The low-precision rung NVIDIA's figure uses where it exists (NVFP4, Blackwell), else FP8 (Hopper/Ada)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (10, 0):
        return "nvfp4"
    return "fp8"


def scaled_ret_steps(steps: int) -> int:
    """NVIDIA's 10 always-computed first steps of 50, as the same fraction of a shorter or longer schedule."""
    return min(steps - 1, round(FLUX2_DEV_RET_STEPS * steps / 50))


CACHE_RUNGS = ("+cache", "+teacache")


def cache_rung(steps: int, point: Any = None) -> Rung:
    """`+cache` with a frozen point's cache (a flux2lab.benchmark.cachepoint.CachePoint), else `+teacache`."""
    if point is None:
        return Rung("+teacache", {"cache": {"method": "teacache", "ret_steps": scaled_ret_steps(steps)}},
                    "TeaCache skips steps whose output barely changes")
    return Rung("+cache", {"cache": point.cache.to_dict()}, f"step cache {point.describe()}")


def default_ladder(precision: str, gpus: tuple[int, ...], steps: int, point: Any = None) -> list[Rung]:
    """NVIDIA's Figure 4 order; each multi-GPU rung runs the whole single-GPU stack on N GPUs. `point`: the
    cache rung's frozen point (see `cache_rung`)."""
    return [
        Rung("eager-bf16", {}, "the model dtype (BF16 on a GPU), no torch.compile"),
        Rung("compile", {"compile": True}, "regional torch.compile of the repeated blocks"),
        Rung("+cuda-graphs", {"cuda_graphs": True}, "every block replayed as a CUDA graph"),
        Rung(f"+{precision}", {"transformer_precision": precision, "quant_backend": "native"},
             f"{precision.upper()} linear layers (native kernels only: an emulation is not a speed path)"),
        cache_rung(steps, point),
        *[Rung(f"x{n}-gpus", {"ulysses_degree": n}, f"Ulysses sequence parallelism over {n} GPUs") for n in gpus],
    ]


def rung_recipe(below: Recipe, rung: Rung) -> tuple[Recipe, list[tuple[str, str]]]:
    """The rung's recipe on top of the one below, and the rungs it leaves out with why: a step cache that cannot
    run with CUDA graphs (TaylorSeer) runs without them. Other combinations validation refuses raise RecipeError."""
    try:
        return below.replace(**rung.changes), []
    except RecipeError as e:
        if "cache" not in rung.changes or not below.cuda_graphs:
            raise
        return below.replace(cuda_graphs=False).replace(**rung.changes), [("+cuda-graphs", str(e))]


def select_rungs(ladder: list[Rung], spec: str) -> set[str]:
    """The names of the rungs to time: `default` (every rung) or a comma-separated list of rung names."""
    if spec == "default":
        return {r.name for r in ladder}
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in {r.name for r in ladder}]
    if unknown or not names:
        raise Flux2LabError(
            f"--ladder {spec!r}: unknown rung(s) {', '.join(unknown) or '(none given)'}; give 'default' or a "
            f"comma-separated list of: {', '.join(r.name for r in ladder)}."
        )
    return set(names)
