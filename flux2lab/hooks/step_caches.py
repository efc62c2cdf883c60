"""diffusers' own step caches (TaylorSeer, MagCache, FirstBlockCache, SeaCache) on the stock FLUX.2 transformer.

The caches are diffusers' hooks, configured with diffusers' config classes and attached by `enable_cache`; this
module adds only what FLUX.2 under the stock `Flux2Pipeline` lacks:

- **The step.** `Flux2Pipeline` opens no `cache_context`: TaylorSeer and FirstBlockCache then refuse to run ("No
  cache context is set") and SeaCache runs fail-open (caches nothing), since it needs the step index, sigma and
  step count. A step clock (a hook on the transformer, outside the caches' own) sets diffusers'
  `CacheContext(name, step_index, num_inference_steps, timestep, sigma)` before every transformer call (sigma is
  the timestep the pipeline passes, t / 1000) and starts a new image, resetting every cache's state, when the
  timestep does not decrease; the pipeline's own end-of-call reset restarts it too. `step_cache_context` scopes
  one image explicitly.
- **FLUX.2's two block layouts.** The head block (double-stream) returns text and image apart, the tail block
  (single-stream) one `[text, image]` sequence. FirstBlockCache's tail subtracts the head's output, a Python
  list `[image, text]`, from its tensor: `TypeError: unsupported operand type(s) for -: 'Tensor' and 'list'`
  (and its residual would not fit the head's image tokens either). SeaCache's tail residual never has the
  head input's shape, so SeaCache records no history and every cache hit falls back to a full run. A thin hook
  on the tail block translates between the layouts for each (`_FirstBlockTail`, `_SeaCacheTail`); the caches'
  code runs unchanged. MagCache handles the fused tail itself and runs as it is.
- **SeaCache's indicator** filters the latent as a (C, T, H, W) grid: `flux2_raw_vision` unpacks the generated
  image tokens by their position ids.

Which methods cannot run where (`step_cache_refusal` gives the reason from the set-up alone, before any model
work; `check_step_cache` raises it for a transformer):
FirstBlockCache and SeaCache decide from the tokens a rank holds, so under context parallelism ranks would
disagree and deadlock; TaylorSeer predicts inside the blocks, which flux2lab's CUDA graphs capture whole; and
every one decides inside the blocks in code dynamo will not trace, so none runs in blocks compiled with
`fullgraph=True` (all four run, unchanged, with `fullgraph=False`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import Flux2Transformer2DModel
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    ModelHook,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
)
from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from diffusers.hooks.mag_cache import _MAG_CACHE_LEADER_BLOCK_HOOK
from diffusers.hooks.sea_cache import _SEA_CACHE_ROOT_HOOK, _is_parameter_sharded, _record_full_execution
from diffusers.utils.torch_utils import unwrap_module

from flux2lab.common.errors import Flux2LabError
from flux2lab.hooks.teacache import HOOK_NAME as TEACACHE_HOOK
from flux2lab.hooks.teacache import forward_argument, generated_token_mask

CONFIGS = {"taylorseer": TaylorSeerCacheConfig, "magcache": MagCacheConfig, "first_block": FirstBlockCacheConfig,
           "seacache": SeaCacheConfig}
METHODS = tuple(CONFIGS)
# Config fields flux2lab fills in itself: not settings.
_FILLED_IN = {"magcache": {"num_inference_steps"}, "seacache": {"raw_vision_callback"}}
CLOCK_HOOK, ADAPTER_HOOK, MAG_RATIO_HOOK = "flux2lab_step_clock", "flux2lab_step_cache_adapter", "flux2lab_mag_ratios"
DEFAULT_CONTEXT = "cond"


def settings_allowed(method: str) -> list[str]:
    """The settings a method takes: its diffusers config's fields, less those flux2lab fills in."""
    _known(method)
    return sorted(f.name for f in dataclasses.fields(CONFIGS[method]) if f.name not in _FILLED_IN.get(method, ()))


def _known(method: str) -> None:
    if method not in CONFIGS:
        raise Flux2LabError(f"unknown step cache '{method}'; choose one of: {', '.join(METHODS)} "
                            "(TeaCache is flux2lab.hooks.teacache).")


def cache_config(method: str, settings: Mapping[str, Any], steps: int) -> Any:
    """diffusers' config for `method` from JSON-like `settings` (field names of the config class).

    `steps` is the pipeline's step count (MagCache interpolates its ratios to it). TaylorSeer's
    `taylor_factors_dtype` may be given by name (bf16 | fp16 | fp32) or null (the model's dtype).
    """
    from flux2lab.pipeline.models import DTYPES

    _known(method)
    allowed = settings_allowed(method)
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise Flux2LabError(f"step cache '{method}': unknown setting(s) {', '.join(unknown)}; "
                            f"allowed: {', '.join(allowed)}.")
    kwargs = dict(settings)
    dtype = kwargs.get("taylor_factors_dtype")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise Flux2LabError(f"step cache 'taylorseer': taylor_factors_dtype '{dtype}' is not one of "
                                f"{', '.join(DTYPES)} (or null for the model's dtype).")
        kwargs["taylor_factors_dtype"] = DTYPES[dtype]
    if method == "magcache":
        # Calibrating, one step more than run: MagCache would otherwise print its ratios and drop them at the
        # last step (`mag_ratios` keeps them); the step clock restarts it for each image.
        kwargs["num_inference_steps"] = steps + 1 if kwargs.get("calibrate") else steps
    if method == "seacache":
        kwargs["raw_vision_callback"] = flux2_raw_vision
    try:
        return CONFIGS[method](**kwargs)
    except (TypeError, ValueError) as error:
        raise Flux2LabError(f"step cache '{method}': {error}") from error


def step_cache_refusal(method: str, *, context_parallel: bool = False, cuda_graphs: bool = False,
                       compile_fullgraph: bool = False) -> str | None:
    """Why `method` cannot run with this set-up, or None: the check a recipe can make before any model work.
    `compile_fullgraph`: the blocks are compiled with `fullgraph=True` and not under CUDA graphs (which compile
    below every hook)."""
    _known(method)
    if context_parallel and method in ("first_block", "seacache"):
        return (f"step cache '{method}' cannot run under context parallelism: it decides from the tokens each rank "
                "holds, so ranks would take different decisions and deadlock in the next all-to-all. Use taylorseer "
                "or magcache (fixed schedules) or teacache (its distance is reduced over the ranks), or one GPU.")
    if cuda_graphs and method == "taylorseer":
        return ("step cache 'taylorseer' cannot run with CUDA graphs: it predicts the attention inside each block, "
                "and flux2lab captures each block whole, so a replay would compute every step. Turn cuda_graphs off.")
    if compile_fullgraph:
        return (f"step cache '{method}' cannot run in blocks compiled with fullgraph=True: diffusers takes its "
                "decision in a torch.compiler.disable'd function inside the blocks, where dynamo stops ('Skip "
                "inlining torch.compiler.disable()d function'). Compile with fullgraph=False (a graph break at each "
                "decision; images unchanged), or turn compile off.")
    return None


def check_step_cache(transformer: torch.nn.Module, method: str, *, compile_fullgraph: bool = False) -> None:
    """Refuse, with the reason, a method that cannot run on this transformer as it is set up (`compile_fullgraph`
    as in `step_cache_refusal`: whether the blocks are compiled so is not readable from the model)."""
    from flux2lab.hooks.cudagraphs import graphs_of

    _known(method)
    t = unwrap_module(transformer)
    if not isinstance(t, Flux2Transformer2DModel):
        raise Flux2LabError(f"step cache '{method}' is set up for the FLUX.2 transformer only, not {type(t).__name__}.")
    parallel = getattr(getattr(t, "_parallel_config", None), "context_parallel_config", None) is not None
    reason = step_cache_refusal(method, context_parallel=parallel, cuda_graphs=graphs_of(t) is not None,
                                compile_fullgraph=compile_fullgraph)
    if reason is not None:
        raise Flux2LabError(reason)
    if method == "seacache" and any(_is_parameter_sharded(b) for b in _blocks(t)):
        raise Flux2LabError("step cache 'seacache' cannot bypass parameter-sharded (FSDP/DTensor) blocks.")


def _blocks(t: torch.nn.Module) -> list[torch.nn.Module]:
    return [*t.transformer_blocks, *t.single_transformer_blocks]


# ---------------------------------------------------------------------------------------------------------
# The step clock


class _StepClock(ModelHook):
    """On the transformer, outside every cache hook: one call is one step; tells every cache which one."""

    _is_stateful = True

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.name = DEFAULT_CONTEXT
        self.reset_state(None)

    def pre_forward(self, module, *args, **kwargs):
        self._tick(module, forward_argument(module, "timestep", args, kwargs))
        return args, kwargs

    @torch.compiler.disable
    def _tick(self, module: torch.nn.Module, timestep: torch.Tensor) -> None:
        sigma = float(timestep.flatten()[0])  # the pipeline passes t / 1000, which is the flow-matching sigma
        if self.last_sigma is not None and sigma >= self.last_sigma:
            HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks()  # a new image; resets self
        if self.step >= self.steps:
            raise Flux2LabError(
                f"the step cache was set up for {self.steps} steps, but the pipeline is running step {self.step + 1}; "
                "apply it with the pipeline's num_inference_steps (the recipe's `steps`).")
        _set_cache_context(module, CacheContext(self.name, step_index=self.step, num_inference_steps=self.steps,
                                                timestep=sigma * 1000, sigma=sigma))
        self.last_sigma = sigma

    def post_forward(self, module, output):
        self.step += 1
        return output

    def reset_state(self, module):
        self.step = 0
        self.last_sigma: float | None = None
        return module


# ---------------------------------------------------------------------------------------------------------
# Adapters for FLUX.2's fused single-stream tail


class _FirstBlockTail(ModelHook):
    """On the tail block, outside FirstBlockCache's hook: before the tail computes, turns the head's output
    `[image, text]` into the tail's `[text, image]` sequence, so the tail records one residual over it; after, splits
    that residual into `(image, text)`, which is what the head adds to its two outputs on a cached step."""

    def __init__(self, state_manager) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.text_tokens = 0

    def pre_forward(self, module, *args, **kwargs):
        state = self.state_manager.get_state()
        if state.should_compute and isinstance(state.head_block_output, list):
            image, text = state.head_block_output
            self.text_tokens = text.shape[1]
            state.head_block_output = torch.cat([text, image], dim=1)
        return args, kwargs

    def post_forward(self, module, output):
        state = self.state_manager.get_state()
        residuals = state.tail_block_residuals
        if state.should_compute and residuals is not None and residuals[1] is None:
            joint, n = residuals[0], self.text_tokens
            state.tail_block_residuals = (joint[:, n:], joint[:, :n])
        return output


class _SeaCacheTail(ModelHook):
    """On the tail block, inside SeaCache's hook: after a full step, records SeaCache's history entry in the head's
    layout (text output, image residual) with SeaCache's own `_record_full_execution`, which SeaCache's tail hook
    cannot do from the fused `[text, image]` output (it then finds the step recorded and leaves it)."""

    root = None  # SeaCache's root hook, set once SeaCache is attached

    def post_forward(self, module, output):
        manager = self.root.state_manager
        state = manager.get_state() if manager._context is not None else None
        if state is not None and state.full_execution_pending and not state.skip_remaining \
                and state.gen_input is not None:
            n = output.shape[1] - state.gen_input.shape[1]
            _record_full_execution(self.root.config, state, gen_output=output[:, n:], und_output=output[:, :n])
        return output


def flux2_raw_vision(module: torch.nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """SeaCache's `raw_vision_callback` for FLUX.2: each image's generated latent tokens as a (C, 1, H, W) grid,
    placed by their (T, H, W, L) position ids (reference-image tokens, T > 0, are left out)."""
    hidden = forward_argument(module, "hidden_states", args, kwargs)
    ids = forward_argument(module, "img_ids", args, kwargs)
    ids = ids[0] if ids.ndim == 3 else ids
    mask = generated_token_mask(ids)
    if mask is not None:
        hidden, ids = hidden[:, mask], ids[mask]
    h, w = ids[:, 1].long(), ids[:, 2].long()
    height, width = int(h.max()) + 1, int(w.max()) + 1
    grid = hidden.new_zeros(hidden.shape[0], height * width, hidden.shape[-1])
    grid[:, h * width + w] = hidden
    return list(grid.view(-1, height, width, hidden.shape[-1]).permute(0, 3, 1, 2).unsqueeze(2).unbind(0))


class _MagRatios(ModelHook):
    """On the tail block, outside MagCache's hook, when calibrating: keeps the list MagCache appends this image's
    ratios to (MagCache drops it when it resets)."""

    def __init__(self, state_manager) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.ratios: list[float] = []

    def pre_forward(self, module, *args, **kwargs):
        self.ratios = self.state_manager.get_state().calibration_ratios
        return args, kwargs


# ---------------------------------------------------------------------------------------------------------
# Attaching


def _register(module: torch.nn.Module, hook: ModelHook, name: str) -> ModelHook:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    return hook


def _hook(module: torch.nn.Module, name: str) -> ModelHook | None:
    return HookRegistry.check_if_exists_or_initialize(module).get_hook(name)


def apply_step_cache(transformer: torch.nn.Module, method: str, settings: Mapping[str, Any], steps: int, *,
                     compile_fullgraph: bool = False) -> None:
    """Attach diffusers' `method` cache to a FLUX.2 transformer (replacing any step cache attached here before),
    with the step clock and the adapter it needs. `steps` is the pipeline's num_inference_steps;
    `compile_fullgraph` as in `check_step_cache`."""
    t = unwrap_module(transformer)
    check_step_cache(t, method, compile_fullgraph=compile_fullgraph)
    if _hook(t, TEACACHE_HOOK) is not None:
        raise Flux2LabError(f"TeaCache is attached; remove it before attaching step cache '{method}' "
                            "(one step cache at a time).")
    config = cache_config(method, settings, steps)
    remove_step_cache(t)
    head, tail = _blocks(t)[0], _blocks(t)[-1]
    sea_tail = _register(tail, _SeaCacheTail(), ADAPTER_HOOK) if method == "seacache" else None  # inside SeaCache's
    t.enable_cache(config)
    if method == "first_block":
        _register(tail, _FirstBlockTail(_hook(head, _FBC_LEADER_BLOCK_HOOK).state_manager), ADAPTER_HOOK)
    elif sea_tail is not None:
        sea_tail.root = _hook(t, _SEA_CACHE_ROOT_HOOK)
    elif method == "magcache" and config.calibrate:
        _register(tail, _MagRatios(_hook(head, _MAG_CACHE_LEADER_BLOCK_HOOK).state_manager), MAG_RATIO_HOOK)
    _register(t, _StepClock(steps), CLOCK_HOOK)
    HookRegistry.check_if_exists_or_initialize(t).invalidate_child_registries_cache()


def remove_step_cache(transformer: torch.nn.Module) -> None:
    """Detach the step cache and everything attached with it (a no-op when none is attached)."""
    t = unwrap_module(transformer)
    if t.is_cache_enabled:
        t.disable_cache()
    registry = HookRegistry.check_if_exists_or_initialize(t)
    for name in (CLOCK_HOOK, ADAPTER_HOOK, MAG_RATIO_HOOK):
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()


def step_cache_method(transformer: torch.nn.Module) -> str | None:
    """The attached method's name, or None."""
    config = getattr(unwrap_module(transformer), "_cache_config", None)
    return next((m for m, cls in CONFIGS.items() if isinstance(config, cls)), None)


def _clock(transformer: torch.nn.Module) -> _StepClock:
    clock = _hook(unwrap_module(transformer), CLOCK_HOOK)
    if clock is None:
        raise Flux2LabError("no step cache is attached to this transformer; attach one first "
                            "(flux2lab.hooks.step_caches.apply_step_cache).")
    return clock


def reset_step_cache(transformer: torch.nn.Module) -> None:
    """Forget everything the attached cache remembers (its residuals, its step)."""
    _clock(transformer)
    HookRegistry.check_if_exists_or_initialize(unwrap_module(transformer)).reset_stateful_hooks()


@contextmanager
def step_cache_context(transformer: torch.nn.Module, name: str = DEFAULT_CONTEXT) -> Iterator[None]:
    """One pipeline call (one image or batch) under the attached step cache, from a clean state, inside
    diffusers' `cache_context(name)`; the caches' state is keyed by `name` (e.g. "cond" / "uncond")."""
    clock = _clock(transformer)
    t = unwrap_module(transformer)
    reset_step_cache(t)
    clock.name = name
    try:
        with t.cache_context(name):
            yield
    finally:
        clock.name = DEFAULT_CONTEXT
        reset_step_cache(t)


def mag_ratios(transformer: torch.nn.Module) -> list[float]:
    """MagCache's per-step magnitude ratios of the current (or last) image, step 0 first (1.0): what a
    `magcache` attached with `{"calibrate": true}` measured, to pass as `mag_ratios` later."""
    t = unwrap_module(transformer)
    tap = _hook(t.single_transformer_blocks[-1], MAG_RATIO_HOOK)
    if tap is None:
        raise Flux2LabError("MagCache is not calibrating on this transformer; attach it with settings "
                            "{'calibrate': True} and generate an image first.")
    return [float(r) for r in tap.ratios]
