"""Clocks for the benchmark: marks on the device's timeline, the end of every denoising step, medians.

The end of every denoising step is marked with a CUDA event (host clock on CPU) from the scheduler's `step`, the
one call every step makes however hooks, graphs or compilation rewrote the transformer; nothing synchronises
inside the loop. Time per step = the interval between consecutive marks (the first step, which also carries the
prompt and latent set-up, is left out).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


class DeviceClock:
    """Marks on the device's timeline: CUDA events on a GPU (no synchronisation), the host clock on CPU.

    torch.utils.benchmark times whole statements with a host clock around synchronisations; marks inside a
    running pipeline need events, so this small wrapper serves both the step marks and the floor's kernels.
    """

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def seconds(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


class StepMarks:
    """Marks the end of every denoising step by wrapping the pipeline's `scheduler.step` (instance attribute,
    removed on exit). With `probe` (a host-side counter, e.g. the CUDA graphs replayed so far), it is read at the
    start and at every mark, so `per_step()` tells how much of it each step added."""

    def __init__(self, pipe: Any, clock: DeviceClock, probe: Callable[[], int] | None = None):
        self.pipe, self.clock, self.marks, self.probe, self.readings = pipe, clock, [], probe, []

    def __enter__(self) -> StepMarks:
        step = self.pipe.scheduler.step
        if self.probe is not None:
            self.readings.append(self.probe())

        def marked(*args, **kwargs):
            out = step(*args, **kwargs)
            self.marks.append(self.clock.mark())
            if self.probe is not None:
                self.readings.append(self.probe())
            return out

        self.pipe.scheduler.step = marked
        return self

    def __exit__(self, *exc) -> None:
        del self.pipe.scheduler.step

    def intervals(self) -> list[float]:
        """Seconds of steps 1..n-1 (interval i ends at step i's mark)."""
        self.clock.sync()
        return [self.clock.seconds(a, b) for a, b in zip(self.marks, self.marks[1:])]

    def per_step(self) -> list[int]:
        """What the probe counted during each step 0..n-1."""
        return [b - a for a, b in zip(self.readings, self.readings[1:])]


def median_time(clock: DeviceClock, fn: Callable[..., Any], *args: Any, warmup: int = 3, iters: int = 10,
                **kwargs: Any) -> float:
    """Median seconds of `fn(*args, **kwargs)` over `iters` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn(*args, **kwargs)
    clock.sync()
    spans = []
    for _ in range(iters):
        a = clock.mark()
        fn(*args, **kwargs)
        spans.append((a, clock.mark()))
    clock.sync()
    return statistics.median(clock.seconds(a, b) for a, b in spans)


def spread(values: list[float]) -> dict[str, Any] | None:
    """Median and spread (quartiles, range) of a sample."""
    if not values:
        return None
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "p25": q[0], "p75": q[2], "min": min(values),
            "max": max(values), "n": len(values)}
