"""The layered speed benchmark: NVIDIA's Figure 4 ladder, timed on the user's card, next to that card's floor.

ladder (the rungs), cachepoint (the step cache `--cache` names), skips (which steps the cache rung skips on
random weights, and their replay), timing (device clocks, step marks),
floor (one step's GEMMs and attention, timed), fullsize (the whole pipeline at full size, random weights),
runner (BenchConfig, Bench: one run of the ladder), summary (speedups, floor distance, targets),
provenance (the card and versions a number was measured with), output (bench.json, bench.md, bench.png).
"""

from flux2lab.benchmark.cachepoint import CachePoint, load_cache_point
from flux2lab.benchmark.floor import Attention, Gemm, Workload, measure_floor, step_workload
from flux2lab.benchmark.fullsize import full_size_text_encoder_and_vae
from flux2lab.benchmark.ladder import scaled_ret_steps
from flux2lab.benchmark.output import console_lines, write_report
from flux2lab.benchmark.provenance import environment
from flux2lab.benchmark.runner import Bench, BenchConfig
from flux2lab.benchmark.skips import force_decisions, skip_plan, spread_skips
from flux2lab.benchmark.summary import summarize
from flux2lab.benchmark.timing import DeviceClock, spread

__all__ = [
    "Attention", "Bench", "BenchConfig", "CachePoint", "DeviceClock", "Gemm", "Workload", "console_lines",
    "environment", "force_decisions", "full_size_text_encoder_and_vae", "load_cache_point", "measure_floor",
    "scaled_ret_steps", "skip_plan", "spread", "spread_skips", "step_workload", "summarize", "write_report",
]
