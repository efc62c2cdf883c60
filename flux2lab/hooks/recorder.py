"""The calibration recorder: a diffusers hook (with two taps on the blocks) that measures, step by step, how much
the model output changes (TeaCache's y) and how much the block stack's residual grows or shrinks (MagCache's
magnitude ratio).

TeaCache calibration pairs the first number with TeaCache's own input distance (x) for every step. The second is
diffusers' MagCache calibration quantity, computed as `MagCacheConfig(calibrate=True)` computes it, so the ratios
can be passed to `MagCacheConfig(mag_ratios=...)`: the residual r_t is the last block's output (its image tokens,
the last ones of FLUX.2's fused sequence) minus the first block's input hidden states, and the ratio at step t is
mean over tokens of |r_t| / (|r_{t-1}| + 1e-8) (norms over the hidden dimension, in float32), 1.0 at step 0.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.utils.torch_utils import unwrap_module

from flux2lab.hooks import teacache

RECORDER_HOOK = "flux2lab_calibration_recorder"
MAG_EPS = 1e-8  # MagCache's guard against a zero norm (diffusers/hooks/mag_cache.py)


class OutputRecorder(ModelHook):
    """On the transformer: rel-L1 of the model output between consecutive calls, generated tokens only (`values`),
    and MagCache's magnitude ratio of each call (`mag_ratios`, from taps on the first and last block).

    Not stateful on purpose: diffusers resets stateful hooks at the end of every pipeline call, before the
    values could be read; call `start_image` before each image instead. The block taps are plain torch hooks:
    diffusers' hook chain on a block is only safe to undo last-first, and caches attach and detach theirs on the
    same blocks in any order.
    """

    def __init__(self) -> None:
        super().__init__()
        self._taps: list[torch.utils.hooks.RemovableHandle] = []
        self.start_image()

    def start_image(self) -> None:
        self.values: list[float | None] = []
        self.mag_ratios: list[float] = []
        self._previous: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._stack_input: torch.Tensor | None = None
        self._previous_norms: torch.Tensor | None = None

    def pre_forward(self, module, *args, **kwargs):
        if not self.values:
            self._mask = teacache.generated_token_mask(teacache.forward_argument(module, "img_ids", args, kwargs))
        return args, kwargs

    def post_forward(self, module, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        current = sample if self._mask is None else sample[:, self._mask]
        self.values.append(None if self._previous is None else teacache.relative_l1(current, self._previous))
        self._previous = current
        return output

    def tap_block_stack(self, transformer: torch.nn.Module) -> None:
        """Watch the first block's input and the last block's output (MagCache's head and tail blocks)."""
        t = unwrap_module(transformer)
        blocks = [*t.transformer_blocks, *t.single_transformer_blocks]
        first, last = blocks[0], blocks[-1]
        index = TransformerBlockRegistry.get(type(unwrap_module(last))).return_hidden_states_index

        def stack_input(module, args, kwargs):
            self._stack_input = teacache.forward_argument(module, "hidden_states", args, kwargs)

        def stack_output(module, args, output):
            self._stack_output(output[index] if isinstance(output, tuple) else output)

        self._taps = [first.register_forward_pre_hook(stack_input, with_kwargs=True),
                      last.register_forward_hook(stack_output)]

    def untap_block_stack(self) -> None:
        for handle in self._taps:
            handle.remove()
        self._taps = []

    def _stack_output(self, output: torch.Tensor) -> None:
        """The last block's hidden-states output of this step: one magnitude ratio, as MagCache calibrates it."""
        residual = output[:, -self._stack_input.shape[1]:] - self._stack_input
        norms = torch.linalg.norm(residual.float(), dim=-1)
        previous, self._previous_norms = self._previous_norms, norms
        self.mag_ratios.append(1.0 if previous is None else float((norms / (previous + MAG_EPS)).mean()))


def attach_recorder(transformer: torch.nn.Module) -> OutputRecorder:
    """The transformer's recorder, attached (with its block taps) on first use."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    hook = registry.get_hook(RECORDER_HOOK)
    if hook is None:
        hook = OutputRecorder()
        registry.register_hook(hook, RECORDER_HOOK)
        hook.tap_block_stack(transformer)
    return hook


def detach_recorder(transformer: torch.nn.Module) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    hook = registry.get_hook(RECORDER_HOOK)
    if hook is not None:
        hook.untap_block_stack()
    registry.remove_hook(RECORDER_HOOK, recurse=False)
