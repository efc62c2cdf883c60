"""The calibration recorder: a diffusers hook that measures how much the model output changes step to step.

TeaCache calibration pairs this number (y) with TeaCache's own input distance (x) for every step.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook

from flux2lab.hooks import teacache

RECORDER_HOOK = "flux2lab_calibration_recorder"


class OutputRecorder(ModelHook):
    """On the transformer: rel-L1 of the model output between consecutive calls, generated tokens only.

    Not stateful on purpose: diffusers resets stateful hooks at the end of every pipeline call, before the
    values could be read; call `start_image` before each image instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self.start_image()

    def start_image(self) -> None:
        self.values: list[float | None] = []
        self._previous: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

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


def attach_recorder(transformer: torch.nn.Module) -> OutputRecorder:
    """The transformer's recorder, attached on first use."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    hook = registry.get_hook(RECORDER_HOOK)
    if hook is None:
        hook = OutputRecorder()
        registry.register_hook(hook, RECORDER_HOOK)
    return hook


def detach_recorder(transformer: torch.nn.Module) -> None:
    HookRegistry.check_if_exists_or_initialize(transformer).remove_hook(RECORDER_HOOK, recurse=False)
