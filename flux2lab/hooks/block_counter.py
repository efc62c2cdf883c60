"""How much of the transformer's block stack really ran, whatever step cache is attached.

Counted where the work happens: every `nn.Linear` inside the repeated blocks (attention projections, MLPs; the
quantized layers are `nn.Linear` too) adds its multiply-accumulates, tokens x in x out, each time it executes.
A cache's pass-through hook, a block that returns its inputs, or an attention output that TaylorSeer predicts
runs no Linear and adds nothing; FirstBlockCache's head block and the MLPs TaylorSeer leaves running add what
they cost. The attention products themselves (QK^T, AV) are not counted: every cache here skips them together
with the projections around them.

The whole stack's cost of one call is each Linear's cost when it last ran in the current image; every cache
computes the first step of an image fully, which fills it in. Under flux2lab's CUDA graphs a replayed block runs
no Python, so nothing would be counted there: the counter refuses them.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import unwrap_module

from flux2lab.common.errors import Flux2LabError

BLOCK_STACKS = ("transformer_blocks", "single_transformer_blocks")


class BlockCounter:
    """Counts, per transformer call (one denoising step), the block stack's multiply-accumulates that ran.

    Use: `counter = BlockCounter(transformer)`; `counter.reset()` before each image; after it,
    `counter.computed_fraction()` (the image's fraction of the block stack computed) and `counter.step_fractions()`
    (one per step); `counter.close()` (or `with BlockCounter(...) as counter:`) removes its hooks.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        from flux2lab.hooks.cudagraphs import graphs_of

        t = unwrap_module(transformer)
        if graphs_of(t) is not None:
            raise Flux2LabError("the block counter cannot count under CUDA graphs (a replayed block runs no Python); "
                                "measure the computed fraction with cuda_graphs off.")
        linears = [m for name in BLOCK_STACKS for block in getattr(t, name) for m in block.modules()
                   if isinstance(m, torch.nn.Linear)]
        self._cost: list[int | None] = [None] * len(linears)  # MACs of one call, as the layer last ran
        self._ran = [False] * len(linears)  # which layers ran in the open call
        self._calls: list[int] = []  # MACs that ran, per finished transformer call
        self._open = False
        self._handles = [t.register_forward_pre_hook(self._start_call)]
        self._handles += [lin.register_forward_hook(self._counter(i)) for i, lin in enumerate(linears)]

    def _start_call(self, module, args) -> None:
        self._close_call()
        self._open = True

    def _close_call(self) -> None:
        if self._open:
            self._calls.append(sum(c for c, ran in zip(self._cost, self._ran) if ran))
            self._ran = [False] * len(self._ran)
            self._open = False

    def _counter(self, index: int):
        # Only stores, no reads: inside a torch.compile'd block a read would make dynamo guard on the value
        # and recompile every step; a store of a shape-derived constant is replayed after the graph.
        def count(module: torch.nn.Linear, inputs: tuple, output) -> None:
            self._cost[index] = inputs[0].numel() * module.out_features
            self._ran[index] = True
        return count

    def reset(self) -> None:
        """Start a new image."""
        self._calls = []
        self._open = False
        self._ran = [False] * len(self._ran)
        self._cost = [None] * len(self._cost)

    def _full(self) -> int:
        if any(c is None for c in self._cost):
            raise Flux2LabError("the block counter has not seen every block layer run in this image; reset it "
                                "before the image, so that its first (always computed) step is counted.")
        return sum(self._cost)

    def step_fractions(self) -> list[float]:
        """Per transformer call of the current image: the fraction of the block stack's work that ran."""
        self._close_call()
        if not self._calls:
            return []
        full = self._full()
        return [c / full for c in self._calls]

    def computed_fraction(self) -> float:
        """The fraction of the block stack's work that ran over the current image (1.0 with no cache)."""
        self._close_call()
        if not self._calls:
            raise Flux2LabError("the block counter has counted no transformer call since its last reset.")
        return sum(self._calls) / (self._full() * len(self._calls))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> BlockCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
