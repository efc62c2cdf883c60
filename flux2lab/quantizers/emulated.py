"""NVFP4 and FP8 emulated on any GPU or CPU: the numbers the native kernels give, without their speed.

Weights are stored as torchao tensors (`NVFP4Tensor`, row-wise `Float8Tensor`); activations go through the same
round trip on every call; the GEMM runs in the model dtype on the exact quantized values. Each is a torchao config
(`NVFP4EmulatedConfig`, `FP8EmulatedConfig`) applied by `torchao.quantize_` like the native ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
from torchao.quantization import PerRow
from torchao.quantization.quantize_.common import KernelPreference
from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor
from torchao.quantization.transform_module import register_quantize_module_handler

BLOCK = 16  # NVFP4 block length; FP8 and FP4 GEMMs also need both matrix dimensions to divide by 16

# An amax floor for the emulated paths, so an all-zero tensor or row quantizes to zeros instead of the
# NaN that 0/0 would give; it changes nothing else (any real amax is far above it).
_AMAX_FLOOR = 1e-12


# --- NVFP4 emulation ------------------------------------------------------------------------------------

# Byte -> the two E2M1 values it packs (low nibble first, torchao's order), decoded by torchao itself.
# Decoding through this table is one gather instead of the dozen full-size integer passes of
# NVFP4Tensor.dequantize, which matters when every weight is decoded on every call; it is bit-identical
# (a test checks it against torchao's dequantize). Each emulated layer holds it as a buffer so it moves
# with the model: fetching a CPU constant per call would stall the GPU on a host-to-device copy.
_CODES = torch.arange(256, dtype=torch.uint8)
E2M1_PAIRS = torch.stack([f4_unpacked_to_f32(_CODES & 15), f4_unpacked_to_f32(_CODES >> 4)], dim=-1)


def nvfp4_per_tensor_scale(t: torch.Tensor) -> torch.Tensor:
    """torchao's dynamic per-tensor scale (amax / (448 * 6)), from the tensor's current amax."""
    return per_tensor_amax_to_scale(t.abs().amax().float().clamp(min=_AMAX_FLOOR))


def nvfp4_block_values(t: NVFP4Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """E2M1 value x E4M3 block scale of each element (no per-tensor scale), in `pairs`' dtype. The products
    have at most 6 significant bits, so they are exact in bf16 and fp32: no rounding happens here."""
    rows = t.qdata.shape[0]
    values = pairs[t.qdata.int()].view(rows, -1, BLOCK) * t.scale.to(pairs.dtype).view(rows, -1, 1)
    return values.view(rows, -1)


def nvfp4_emulated_linear(x: torch.Tensor, weight: NVFP4Tensor, bias: torch.Tensor | None,
                          pairs: torch.Tensor = E2M1_PAIRS) -> torch.Tensor:
    """What a Blackwell GPU computes for `F.linear(x, W)` with NVFP4 activations and weights.

    `pairs` is `E2M1_PAIRS` on x's device (the layer's buffer)."""
    pairs = pairs.to(x.dtype)
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    x_scale = nvfp4_per_tensor_scale(x2d)
    xq = NVFP4Tensor.to_nvfp4(x2d, per_tensor_scale=x_scale)
    y = F.linear(nvfp4_block_values(xq, pairs), nvfp4_block_values(weight, pairs))
    # As torchao does after its scaled GEMM: both per-tensor scales on the output, then the bias.
    y = y * (x_scale * weight.per_tensor_scale).to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], -1)


class NVFP4EmulatedLinear(nn.Linear):
    """An `nn.Linear` whose weight is a packed torchao `NVFP4Tensor` and whose forward emulates NVFP4.

    Made in place from an `nn.Linear` by `quantize` (the module keeps its identity, name and hooks).
    """

    e2m1_pairs: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nvfp4_emulated_linear(x, self.weight, self.bias, self.e2m1_pairs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nvfp4=emulated"


@dataclass
class NVFP4EmulatedConfig(AOBaseConfig):
    """torchao config: emulated NVFP4 weights and dynamic activations (`NVFP4EmulatedLinear`)."""


@register_quantize_module_handler(NVFP4EmulatedConfig)
def _nvfp4_emulated_transform(module: nn.Linear, config: NVFP4EmulatedConfig) -> nn.Linear:
    w = module.weight.detach().contiguous()
    packed = NVFP4Tensor.to_nvfp4(w, per_tensor_scale=nvfp4_per_tensor_scale(w))
    module.weight = nn.Parameter(packed, requires_grad=False)
    # In the layer's dtype (the values are exact in bf16), so the per-call `.to(x.dtype)` is a no-op.
    module.register_buffer("e2m1_pairs", E2M1_PAIRS.to(w.device, w.dtype), persistent=False)
    module.__class__ = NVFP4EmulatedLinear  # in place, so a bare nn.Linear passed to quantize() works too
    return module


# --- FP8 emulation --------------------------------------------------------------------------------------


def fp8_quantize_rows(t: torch.Tensor) -> Float8Tensor:
    """torchao's row-wise float8 (e4m3) quantization, on any device."""
    return Float8Tensor.from_hp(t, granularity=PerRow(), kernel_preference=KernelPreference.TORCH,
                                hp_value_lb=_AMAX_FLOOR)


def fp8_emulated_linear(x: torch.Tensor, weight: Float8Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` with row-wise FP8 activations and weights, as torchao's scaled GEMM computes it: a matmul
    of the (exactly representable) e4m3 values, then the row scales of both operands on the output."""
    x2d = x.reshape(-1, x.shape[-1])
    xq = fp8_quantize_rows(x2d)
    y = F.linear(xq.qdata.to(x.dtype), weight.qdata.to(x.dtype))
    y = (y.float() * xq.scale * weight.scale.view(1, -1)).to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], -1)


class FP8EmulatedLinear(nn.Linear):
    """An `nn.Linear` whose weight is a torchao `Float8Tensor` (row-wise) and whose forward emulates
    torchao's FP8 GEMM on hardware without one (CPU, pre-Ada GPUs). Made in place by `quantize`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_emulated_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=emulated"


@dataclass
class FP8EmulatedConfig(AOBaseConfig):
    """torchao config: emulated row-wise FP8 weights and dynamic activations (`FP8EmulatedLinear`)."""


@register_quantize_module_handler(FP8EmulatedConfig)
def _fp8_emulated_transform(module: nn.Linear, config: FP8EmulatedConfig) -> nn.Linear:
    module.weight = nn.Parameter(fp8_quantize_rows(module.weight.detach()), requires_grad=False)
    module.__class__ = FP8EmulatedLinear
    return module
