"""TeaCache for FLUX.2 as diffusers hooks on the stock `Flux2Transformer2DModel`.

TeaCache skips a whole denoising step when the timestep-modulated input of the first block has barely
changed since the last computed step, and reuses that step's residual instead. The rule (NVIDIA's FLUX.2
[dev] adaptation of the original TeaCache):

- modulated input `m_t = norm1(x) * (1 + scale_msa) + shift_msa`, with `x` the image tokens after
  `x_embedder`, `norm1` block 0's affine-free LayerNorm and shift/scale block 0's attention modulation;
- `rel_l1 = mean|m_t - m_{t-1}| / mean|m_{t-1}|`, rescaled by `poly(rel_l1)` (coefficients highest degree
  first, as `numpy.poly1d`) and added to an accumulator; while the accumulator stays under `threshold` the
  step is skipped, otherwise the blocks run and the accumulator resets to 0; `m_{t-1}` follows every step;
- the first `ret_steps` steps (and step 0 always) and the steps from `cutoff_steps` on always compute;
- a computed step caches `blocks_output - x_embedder_output` (image tokens, before `norm_out`); a skipped
  step adds it to the current `x_embedder` output; `norm_out`/`proj_out` always run with the current step's
  embedding. With `residual_order=1` a skipped step adds instead the residual extrapolated from the last two
  computed steps (`predict_residual`); the rule that decides which steps skip is the same. The rule itself
  (settings, one step's decision) is in `flux2lab.hooks.teacache_rule`.

How it sits on the model (no fork, no patched forward; only `ModelHook`s in diffusers' `HookRegistry`):

- a root hook on the transformer counts steps, reads the timestep and notices a new image (the timestep
  does not decrease), since `Flux2Pipeline` opens no `cache_context`;
- post-hooks on `double_stream_modulation_img` and `x_embedder` see block 0's inputs and make the decision
  there, *before* any block runs and outside every compiled region, so the host sync that turns the
  distance into a Python bool never breaks a `torch.compile` graph;
- every double and single block gets a pass-through hook: on a skipped step it returns its inputs;
- a pre-hook on `norm_out` stores the residual on computed steps and adds it on skipped ones (the
  pass-through blocks leave exactly the `x_embedder` output there), so no block needs special handling.

The blocks therefore stay compilable (`compile_repeated_blocks(fullgraph=True)`): a block's compiled graph
only branches on one Python bool, which gives one graph per block class for computing and one for skipping.

Reference images (multi-reference editing): `Flux2Pipeline` appends the reference latents to the image
tokens (position id T > 0; the generated image has T = 0). They do not change between steps, so they are
left out of the distance, which keeps its scale the same as in text-to-image; the residual covers all image
tokens (the pipeline discards the reference tokens' output).

Batches: the distance is one mean over the whole batch, so a batch skips or computes together (one
decision and one log entry per step). Classifier-free guidance with two transformer calls per step is not
supported (FLUX.2 [dev] is guidance-distilled and calls the transformer once per step).

Context parallelism (each rank holds a shard of the tokens): the two sums behind the distance are
all-reduced over the context-parallel group, so every rank takes the same decision; ranks that disagreed
would deadlock in the next attention all-to-all.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import BaseState
from diffusers.models.transformers.transformer_flux2 import Flux2Modulation
from diffusers.utils.torch_utils import unwrap_module

from flux2lab.common.errors import Flux2LabError
from flux2lab.hooks.teacache_rule import REPLAYED, TeaCacheConfig, decide, forced_reason, plan_skips, rescale

# The rule lives in teacache_rule; its config and pure functions are also reachable from here.
__all__ = [
    "HOOK_NAME", "TeaCacheConfig", "apply_teacache", "context_parallel_group", "decide", "forced_reason",
    "forward_argument", "generated_token_mask", "modulated_input", "plan_skips", "predict_residual", "relative_l1",
    "remove_teacache", "rescale", "reset_teacache", "teacache_config", "teacache_log",
]

HOOK_NAME = "flux2lab_teacache"


# ---------------------------------------------------------------------------------------------------------
# Measuring


def modulated_input(norm1: torch.nn.Module, x_emb: torch.Tensor, temb_mod_img: torch.Tensor) -> torch.Tensor:
    """Block 0's modulated attention input: `norm1(x) * (1 + scale_msa) + shift_msa`."""
    (shift_msa, scale_msa, _gate), _mlp = Flux2Modulation.split(temb_mod_img, 2)
    return norm1(x_emb) * (1 + scale_msa) + shift_msa


def generated_token_mask(img_ids: torch.Tensor) -> torch.Tensor | None:
    """Which image tokens belong to the image being generated (position id T == 0 in `Flux2Pipeline`);
    None when all do (no reference images)."""
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    mask = ids[:, 0] == 0
    return None if bool(mask.all()) else mask


def context_parallel_group(transformer: torch.nn.Module):
    """The process group over which context parallelism shards the tokens, or None."""
    config = getattr(unwrap_module(transformer), "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is None or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return mesh.get_group()


def relative_l1(current: torch.Tensor, previous: torch.Tensor, group=None) -> float:
    """`mean|current - previous| / mean|previous|`, over all ranks of `group` when given.

    Both means run over the same elements, so the element counts cancel and only the two sums are reduced
    (one all-reduce, then one host sync that every rank makes with the same numbers).
    """
    sums = torch.stack([(current - previous).abs().sum(dtype=torch.float32),
                        previous.abs().sum(dtype=torch.float32)])
    if group is not None:
        torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM, group=group)
    diff, prev = sums.tolist()
    return diff / prev if prev > 0 else math.inf


def _shard_like_context_parallel(transformer: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full-sequence token mask, split exactly as diffusers splits the tokens.

    Needed when our root hook sits outside diffusers' context-parallel input hook (TeaCache applied after
    `enable_parallelism`) and so saw the whole `img_ids`; the split itself is diffusers' own code.
    """
    from diffusers.hooks.context_parallel import _CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE
    from diffusers.models._modeling_parallel import ContextParallelInput

    split = HookRegistry.check_if_exists_or_initialize(transformer).get_hook(
        _CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE.format(""))
    if split is None:
        raise RuntimeError(f"TeaCache: token mask of length {mask.shape[0]} does not match the image tokens, and "
                           "the transformer has no context-parallel split to explain it")
    return split._prepare_cp_input(mask.view(1, -1, 1), ContextParallelInput(split_dim=1, expected_dims=3)).view(-1)


# ---------------------------------------------------------------------------------------------------------
# The hooks


class _State(BaseState):
    """Everything TeaCache remembers between steps of one image; shared by all its hooks.

    `reset` keeps the log: diffusers resets stateful hooks at the end of every pipeline call, and the
    finished image's log must survive until it is read; the next image's first step clears it.
    """

    def __init__(self, config: TeaCacheConfig) -> None:
        self.config = config
        self.log: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.last_timestep: float | None = None
        self.carry = 0.0
        self.previous: torch.Tensor | None = None  # m_{t-1}, generated tokens only
        self.computed: list[tuple[int, torch.Tensor]] = []  # (step, residual) of the last computed steps
        self.residual: torch.Tensor | None = None  # what the current skipped step adds
        self.x_emb: torch.Tensor | None = None
        self.temb_mod_img: torch.Tensor | None = None
        self.modulation_step: int | None = None  # the step `temb_mod_img` is of
        self.mask: torch.Tensor | None = None
        self.skip = False  # the only thing the (compiled) blocks read


def forward_argument(module: torch.nn.Module, name: str, args: tuple, kwargs: dict) -> Any:
    """Argument `name` of a hooked module's forward call, however it was passed (None if not passed)."""
    if name in kwargs:
        return kwargs[name]
    params = list(inspect.signature(type(unwrap_module(module)).forward).parameters)[1:]
    index = params.index(name)
    return args[index] if index < len(args) else None


class _StepHook(ModelHook):
    """On the transformer: one call is one step; a timestep that does not decrease starts a new image. With the
    pipeline's scheduler, an image whose schedule has another step count than the config's is refused at step 0.

    Stateful, so the pipeline's own end-of-call reset (`maybe_free_model_hooks`) also restarts TeaCache.
    """

    _is_stateful = True

    def __init__(self, state: _State, scheduler: Any = None) -> None:
        super().__init__()
        self.state = state
        self.scheduler = scheduler

    def pre_forward(self, module, *args, **kwargs):
        self._begin_step(forward_argument(module, "timestep", args, kwargs),
                         forward_argument(module, "img_ids", args, kwargs))
        return args, kwargs

    @torch.compiler.disable
    def _begin_step(self, timestep: torch.Tensor, img_ids: torch.Tensor) -> None:
        st = self.state
        t = float(timestep.flatten()[0]) * 1000  # the pipeline passes t / 1000
        if st.last_timestep is not None and t >= st.last_timestep:
            st.reset()
        scheduled = getattr(self.scheduler, "num_inference_steps", None) if st.step == 0 else None
        if scheduled is not None and scheduled != st.config.num_inference_steps:
            raise Flux2LabError(
                f"TeaCache was set up for {st.config.num_inference_steps} steps, but the pipeline runs {scheduled}; "
                "apply it with num_inference_steps equal to the pipeline's (the recipe's `steps`).")
        if st.step >= st.config.num_inference_steps:
            raise Flux2LabError(
                f"TeaCache was set up for {st.config.num_inference_steps} steps, but the pipeline is running step "
                f"{st.step + 1}; apply it with num_inference_steps equal to the pipeline's (the recipe's `steps`).")
        if st.step == 0:
            st.mask = generated_token_mask(img_ids)
            st.log = []
        st.last_timestep = t

    def post_forward(self, module, output):
        self.state.step += 1
        return output

    def reset_state(self, module):
        self.state.reset()
        return module


class _ModulationHook(ModelHook):
    """On `double_stream_modulation_img`: keeps block 0's modulation for the decision."""

    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def post_forward(self, module, output):
        self.state.temb_mod_img, self.state.modulation_step = output, self.state.step
        return output


class _DecisionHook(ModelHook):
    """On `x_embedder`: measures the modulated input's change and decides whether this step computes."""

    def __init__(self, state: _State, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.state = state
        self.norm1 = transformer.transformer_blocks[0].norm1
        self.transformer = transformer

    def post_forward(self, module, output):
        self._decide(output)
        return output

    @torch.compiler.disable
    def _decide(self, x_emb: torch.Tensor) -> None:
        st, config = self.state, self.state.config
        if st.modulation_step != st.step:
            raise RuntimeError(f"TeaCache: block 0's modulation of step {st.step} was not seen before x_embedder "
                               "ran; the transformer's forward no longer runs in the order TeaCache hooks.")
        st.x_emb = x_emb
        m = modulated_input(self.norm1, x_emb, st.temb_mod_img)
        if st.mask is not None:
            if st.mask.shape[0] != m.shape[1]:
                st.mask = _shard_like_context_parallel(self.transformer, st.mask)
            m = m[:, st.mask]
        measure = st.step > 0 and (config.replay_skips is not None or forced_reason(config, st.step) is None)
        rel = None
        if measure:
            rel = relative_l1(m, st.previous, context_parallel_group(self.transformer))
        d = decide(config, st.step, rel, st.carry)
        st.carry = d.carry
        st.previous = m
        st.skip = not d.computed
        if st.skip:
            st.residual = predict_residual(st.computed, st.step, config.residual_slope)
        st.log.append({"step": st.step, "timestep": st.last_timestep, "rel_l1": rel, "rescaled": d.rescaled,
                       "accumulator": d.accumulator, "computed": d.computed, "reason": d.reason,
                       "replayed": d.reason == REPLAYED})


class _BlockHook(ModelHook):
    """On every block: returns its inputs unchanged on a skipped step (traced by torch.compile: one bool)."""

    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state
        self._metadata = None

    def initialize_hook(self, module):
        self._metadata = TransformerBlockRegistry.get(unwrap_module(module).__class__)
        return module

    def new_forward(self, module, *args, **kwargs):
        if not self.state.skip:
            return self.fn_ref.original_forward(*args, **kwargs)
        meta = self._metadata
        hidden = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
        if meta.return_encoder_hidden_states_index is None:
            return hidden
        out = [None, None]
        out[meta.return_hidden_states_index] = hidden
        out[meta.return_encoder_hidden_states_index] = meta._get_parameter_from_args_kwargs(
            meta.encoder_hidden_states_argument_name, args, kwargs)
        return tuple(out)


def predict_residual(computed: list[tuple[int, torch.Tensor]], step: int, slope: float = 1.0) -> torch.Tensor:
    """The residual a skipped `step` adds, from the `(step, residual)` pairs of the last computed steps (oldest
    first): the last residual, or with two given, the line through both followed to `step`, its change from the
    last residual scaled by `slope` (1 = the line itself, as SeaCache's `residual_order=1`; below 1, damped).

    The line runs in step count, not in sigma: on `mini` (30 steps, FLUX.2's shifted schedule, whose sigma steps
    grow towards the end) following it in sigma overshoots: 42.6 dB against 47.2 in step count, and a slope of
    0.75 gives 51.9 (PSNR against the uncached images, TeaCache threshold 0.05, 40% of the steps computed)."""
    last_step, last = computed[-1]
    if len(computed) < 2:
        return last
    prev_step, prev = computed[-2]
    return last + (last - prev) * (slope * (step - last_step) / (last_step - prev_step))


class _ResidualHook(ModelHook):
    """On `norm_out`: caches `blocks_output - x_embedder_output` when computing, adds it back when skipping."""

    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        st = self.state
        args = list(args)
        hidden = args[0] if args else kwargs["x"]
        if st.skip:
            hidden = hidden + st.residual  # the pass-through blocks left exactly x_emb here
        else:
            keep = st.config.residual_order + 1
            st.computed = [*st.computed, (st.step, hidden - st.x_emb)][-keep:]
        if args:
            args[0] = hidden
        else:
            kwargs["x"] = hidden
        return tuple(args), kwargs


def _hooks(transformer: torch.nn.Module) -> HookRegistry:
    return HookRegistry.check_if_exists_or_initialize(transformer)


def _step_hook(transformer: torch.nn.Module) -> _StepHook | None:
    return _hooks(unwrap_module(transformer)).get_hook(HOOK_NAME)


def apply_teacache(transformer: torch.nn.Module, config: TeaCacheConfig, scheduler: Any = None) -> None:
    """Attach TeaCache to a `Flux2Transformer2DModel`, or swap the config of the TeaCache already attached.

    Swapping keeps the same hook objects, so a compiled transformer is not recompiled when a search tries
    another threshold; the state restarts either way. With the pipeline's `scheduler`, a pipeline call with
    another step count than `config.num_inference_steps` is refused at its first step.
    """
    transformer = unwrap_module(transformer)
    existing = _step_hook(transformer)
    if existing is not None:
        existing.state.config = config
        existing.scheduler = scheduler
        existing.state.reset()
        return
    if not hasattr(transformer, "transformer_blocks") or not hasattr(transformer, "single_transformer_blocks"):
        raise Flux2LabError(f"TeaCache supports the FLUX.2 transformer only, not {type(transformer).__name__}.")
    state = _State(config)
    targets: list[tuple[torch.nn.Module, ModelHook]] = [
        (transformer.double_stream_modulation_img, _ModulationHook(state)),
        (transformer.x_embedder, _DecisionHook(state, transformer)),
        *[(block, _BlockHook(state)) for block in transformer.transformer_blocks],
        *[(block, _BlockHook(state)) for block in transformer.single_transformer_blocks],
        (transformer.norm_out, _ResidualHook(state)),
        (transformer, _StepHook(state, scheduler)),
    ]
    for module, hook in targets:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
    _hooks(transformer).invalidate_child_registries_cache()


def remove_teacache(transformer: torch.nn.Module) -> None:
    """Detach TeaCache (a no-op when it is not attached)."""
    transformer = unwrap_module(transformer)
    registry = _hooks(transformer)
    registry.remove_hook(HOOK_NAME, recurse=True)
    registry.invalidate_child_registries_cache()


def teacache_config(transformer: torch.nn.Module) -> TeaCacheConfig | None:
    hook = _step_hook(transformer)
    return None if hook is None else hook.state.config


def _attached(transformer: torch.nn.Module) -> _StepHook:
    hook = _step_hook(transformer)
    if hook is None:
        raise Flux2LabError("TeaCache is not attached to this transformer; apply it first "
                            "(flux2lab.hooks.teacache.apply_teacache or a recipe with teacache.enabled).")
    return hook


def reset_teacache(transformer: torch.nn.Module) -> None:
    """Forget everything from the previous image (its cached residual and its log)."""
    _attached(transformer).state.reset()


def teacache_log(transformer: torch.nn.Module) -> list[dict[str, Any]]:
    """The current (or last) image's per-step log: step, timestep (0..1000), rel_l1, rescaled, accumulator,
    computed, reason, replayed. `rel_l1`/`rescaled` are None on steps whose distance was not needed."""
    return [dict(entry) for entry in _attached(transformer).state.log]
