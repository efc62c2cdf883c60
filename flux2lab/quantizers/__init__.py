"""Quantize the `nn.Linear` layers of a FLUX.2 component: NVFP4, FP8 or nothing (BF16).

One verb, `quantize(model, scheme, backend, keep, include)`, configs as data: every path is a torchao
config applied with `torchao.quantize_` and a layer filter.

- **nvfp4**, `native`: torchao's `NVFP4DynamicActivationNVFP4WeightConfig` (real FP4 GEMMs, sm100+ only).
  `emulated`: the same numbers on any GPU or CPU. Weights are stored packed as a torchao `NVFP4Tensor`
  (E2M1 values, an E4M3 scale per 16 elements, an FP32 per-tensor scale: 4.5 bits a weight); activations
  go through torchao's `to_nvfp4` on every call with a per-tensor scale from their current amax. The GEMM
  then runs, in the model dtype, on the exact E2M1 x E4M3 block values, and the two FP32 per-tensor scales
  are applied to its output, as torchao does around the Blackwell kernel: the result equals the native
  one up to accumulation order.
- **fp8**, `native`: torchao's `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())` (sm89+,
  the speed path on Hopper). `emulated`: torchao's row-wise float8 round trip of weights and activations,
  then a matmul, on any device.
- **bf16**: nothing changes.
- `backend="auto"` picks `native` where the model's GPU has the kernels, else `emulated`.

Which layers (two forms, easy to confuse, so they have different names):

- `keep`: a list of plain **substrings**. A layer whose qualified name contains one of them stays in high
  precision. The default for a diffusers FLUX.2 transformer is `FLUX2_DEV_KEEP`, NVIDIA's choice for
  FLUX.2 [dev]; for a transformers text encoder it is `TEXT_ENCODER_KEEP` (see `default_keep`).
- `include`: one **regular expression**. Only layers whose qualified name it matches (`re.search`) are
  quantized. NVIDIA publishes its rule in this form: `NVIDIA_FLUX2_DEV_INCLUDE`, a negative lookahead that
  matches the layers to *quantize*. Pasting that regex where a keep-list is expected would quantize the
  opposite set, so `keep` entries that look like a regex are refused.

A layer is quantized when `include` matches it (or is None), no `keep` substring is in its name, and both
of its dimensions divide by 16 (others stay in high precision and are listed in the report).
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torchao.core.config import AOBaseConfig
from torchao.quantization import PerRow, quantize_
from torchao.utils import TorchAOBaseTensor

from flux2lab.common.errors import FeatureNotAvailable, Flux2LabError
from flux2lab.pipeline.recipe import PRECISIONS, QUANT_BACKENDS
from flux2lab.quantizers.emulated import (  # noqa: F401 (the emulated configs and their pieces are part of this API)
    BLOCK,
    E2M1_PAIRS,
    FP8EmulatedConfig,
    FP8EmulatedLinear,
    NVFP4EmulatedConfig,
    NVFP4EmulatedLinear,
    fp8_emulated_linear,
    fp8_quantize_rows,
    nvfp4_block_values,
    nvfp4_emulated_linear,
    nvfp4_per_tensor_scale,
)

# NVIDIA's layer rule for FLUX.2 [dev], verbatim: a regex that matches the layers to QUANTIZE.
NVIDIA_FLUX2_DEV_INCLUDE = r"^(?!.*(embedder|norm_out|proj_out|to_add_out|to_added_qkv|stream)).*"

# The same rule as substrings of layers to KEEP, plus diffusers' unfused names for the text-stream QKV
# (NVIDIA's model fuses them into `to_added_qkv`; they are the same layers). "stream" keeps the
# `*_stream_modulation*` layers, "embedder" the timestep, guidance, image and text embedders.
FLUX2_DEV_KEEP: tuple[str, ...] = (
    "embedder", "norm_out", "proj_out", "to_add_out", "to_added_qkv", "stream",
    "add_q_proj", "add_k_proj", "add_v_proj",
)

# The Mistral 3 text encoder (NVIDIA ran it in FP8): the language model's attention and MLP layers are
# quantized. The pipeline reads hidden states, never logits, and sends no images through the vision tower,
# so `lm_head` and the vision parts would cost accuracy risk for no speed; they stay as they are. This rule
# is ours: NVIDIA's published rule covers the transformer only.
TEXT_ENCODER_KEEP: tuple[str, ...] = ("lm_head", "vision_tower", "multi_modal_projector")

_NEEDS = {"fp8": ((8, 9), "sm89+ (Ada, Hopper or newer)"), "nvfp4": ((10, 0), "sm100+ (Blackwell)")}


@dataclass
class QuantReport:
    """What `quantize` did: which layers, with what, and what it did to memory."""

    scheme: str
    backend: str  # "native", "emulated", or "none" for bf16
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # layer name -> why it stayed in high precision
    bytes_before: int = 0
    bytes_after: int = 0
    keep: tuple[str, ...] = ()
    include: str | None = None

    def summary(self) -> str:
        total = len(self.quantized) + len(self.kept)
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 1.0
        lines = [
            (f"{self.scheme} ({self.backend}): quantized {len(self.quantized)} of {total} linear layers, "
             f"kept {len(self.kept)} in high precision"),
            f"  parameters+buffers: {_human(self.bytes_before)} -> {_human(self.bytes_after)} ({ratio:.1%})",
        ]
        for reason in sorted(set(self.kept.values())):
            names = [n for n, r in self.kept.items() if r == reason]
            lines.append(f"  kept ({reason}): " + ", ".join(_collapse(names)))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "scheme": self.scheme, "backend": self.backend, "quantized": self.quantized, "kept": self.kept,
            "bytes_before": self.bytes_before, "bytes_after": self.bytes_after, "keep": list(self.keep),
            "include": self.include,
        }


def _human(n: int) -> str:
    unit = next(u for u in (3, 2, 1, 0) if n >= 1024**u or u == 0)
    return f"{n / 1024**unit:.2f} {('B', 'KiB', 'MiB', 'GiB')[unit]}"


def _collapse(names: Iterable[str]) -> list[str]:
    """`transformer_blocks.3.attn.add_q_proj` x 8 -> `transformer_blocks.*.attn.add_q_proj (x8)`."""
    counts = Counter(re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", n) or "(the module itself)" for n in names)
    return [f"{k} (x{c})" if c > 1 else k for k, c in counts.items()]


def default_keep(model: nn.Module) -> tuple[str, ...]:
    """The keep-list `quantize` uses when none is given: text-encoder rule for transformers models
    (the Mistral text encoder), NVIDIA's FLUX.2 [dev] rule for everything else."""
    return TEXT_ENCODER_KEEP if type(model).__module__.startswith("transformers.") else FLUX2_DEV_KEEP


def _check_rule(keep: Sequence[str], include: str | None) -> re.Pattern | None:
    if isinstance(keep, str) or not all(isinstance(k, str) for k in keep):
        raise Flux2LabError(
            f"keep must be a list of name substrings, got {keep!r}. Wrap a single substring in a list "
            "(keep=['proj_out']); to select the layers to quantize with a regular expression, use include=."
        )
    for k in keep:
        if re.search(r"[\^$()\[\]*+?|\\{}]", k):
            raise Flux2LabError(
                f"keep entry {k!r} looks like a regular expression, but keep entries are plain substrings of "
                "layer names to leave in high precision. A regex such as NVIDIA's '^(?!.*(...)).*' matches "
                "the layers to QUANTIZE: pass it as include=... instead."
            )
    if include is None:
        return None
    try:
        return re.compile(include)
    except re.error as e:
        raise Flux2LabError(f"include={include!r} is not a valid regular expression: {e}.") from None


def select_layers(
    model: nn.Module, keep: Sequence[str] | None = None, include: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """Split the model's `nn.Linear` layers into (to quantize, kept -> reason). Works on the meta device."""
    keep = default_keep(model) if keep is None else keep
    pattern = _check_rule(keep, include)
    quantized, kept = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        hit = next((k for k in keep if k in name), None)
        if pattern is not None and not pattern.search(name):
            kept[name] = "not matched by include"
        elif hit is not None:
            kept[name] = f"keep pattern '{hit}'"
        elif module.in_features % BLOCK or module.out_features % BLOCK:
            kept[name] = f"shape not divisible by {BLOCK}"
        else:
            quantized.append(name)
    return quantized, kept


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a torchao quantized tensor counts its packed data and scales."""
    if is_traceable_wrapper_subclass(t):
        return sum(tensor_bytes(getattr(t, n)) for n in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def module_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (each shared tensor once). torchao's get_model_size_in_bytes
    skips the root module's own tensors, which is all a bare nn.Linear has."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(tensor_bytes(t) for t in tensors.values())


def resolve_backend(scheme: str, backend: str, device: torch.device | None, dtype: torch.dtype | None) -> str:
    """`native` or `emulated` for `scheme` on weights of this device and dtype ("none" for bf16).

    Raises `FeatureNotAvailable` for `native` where the kernels are missing: callers can check up front."""
    if scheme == "bf16":
        return "none"
    need, what = _NEEDS[scheme]
    on_gpu = device is not None and device.type == "cuda" and torch.version.cuda is not None
    capable = on_gpu and torch.cuda.get_device_capability(device) >= need
    if backend == "native":
        if not capable:
            if on_gpu:
                major, minor = torch.cuda.get_device_capability(device)
                here = f"{torch.cuda.get_device_name(device)} is sm{major}{minor}"
            else:
                here = f"the layers to quantize are on {device or 'several devices'}"
            raise FeatureNotAvailable(
                f"{scheme} backend 'native' needs a CUDA GPU of {what} with the model on it; here {here}. "
                "Use quant_backend 'emulated' (the same numbers, without the speed-up) or 'auto'."
            )
        if dtype != torch.bfloat16:
            raise Flux2LabError(
                f"{scheme} backend 'native' quantizes BF16 weights; the layers to quantize are "
                f"{dtype or 'of mixed dtypes'}. Load the model in bf16."
            )
        return "native"
    if backend == "auto":
        return "native" if capable and dtype == torch.bfloat16 else "emulated"
    return backend


def quantize(
    model: nn.Module,
    scheme: str,
    backend: str = "auto",
    keep: Sequence[str] | None = None,
    include: str | None = None,
) -> QuantReport:
    """Quantize `model`'s selected linear layers in place (see the module docstring) and report."""
    if scheme not in PRECISIONS:
        raise Flux2LabError(f"unknown precision {scheme!r}; choose one of {', '.join(PRECISIONS)}.")
    if backend not in QUANT_BACKENDS:
        raise Flux2LabError(f"unknown quant backend {backend!r}; choose one of {', '.join(QUANT_BACKENDS)}.")
    keep = default_keep(model) if keep is None else keep
    names, kept = select_layers(model, keep, include)
    keep = tuple(keep)
    before = module_bytes(model)
    report = QuantReport(scheme, "none", [], {}, before, before, keep, include)
    if scheme == "bf16":
        return report
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if isinstance(m, nn.Linear) and isinstance(m.weight, TorchAOBaseTensor):
            raise Flux2LabError(
                f"layer {name or type(m).__name__} is already quantized ({type(m.weight).__name__}); "
                "quantize a freshly loaded model."
            )
    report.kept = kept
    if not names:
        return report
    devices = {modules[n].weight.device for n in names}
    dtypes = {modules[n].weight.dtype for n in names}
    device = devices.pop() if len(devices) == 1 else None
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    report.backend = resolve_backend(scheme, backend, device, dtype)
    if report.backend == "emulated" and dtype not in (torch.bfloat16, torch.float32):
        raise Flux2LabError(
            f"emulated {scheme} quantizes bf16 or float32 weights; the layers to quantize are "
            f"{dtype or 'of mixed dtypes'}. Load the model in bf16 or float32."
        )
    selected = set(names)
    with torch.no_grad():
        quantize_(model, _config(scheme, report.backend), filter_fn=lambda m, fqn: fqn in selected)
    report.quantized = names
    report.bytes_after = module_bytes(model)
    return report


def _config(scheme: str, backend: str) -> AOBaseConfig:
    if backend == "emulated":
        return NVFP4EmulatedConfig() if scheme == "nvfp4" else FP8EmulatedConfig()
    if scheme == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    from torchao.prototype.mx_formats.inference_workflow import NVFP4DynamicActivationNVFP4WeightConfig

    # torchao's fused activation-quantization kernel needs the MSLK package; without it, its PyTorch path.
    has_mslk = importlib.util.find_spec("mslk") is not None
    return NVFP4DynamicActivationNVFP4WeightConfig(use_triton_kernel=has_mslk)
