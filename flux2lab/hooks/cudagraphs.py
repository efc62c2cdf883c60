"""CUDA graphs for the transformer blocks, with every decision left on the host.

Each repeated block (8 double-stream + 48 single-stream in FLUX.2 [dev]) is captured as its own CUDA graph the
first time it runs at a given input shape, and replayed after that. Capturing per block, underneath all other
hooks, is what lets graphs compose with TeaCache: TeaCache's hooks wrap these ones, decide on the host whether a
step computes, and either replay the captured blocks or skip them; nothing data-dependent is ever captured.
Shapes are static per resolution: inputs of a new shape (another resolution, another prompt length) capture a
new graph, and graphs of earlier shapes are kept for when they come back.

Why not `torch.compile(mode="reduce-overhead")`: its cudagraph trees re-record when the 56 block instances
present different parameter addresses to one compiled function, and they need a step marker that diffusers'
pipeline does not set; explicit capture per block instance has neither problem. With `compile`, the captured
function is the torch.compile'd block forward (compiled below the hooks, so dynamo never traces TeaCache).

Memory: all graphs share one memory pool (they always replay in the order they were captured, one at a time),
and a block's input that is the previous block's graph output is used in place, not copied, so a replayed step
makes no copies of the hidden states. Outputs live in graph memory and stay valid until the same block replays,
which is all the transformer's forward needs; anything kept across steps (TeaCache's residual) is computed
from them, not aliased.

Teardown: under Ulysses the graphs capture NCCL all-to-alls, and NCCL will not destroy a communicator while a
graph holding one of its kernels is alive (see `parallel.shutdown`). `release_all` destroys every graph this
process captured; `parallel.shutdown` calls it before destroying the process group.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils._pytree import tree_flatten, tree_unflatten

from flux2lab.common.errors import FeatureNotAvailable

HOOK_NAME = "flux2lab_cuda_graph"


@dataclass
class _Captured:
    graph: Any
    static_inputs: list[torch.Tensor]
    outputs: Any


class _CudaGraph:
    """torch.cuda.CUDAGraph capture/replay, after one warm-up run on a side stream (lazy inits, autotuning)."""

    def __init__(self, device: torch.device, distributed: bool) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.warmup_stream = torch.cuda.Stream(device)
        # Under torch.distributed, NCCL's watchdog thread queries events while this thread captures; "global"
        # capture mode would turn those queries into errors.
        self.mode = "thread_local" if distributed else "global"

    def capture(self, fn, args, kwargs):
        stream = self.warmup_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            fn(*args, **kwargs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode=self.mode):
            outputs = fn(*args, **kwargs)
        return graph, outputs

    @staticmethod
    def replay(graph) -> None:
        graph.replay()

    def release(self, graphs: list) -> None:
        torch.cuda.synchronize(self.device)  # no replay in flight when the graphs and their pool go
        for graph in graphs:
            graph.reset()


class _Rerun:
    """Stand-in for tests on CPU: "replay" re-runs the function on the static inputs and writes the results
    into the same output tensors, so static-buffer, aliasing and chaining behave exactly as with real graphs."""

    def capture(self, fn, args, kwargs):
        outputs = fn(*args, **kwargs)
        return (fn, args, kwargs, outputs), outputs

    @staticmethod
    def replay(graph) -> None:
        fn, args, kwargs, outputs = graph
        fresh, _ = tree_flatten(fn(*args, **kwargs))
        for old, new in zip(tree_flatten(outputs)[0], fresh):
            if isinstance(old, torch.Tensor):
                old.copy_(new)

    @staticmethod
    def release(graphs: list) -> None:
        pass  # nothing outside Python references to let go of


class GraphSet:
    """The captured graphs of one transformer: one backend, one memory pool, the outputs that chain."""

    def __init__(self, backend: _CudaGraph | _Rerun) -> None:
        self.backend = backend
        self.captures = 0
        self.replays = 0
        self.hooks: list[BlockGraphHook] = []
        self._outputs: dict[tuple, torch.Tensor] = {}  # graph outputs, by (address, shape, strides)
        _LIVE.add(self)

    @property
    def held(self) -> int:
        """Graphs captured and not released."""
        return sum(len(hook.by_key) for hook in self.hooks)

    def release(self) -> int:
        """Destroy every captured graph (blocks capture again at their next use); returns how many."""
        graphs = [c.graph for hook in self.hooks for c in hook.by_key.values()]
        self.backend.release(graphs)
        for hook in self.hooks:
            hook.by_key.clear()
        self._outputs.clear()
        return len(graphs)

    @staticmethod
    def _where(t: torch.Tensor) -> tuple:
        return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype

    def static_input(self, t: torch.Tensor) -> torch.Tensor:
        """A graph's input buffer for `t`: another graph's output is used in place; anything else is copied
        into a buffer of its own (outside the pool, so later captures cannot reuse it)."""
        chained = self._outputs.get(self._where(t))
        return chained if chained is not None else t.clone()

    def register_outputs(self, outputs: Any) -> None:
        for t in tree_flatten(outputs)[0]:
            if isinstance(t, torch.Tensor):
                self._outputs[self._where(t)] = t


class BlockGraphHook(ModelHook):
    """Innermost hook on one block: replay its graph for these input shapes, capturing it the first time."""

    _is_stateful = False

    def __init__(self, graphs: GraphSet, compile: bool) -> None:
        super().__init__()
        self.graphs = graphs
        self.compile = compile
        self._fn = None
        self.by_key: dict[tuple, _Captured] = {}

    def _function(self):
        if self._fn is None:
            forward = self.fn_ref.original_forward
            self._fn = torch.compile(forward, fullgraph=True) if self.compile else forward
        return self._fn

    @staticmethod
    def _key(leaves: list[Any], spec: Any) -> tuple | None:
        """Shapes and plain values that select a graph; None when an argument is an object (e.g. a KV cache
        the block writes into), whose effects a graph could not replay."""
        parts: list[Any] = [str(spec)]
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                parts.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device))
            elif leaf is None or isinstance(leaf, (bool, int, float, str)):
                parts.append((type(leaf), leaf))
            else:
                return None
        return tuple(parts)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        key = self._key(leaves, spec)
        if key is None or torch.is_grad_enabled():  # an object argument, or training: not a graph's job
            return self.fn_ref.original_forward(*args, **kwargs)
        captured = self.by_key.get(key)
        if captured is None:
            captured = self._capture(leaves, spec)
            self.by_key[key] = captured
        else:
            tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
            for new, static in zip(tensors, captured.static_inputs):
                if new.data_ptr() != static.data_ptr():
                    static.copy_(new)
        self.graphs.backend.replay(captured.graph)
        self.graphs.replays += 1
        return captured.outputs

    def _capture(self, leaves: list[Any], spec: Any) -> _Captured:
        static_leaves = [self.graphs.static_input(x) if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = tree_unflatten(static_leaves, spec)
        graph, outputs = self.graphs.backend.capture(self._function(), args, kwargs)
        self.graphs.register_outputs(outputs)
        self.graphs.captures += 1
        return _Captured(graph, [x for x in static_leaves if isinstance(x, torch.Tensor)], outputs)


def repeated_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    names = set(getattr(transformer, "_repeated_blocks", ()) or ())
    return [m for m in transformer.modules() if type(m).__name__ in names]


def enable(transformer: torch.nn.Module, compile: bool = False, *, _rerun_on_cpu: bool = False) -> GraphSet:
    """Capture each repeated block of `transformer` as a CUDA graph per input shape (lazily, at first use).

    Call before any other hook is put on the blocks (TeaCache's hooks must wrap these). `compile` captures the
    torch.compile'd block forward instead of the eager one. `_rerun_on_cpu` swaps in a CPU stand-in for tests.
    """
    device = transformer.device
    if _rerun_on_cpu:
        backend: _CudaGraph | _Rerun = _Rerun()
    elif device.type != "cuda":
        raise FeatureNotAvailable(
            f"cuda_graphs needs a CUDA GPU; the transformer is on '{device}'. Set \"cuda_graphs\": false in the "
            "recipe for CPU runs."
        )
    else:
        backend = _CudaGraph(device, torch.distributed.is_available() and torch.distributed.is_initialized())
    blocks = repeated_blocks(transformer)
    if not blocks:
        raise FeatureNotAvailable(f"{type(transformer).__name__} declares no repeated blocks to capture.")
    graphs = GraphSet(backend)
    for block in blocks:
        registry = HookRegistry.check_if_exists_or_initialize(block)
        if registry.hooks:
            raise FeatureNotAvailable(
                f"cuda_graphs must be enabled before other hooks ({', '.join(registry.hooks)}) are put on the "
                "transformer blocks; apply the recipe to a freshly loaded pipeline."
            )
        hook = BlockGraphHook(graphs, compile)
        registry.register_hook(hook, HOOK_NAME)
        graphs.hooks.append(hook)
    transformer.flux2lab_graphs = graphs
    return graphs


def graphs_of(transformer: torch.nn.Module) -> GraphSet | None:
    return getattr(transformer, "flux2lab_graphs", None)


# Every GraphSet of this process, weakly: the pipeline that holds one may outlive its last user (hook reference
# cycles, an exception's traceback), so teardown cannot rely on it having been collected.
_LIVE: weakref.WeakSet[GraphSet] = weakref.WeakSet()


def release_all() -> int:
    """Destroy every CUDA graph this process captured; returns how many. Run it before NCCL communicators are
    destroyed (`parallel.shutdown` does)."""
    return sum(graphs.release() for graphs in list(_LIVE))
