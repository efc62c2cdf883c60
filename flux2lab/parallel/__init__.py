"""Several GPUs, one image: torch.distributed from torchrun's environment + diffusers' Ulysses attention.

Ulysses sequence parallelism is diffusers' own context parallelism (`ContextParallelConfig(ulysses_degree=N)`
through `transformer.enable_parallelism`): each rank holds the whole model and 1/N of the tokens, and the
attention all-to-all swaps sequence shards for head shards. Everything else here is the part a serving job needs
around it: NCCL on GPUs and gloo on CPU, one device per local rank, a bounded process-group timeout (so a rank
that dies or hangs ends the job with an error instead of a silent hang), and checks that name the fix when the
heads or the token count do not divide by the degree.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from flux2lab.common.errors import FeatureNotAvailable, Flux2LabError
from flux2lab.hooks import cudagraphs
from flux2lab.pipeline.models import default_device, image_tokens

# How long a rank waits in a collective for the others before the job fails. It must cover the longest
# legitimate gap between two collectives on different ranks (one rank loading weights or compiling slower than
# the rest), so it is minutes, not seconds; tests use a few seconds.
DEFAULT_TIMEOUT_S = 300.0
# Exit status of a rank whose process-group teardown did not finish within the timeout (see `shutdown`).
TEARDOWN_HUNG_EXIT = 3


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank among world_size, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise Flux2LabError(f"environment variable {name}={value!r} is not an integer (set by torchrun).") from None


def init(device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join torchrun's process group (if launched by torchrun with more than one process) and pick the device.

    Under torchrun, `device` is a type ('cuda' or 'cpu'); rank r uses cuda:LOCAL_RANK. Without torchrun (or with
    one process), this only resolves the device.
    """
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    kind = torch.device(device or default_device()).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise Flux2LabError(f"device '{device}' was asked for, but this machine has no CUDA GPU. Use --device cpu.")
    if world == 1:
        return DistEnv(0, 1, 0, torch.device(device or default_device()))
    if device is not None and torch.device(device).index is not None:
        raise Flux2LabError(f"--device {device} names one GPU, but under torchrun each rank uses cuda:LOCAL_RANK; "
                            "pass --device cuda (or leave it out).")
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise Flux2LabError(f"LOCAL_RANK {local_rank} has no GPU: this machine has {torch.cuda.device_count()}. "
                                "Use --nproc-per-node <= the number of GPUs.")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if kind == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
            device_id=dev if kind == "cuda" else None,
        )
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def shutdown(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Release every captured CUDA graph, then destroy the process group; a rank that cannot finish this within
    `timeout_s` prints why and exits with TEARDOWN_HUNG_EXIT instead of hanging.

    The order is the fix for a hang at exit after multi-GPU runs with CUDA graphs: NCCL (2.26 and later) will not
    destroy a communicator while a CUDA graph that captured one of its kernels is alive -- `commDestroySync`
    polls `while (comm->localPersistentRefs != 0)` until those graphs are destroyed, i.e. forever if they are
    not. Our block graphs capture diffusers' Ulysses all-to-alls, and the pipeline holding them outlives the run
    (hook reference cycles, or an exception's traceback), so they must be released explicitly, first. NCCL's
    own watchdog times out collectives, not teardown, hence the timer here; it also covers `release_all`, whose
    synchronize would wait forever on a replayed all-to-all whose peer died.
    """
    if not dist.is_initialized():
        return
    timer = threading.Timer(timeout_s, _teardown_hung, args=(dist.get_rank(), timeout_s))
    timer.daemon = True
    timer.start()
    try:
        cudagraphs.release_all()
        dist.destroy_process_group()
    finally:
        timer.cancel()


def _teardown_hung(rank: int, timeout_s: float) -> None:
    print(f"error: rank {rank}: tearing down the process group did not finish within {timeout_s:g} s (is a CUDA "
          "graph that captured NCCL collectives still alive?); exiting without it. Results written before this "
          "point are complete.", file=sys.stderr, flush=True)
    os._exit(TEARDOWN_HUNG_EXIT)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def _cpu_counts_as_one_accelerator(device: torch.device):
    """diffusers picks the context-parallel device as `rank % torch.accelerator.device_count()`, which divides by
    zero on a CPU-only machine although gloo runs context parallelism fine there. On CPU the index it computes is
    never used, so report one "accelerator" for the duration of `enable_parallelism` only."""
    if device.type != "cpu" or torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def enable_ulysses(transformer: Any, degree: int) -> None:
    """Shard the transformer's tokens over `degree` ranks (diffusers' Ulysses context parallelism)."""
    from diffusers import ContextParallelConfig

    if not (dist.is_available() and dist.is_initialized()):
        raise FeatureNotAvailable(
            f"ulysses_degree {degree} needs one process per GPU: launch with "
            f"`torchrun --nproc-per-node {degree} -m flux2lab.run ...`."
        )
    if dist.get_world_size() != degree:
        raise Flux2LabError(f"ulysses_degree is {degree} but torchrun started {dist.get_world_size()} processes; "
                            f"use --nproc-per-node {degree}.")
    heads = transformer.config.num_attention_heads
    if heads % degree:
        raise Flux2LabError(f"Ulysses splits the {heads} attention heads over ranks: ulysses_degree {degree} must "
                            "divide them. Use a degree that does (1, 2, 4, 8, ... for FLUX.2).")
    # diffusers' output gather calls a torch API that torch deprecates, once per step; not ours to fix.
    warnings.filterwarnings("ignore", message=".*all_gather_tensor` is deprecated", category=FutureWarning)
    with _cpu_counts_as_one_accelerator(transformer.device):
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))


def check_sequence(pipe: Any, height: int, width: int, text_tokens: int, degree: int) -> None:
    """Ulysses shards image and text tokens evenly: both counts must divide by the degree."""
    if degree == 1:
        return
    for name, count in (("image", image_tokens(pipe, height, width)), ("text", text_tokens)):
        if count % degree:
            raise Flux2LabError(
                f"Ulysses degree {degree} must divide the {name} token count ({count} at {height}x{width}); "
                f"choose a resolution whose {name} tokens divide by {degree}, or another degree."
            )


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, on every rank (just [obj] without a process group)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
