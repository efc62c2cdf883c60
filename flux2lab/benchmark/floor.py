"""The arithmetic floor of one denoising step on this card: what a step cannot go below.

One step's work is read off the transformer itself: its forward runs on the meta device with every `F.linear`
and `F.scaled_dot_product_attention` call recorded (so the count follows the model's code, not a hand-written
formula). Those GEMM shapes are then timed on the card in the model dtype and in FP8 (`torch._scaled_mm`,
row-wise scales), and attention with SDPA at the step's sequence length; the floor of a step is the sum.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from flux2lab.benchmark.timing import DeviceClock, median_time
from flux2lab.pipeline.models import build_transformer_on_meta


@dataclass(frozen=True)
class Gemm:
    m: int
    k: int
    n: int
    count: int
    fp8: bool = True  # quantized by the precision rung (flux2lab.quantizers's layer rule); else stays in BF16

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n * self.count


@dataclass(frozen=True)
class Attention:
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    count: int

    @property
    def flops(self) -> int:
        return 4 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim * self.count


@dataclass
class Workload:
    """The GEMMs and attentions of one transformer forward (one denoising step)."""

    image_tokens: int
    text_tokens: int
    gemms: list[Gemm] = field(default_factory=list)
    attentions: list[Attention] = field(default_factory=list)

    @property
    def gemm_flops(self) -> int:
        return sum(g.flops for g in self.gemms)

    @property
    def attention_flops(self) -> int:
        return sum(a.flops for a in self.attentions)


class _CallRecorder(TorchFunctionMode):
    """Counts every GEMM (by shape, and by whether its layer gets quantized) and attention call."""

    def __init__(self, quantized_weights: set[int]):
        super().__init__()
        self.quantized = quantized_weights
        self.linear: Counter = Counter()
        self.sdpa: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            self.linear[(x.numel() // x.shape[-1], w.shape[1], w.shape[0], id(w) in self.quantized)] += 1
        elif func is F.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            self.sdpa[(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3])] += 1
        return func(*args, **kwargs)


def step_workload(transformer_config: dict[str, Any], n_image: int, n_text: int) -> Workload:
    """Run the transformer's forward on the meta device and record every GEMM and attention it makes, and
    which GEMMs the low-precision rung quantizes (the layer rule of flux2lab.quantizers, NVIDIA's for FLUX.2 [dev])."""
    from flux2lab.quantizers import select_layers

    config = {k: v for k, v in transformer_config.items() if not k.startswith("_")}
    model = build_transformer_on_meta(**config)
    quantized = {id(model.get_submodule(name).weight) for name in select_layers(model)[0]}
    axes = len(model.config.axes_dims_rope)
    with torch.device("meta"):
        inputs = {
            "hidden_states": torch.empty(1, n_image, model.config.in_channels),
            "encoder_hidden_states": torch.empty(1, n_text, model.config.joint_attention_dim),
            "timestep": torch.empty(1), "guidance": torch.empty(1) if model.config.guidance_embeds else None,
            "img_ids": torch.empty(1, n_image, axes), "txt_ids": torch.empty(1, n_text, axes),
        }
    recorder = _CallRecorder(quantized)
    with torch.no_grad(), recorder:
        model(**inputs, return_dict=False)
    return Workload(
        n_image, n_text,
        [Gemm(m, k, n, c, q) for (m, k, n, q), c in sorted(recorder.linear.items())],
        [Attention(*shape, c) for shape, c in sorted(recorder.sdpa.items())],
    )


def _fp8_gemm_time(clock: DeviceClock, a: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> float | str:
    """Median time of `a @ w.T` as an FP8 E4M3 GEMM with row-wise scales (torchao's FP8 path), or why not."""
    sa = torch.ones(a.shape[0], 1, device=a.device, dtype=torch.float32)
    sb = torch.ones(1, w.shape[0], device=a.device, dtype=torch.float32)
    a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    try:
        return median_time(clock, torch._scaled_mm, a8, w8.t(), scale_a=sa, scale_b=sb, out_dtype=dtype)
    except (RuntimeError, NotImplementedError) as e:
        return str(e).splitlines()[0]


def measure_floor(work: Workload, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Time the step's GEMMs (model dtype, and FP8 row-wise for the layers the precision rung quantizes) and its
    attentions on this card; the floor of a step is their sum."""
    clock = DeviceClock(device)
    pieces, fp8_failed = [], []
    for g in work.gemms:
        a = torch.randn(g.m, g.k, device=device, dtype=dtype)
        w = torch.randn(g.n, g.k, device=device, dtype=dtype)
        high = median_time(clock, F.linear, a, w)
        fp8 = _fp8_gemm_time(clock, a, w, dtype) if g.fp8 else high
        if isinstance(fp8, str):  # no FP8 GEMM for this shape/device: counted at the model dtype
            fp8_failed.append(f"{g.m}x{g.k}x{g.n}: {fp8}")
            fp8 = high
        pieces.append({"kind": "gemm", "m": g.m, "k": g.k, "n": g.n, "count": g.count, "tflop": g.flops / 1e12,
                       "quantized": g.fp8, "high_s": high * g.count, "fp8_s": fp8 * g.count})
        del a, w
    for at in work.attentions:
        q = torch.randn(at.batch, at.heads, at.q_len, at.head_dim, device=device, dtype=dtype)
        kv = torch.randn(at.batch, at.heads, at.kv_len, at.head_dim, device=device, dtype=dtype)
        t = median_time(clock, F.scaled_dot_product_attention, q, kv, kv)
        pieces.append({"kind": "attention", "batch": at.batch, "heads": at.heads, "q_len": at.q_len,
                       "kv_len": at.kv_len, "head_dim": at.head_dim, "count": at.count, "tflop": at.flops / 1e12,
                       "high_s": t * at.count, "fp8_s": t * at.count})
        del q, kv
    if device.type == "cuda":
        torch.cuda.empty_cache()

    def total(key: str, kind: str) -> float:
        return sum(p[key] for p in pieces if p["kind"] == kind)

    gemm_high, gemm_fp8, attn = total("high_s", "gemm"), total("fp8_s", "gemm"), total("high_s", "attention")
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "image_tokens": work.image_tokens, "text_tokens": work.text_tokens,
        "tflop_per_step": (work.gemm_flops + work.attention_flops) / 1e12,
        "gemm_tflop": work.gemm_flops / 1e12, "attention_tflop": work.attention_flops / 1e12,
        "bf16": {"gemm_s": gemm_high, "attention_s": attn, "step_s": gemm_high + attn,
                 "gemm_tflops": work.gemm_flops / 1e12 / gemm_high if gemm_high else None},
        "fp8": {"gemm_s": gemm_fp8, "attention_s": attn, "step_s": gemm_fp8 + attn,
                "gemm_tflops": work.gemm_flops / 1e12 / gemm_fp8 if gemm_fp8 else None,
                "kept_high_tflop": sum(g.flops for g in work.gemms if not g.fp8) / 1e12,
                "gemms_not_in_fp8": fp8_failed},
        "attention_tflops": work.attention_flops / 1e12 / attn if attn else None,
        "pieces": pieces,
        "note": "arithmetic only: GEMMs + attention at this card's measured rates; norms, activations, "
                "quantisation of activations and launch gaps are what a rung spends above it",
    }
