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

Compiled blocks: every layer carries the same hook, which writes its count onto the layer itself; one tally per
transformer reads and clears those counts between transformer calls (outside any compiled region) and hands each
call to every counter attached. A hook that closed over the layer's index, or over something per counter, made
dynamo guard on that value and recompile every block (past its limit of 8 on FLUX.2 [dev]'s 56, running the rest
eager) or every image.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import unwrap_module

from flux2lab.common.errors import Flux2LabError

BLOCK_STACKS = ("transformer_blocks", "single_transformer_blocks")
RAN = "_flux2lab_macs_ran"  # on each counted Linear: its multiply-accumulates in the open call, 0 if it did not run
TALLY = "_flux2lab_block_tally"  # on the transformer: the _Tally its counters share


def _count(module: torch.nn.Linear, inputs: tuple, output) -> None:
    # Only a store of a shape-derived constant: replayed after a compiled graph, nothing for dynamo to guard on.
    setattr(module, RAN, inputs[0].numel() * module.out_features)


class _Tally:
    """The hooks of one transformer, shared by its counters: per transformer call, what each block Linear ran."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        self.linears = [m for name in BLOCK_STACKS for block in getattr(transformer, name) for m in block.modules()
                        if isinstance(m, torch.nn.Linear)]
        self.counters: list[BlockCounter] = []
        self.open = False
        self._clear()
        self.handles = [transformer.register_forward_pre_hook(self._start_call)]
        self.handles += [lin.register_forward_hook(_count) for lin in self.linears]
        setattr(transformer, TALLY, self)

    def _clear(self) -> None:
        for lin in self.linears:
            setattr(lin, RAN, 0)

    def _start_call(self, module, args) -> None:
        self.flush()
        self.open = True

    def flush(self) -> None:
        """Close the open transformer call, handing what ran in it to every counter."""
        if self.open:
            ran = [getattr(lin, RAN) for lin in self.linears]
            self._clear()
            self.open = False
            for counter in self.counters:
                counter._add_call(ran)

    def leave(self, counter: BlockCounter) -> None:
        self.counters.remove(counter)
        if not self.counters:
            for handle in self.handles:
                handle.remove()
            for lin in self.linears:
                delattr(lin, RAN)
            delattr(self.transformer, TALLY)


class BlockCounter:
    """Counts, per transformer call (one denoising step), the block stack's multiply-accumulates that ran.

    Use: `counter = BlockCounter(transformer)`; `counter.reset()` before each image; after it,
    `counter.computed_fraction()` (the image's fraction of the block stack computed) and `counter.step_fractions()`
    (one per step); `counter.close()` (or `with BlockCounter(...) as counter:`) removes its hooks. Several counters
    on one transformer each see every call.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        from flux2lab.hooks.cudagraphs import graphs_of

        t = unwrap_module(transformer)
        if graphs_of(t) is not None:
            raise Flux2LabError("the block counter cannot count under CUDA graphs (a replayed block runs no Python); "
                                "measure the computed fraction with cuda_graphs off.")
        self._tally: _Tally | None = getattr(t, TALLY, None) or _Tally(t)
        self._tally.counters.append(self)
        self._cost: list[int | None] = [None] * len(self._tally.linears)  # MACs of one call, as each last ran
        self._calls: list[int] = []  # MACs that ran, per finished transformer call

    def _add_call(self, ran: list[int]) -> None:
        self._cost = [macs or cost for macs, cost in zip(ran, self._cost)]
        self._calls.append(sum(ran))

    def reset(self) -> None:
        """Start a new image (a transformer call still open belongs to the last one)."""
        self._tally.flush()
        self._calls = []
        self._cost = [None] * len(self._cost)

    def _full(self) -> int:
        if any(c is None for c in self._cost):
            raise Flux2LabError("the block counter has not seen every block layer run in this image; reset it "
                                "before the image, so that its first (always computed) step is counted.")
        return sum(self._cost)

    def step_fractions(self) -> list[float]:
        """Per transformer call of the current image: the fraction of the block stack's work that ran."""
        self._tally.flush()
        if not self._calls:
            return []
        full = self._full()
        return [c / full for c in self._calls]

    def computed_fraction(self) -> float:
        """The fraction of the block stack's work that ran over the current image (1.0 with no cache)."""
        self._tally.flush()
        if not self._calls:
            raise Flux2LabError("the block counter has counted no transformer call since its last reset.")
        return sum(self._calls) / (self._full() * len(self._calls))

    def close(self) -> None:
        if self._tally is not None:
            self._tally.leave(self)
            self._tally = None

    def __enter__(self) -> BlockCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
