"""The layered speed benchmark: NVIDIA's Figure 4 ladder, timed on the user's card, next to that card's floor.

Why it is built this way:

- **Each rung is a Recipe.** The ladder adds one acceleration at a time on top of the rung below (eager BF16,
  torch.compile, CUDA graphs, FP8 or NVFP4, TeaCache, several GPUs). A rung that cannot run here (no CUDA, no
  FP8 kernels, one GPU, a feature this build lacks) is reported as skipped with the reason, and its change is
  left out of the rungs above it, so the ladder still says what the features that do run are worth.
- **One card, one run.** Rungs run one after the other in one process; each one that changes the model gets a
  freshly loaded pipeline (the previous one is freed first: two full-size transformers do not fit one card),
  and consecutive rungs that differ only in TeaCache share one.
- **Timing.** The end of every denoising step is marked with a CUDA event (host clock on CPU) from the
  scheduler's `step`, the one call every step makes however hooks, graphs or compilation rewrote the
  transformer; nothing synchronises inside the loop. Time per step = the interval between consecutive marks
  (the first step, which also carries the prompt and latent set-up, is left out). Time per image = the whole
  pipeline call. Warm-up images (compilation, graph capture) are not timed. With `timed_steps` below `steps`,
  a timed image runs that many steps and the image time is extrapolated as measured wall + remaining steps x
  median step; the output says so.
- **The floor.** One step's work is read off the transformer itself: its forward runs on the meta device with
  every `F.linear` and `F.scaled_dot_product_attention` call recorded (so the count follows the model's
  code, not a hand-written formula). Those GEMM shapes are then timed on the card in the model dtype and in
  FP8 (`torch._scaled_mm`, row-wise scales), and attention with SDPA at the step's sequence length; the floor
  of a step is the sum. Each rung's distance from it says how much is left to gain, and where.
- **TeaCache on random weights** makes meaningless skip decisions, so there the rung replays a skip schedule
  (NVIDIA's measured average of 16 skipped steps in 50 by default, or the decisions a fitted polynomial makes
  on a recorded distance trace); on real weights TeaCache decides for itself. The output says which.

Several GPUs: the `xN-gpus` rung runs this same benchmark under `torchrun` on one recipe (Ulysses sequence
parallelism of degree N) when N GPUs are visible, and otherwise prints the command that would.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from flux2lab import __version__, dist_version, parallel
from flux2lab.common.errors import FeatureNotAvailable, Flux2LabError
from flux2lab.pipeline.core import applied_recipe, apply, generate, resolution
from flux2lab.pipeline.models import (
    build_transformer_on_meta,
    default_device,
    default_dtype,
    dtype_of,
    free_memory,
    image_tokens,
    load_pipeline,
    model_info,
)
from flux2lab.pipeline.recipe import FLUX2_DEV_RET_STEPS, Recipe

PROMPT = "a red fox standing in fresh snow at golden hour, detailed fur, soft light"
NVIDIA_SKIPS = (16, 50)  # NVIDIA's measured TeaCache average for FLUX.2 [dev]: 16 of 50 steps skipped
GIB = 2**30
RANDOM_WEIGHTS = ("tiny", "full-random")  # models whose TeaCache decisions mean nothing (see flux2lab.pipeline.models)


# --- the ladder ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rung:
    """One step of the ladder: the recipe fields it adds on top of the rung below."""

    name: str
    changes: dict[str, Any]
    adds: str

    @property
    def gpus(self) -> int:
        return self.changes.get("ulysses_degree", 1)


def default_precision(device: torch.device) -> str:
    """The low-precision rung NVIDIA's figure uses where it exists (NVFP4, Blackwell), else FP8 (Hopper/Ada)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (10, 0):
        return "nvfp4"
    return "fp8"


def default_ladder(precision: str, gpus: tuple[int, ...], steps: int) -> list[Rung]:
    """NVIDIA's Figure 4 order; each multi-GPU rung runs the whole single-GPU stack on N GPUs."""
    return [
        Rung("eager-bf16", {}, "the model dtype (BF16 on a GPU), no torch.compile"),
        Rung("compile", {"compile": True}, "regional torch.compile of the repeated blocks"),
        Rung("+cuda-graphs", {"cuda_graphs": True}, "every block replayed as a CUDA graph"),
        Rung(f"+{precision}", {"transformer_precision": precision, "quant_backend": "native"},
             f"{precision.upper()} linear layers (native kernels only: an emulation is not a speed path)"),
        Rung("+teacache", {"teacache": {"enabled": True, "ret_steps": scaled_ret_steps(steps)}},
             "TeaCache skips steps whose output barely changes"),
        *[Rung(f"x{n}-gpus", {"ulysses_degree": n}, f"Ulysses sequence parallelism over {n} GPUs") for n in gpus],
    ]


def select_rungs(ladder: list[Rung], spec: str) -> set[str]:
    """The names of the rungs to time: `default` (every rung) or a comma-separated list of rung names."""
    if spec == "default":
        return {r.name for r in ladder}
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in {r.name for r in ladder}]
    if unknown or not names:
        raise Flux2LabError(
            f"--ladder {spec!r}: unknown rung(s) {', '.join(unknown) or '(none given)'}; give 'default' or a "
            f"comma-separated list of: {', '.join(r.name for r in ladder)}."
        )
    return set(names)


# --- TeaCache skip schedules on random weights ---------------------------------------------------------------

@dataclass(frozen=True)
class SkipPlan:
    """How the TeaCache rung decides which steps to skip, and how the output describes it."""

    skip_steps: tuple[int, ...] | None  # replayed through TeaCache's replay_skips; None: its own decisions
    describe: str


def scaled_ret_steps(steps: int) -> int:
    """NVIDIA's 10 always-computed first steps of 50, as the same fraction of a shorter or longer schedule."""
    return min(steps - 1, round(FLUX2_DEV_RET_STEPS * steps / 50))


def spread_skips(steps: int, n_skip: int, ret_steps: int) -> tuple[int, ...]:
    """`n_skip` step indices spread evenly over the steps TeaCache may skip: after the first `ret_steps`
    (and step 0, which has nothing cached), and before the last step (it makes the image)."""
    eligible = list(range(max(ret_steps, 1), steps - 1))
    if n_skip > len(eligible):
        raise Flux2LabError(
            f"--teacache-schedule asks for {n_skip} skipped steps, but with {steps} steps and ret_steps {ret_steps} "
            f"only {len(eligible)} can be skipped (steps {max(ret_steps, 1)}..{steps - 2})."
        )
    return tuple(eligible[int((i + 0.5) * len(eligible) / n_skip)] for i in range(n_skip))


def traced_skips(fit_path: Path, trace_path: Path, steps: int, recipe: Recipe) -> SkipPlan:
    """The skips TeaCache's rule makes on recorded distances (a calibration run's samples.csv) with the
    coefficients of its fit.json, for the prompt whose skip count is the median of the trace."""
    from flux2lab.calibration import read_rows
    from flux2lab.hooks.teacache import TeaCacheConfig, plan_skips
    from flux2lab.pipeline.presets import coefficients_from_fit

    coefficients = coefficients_from_fit(fit_path)
    if not trace_path.is_file():
        raise Flux2LabError(f"--teacache-schedule: {trace_path} does not exist.")
    traces: dict[tuple[str, str], dict[int, float]] = {}
    for row in read_rows(trace_path):
        traces.setdefault((row["prompt_id"], row["seed"]), {})[int(row["step"])] = float(row["x"])
    config = TeaCacheConfig.from_recipe(recipe.replace(teacache={"coefficients": coefficients}))
    plans = []
    for (prompt, _seed), by_step in sorted(traces.items()):
        if sorted(by_step) != list(range(1, steps)):
            raise Flux2LabError(
                f"--teacache-schedule: {trace_path} holds steps {min(by_step)}..{max(by_step)} for prompt "
                f"'{prompt}'; a {steps}-step benchmark needs a trace of steps 1..{steps - 1} (record it with "
                f"{steps} steps, or run the benchmark with the trace's step count)."
            )
        computed = plan_skips(config, [None] + [by_step[t] for t in range(1, steps)])
        plans.append((tuple(t for t, c in enumerate(computed) if not c), prompt))
    if not plans:
        raise Flux2LabError(f"--teacache-schedule: {trace_path} holds no samples.")
    plans.sort(key=lambda p: len(p[0]))
    skips, prompt = plans[len(plans) // 2]
    counts = [len(p[0]) for p in plans]
    return SkipPlan(skips, (
        f"replayed schedule: {len(skips)}/{steps} from {fit_path} + {trace_path} (threshold "
        f"{recipe.teacache.threshold}; prompt '{prompt}', the median of {len(plans)}: {min(counts)}-{max(counts)} "
        "skipped)"))


def skip_plan(spec: str, real_weights: bool, recipe: Recipe) -> SkipPlan:
    """`auto` (real decisions on real weights, NVIDIA's 16/50 replayed on random ones), `real`, a replayed
    count `K/N` (K of every N steps) or `K` (K steps), or `FIT.json:SAMPLES.csv` (a calibration's decisions)."""
    steps, ret_steps = recipe.steps, recipe.teacache.ret_steps
    if spec == "real" or (spec == "auto" and real_weights):
        return SkipPlan(None, "real TeaCache decisions")
    if spec.count(":") == 1:
        fit, trace = spec.split(":")
        return traced_skips(Path(fit), Path(trace), steps, recipe)
    if spec == "auto":
        k, n = NVIDIA_SKIPS
        note = " (NVIDIA average)" if steps == n else f" (NVIDIA average {k}/{n}, scaled)"
    else:
        try:
            k, n = (int(x) for x in spec.split("/")) if "/" in spec else (int(spec), steps)
        except ValueError:
            raise Flux2LabError(
                f"--teacache-schedule {spec!r}: give auto, real, K/N (K of every N steps skipped, e.g. 16/50), "
                "K (skipped steps) or FIT.json:SAMPLES.csv (a calibration run's fit and distance trace)."
            ) from None
        if n < 1 or not 0 <= k <= n:
            raise Flux2LabError(f"--teacache-schedule {spec!r}: need 0 <= K <= N and N >= 1.")
        note = ""
    count = round(k * steps / n)
    return SkipPlan(spread_skips(steps, count, ret_steps), f"replayed schedule: {count}/{steps}{note}")


def replay(pipe: Any, recipe: Recipe, plan: SkipPlan | None) -> None:
    """Make the TeaCache that `apply` attached skip exactly the plan's steps (the hooks stay, only the config
    is swapped, so nothing recompiles)."""
    if plan is None or plan.skip_steps is None or not recipe.teacache.enabled:
        return
    from flux2lab.hooks.teacache import TeaCacheConfig, apply_teacache

    apply_teacache(pipe.transformer, TeaCacheConfig.from_recipe(recipe, replay_skips=plan.skip_steps))


# --- timing --------------------------------------------------------------------------------------------------

class DeviceClock:
    """Marks on the device's timeline: CUDA events on a GPU (no synchronisation), the host clock on CPU.

    torch.utils.benchmark times whole statements with a host clock around synchronisations; marks inside a
    running pipeline need events, so this small wrapper serves both the step marks and the floor's kernels.
    """

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def seconds(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


class _StepMarks:
    """Marks the end of every denoising step by wrapping the pipeline's `scheduler.step` (instance attribute,
    removed on exit)."""

    def __init__(self, pipe: Any, clock: DeviceClock):
        self.pipe, self.clock, self.marks = pipe, clock, []

    def __enter__(self) -> _StepMarks:
        step = self.pipe.scheduler.step

        def marked(*args, **kwargs):
            out = step(*args, **kwargs)
            self.marks.append(self.clock.mark())
            return out

        self.pipe.scheduler.step = marked
        return self

    def __exit__(self, *exc) -> None:
        del self.pipe.scheduler.step

    def intervals(self) -> list[float]:
        """Seconds of steps 1..n-1 (interval i ends at step i's mark)."""
        self.clock.sync()
        return [self.clock.seconds(a, b) for a, b in zip(self.marks, self.marks[1:])]


def _median_time(clock: DeviceClock, fn: Callable[..., Any], *args: Any, warmup: int = 3, iters: int = 10,
                 **kwargs: Any) -> float:
    for _ in range(warmup):
        fn(*args, **kwargs)
    clock.sync()
    spans = []
    for _ in range(iters):
        a = clock.mark()
        fn(*args, **kwargs)
        spans.append((a, clock.mark()))
    clock.sync()
    return statistics.median(clock.seconds(a, b) for a, b in spans)


def spread(values: list[float]) -> dict[str, Any] | None:
    """Median and spread (quartiles, range) of a sample."""
    if not values:
        return None
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "p25": q[0], "p75": q[2], "min": min(values),
            "max": max(values), "n": len(values)}


# --- the floor -----------------------------------------------------------------------------------------------

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


class _Recorder(TorchFunctionMode):
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
    recorder = _Recorder(quantized)
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
        return _median_time(clock, torch._scaled_mm, a8, w8.t(), scale_a=sa, scale_b=sb, out_dtype=dtype)
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
        high = _median_time(clock, F.linear, a, w)
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
        t = _median_time(clock, F.scaled_dot_product_attention, q, kv, kv)
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


# --- the whole pipeline at full size ------------------------------------------------------------------------

# Mistral Small 3.1 (24B), FLUX.2 [dev]'s text encoder, as configured on the hub. Its vision tower (0.4B) is
# built too, though text-to-image never runs it.
MISTRAL_SMALL_3_1 = {
    "text_config": {
        "model_type": "mistral", "hidden_size": 5120, "intermediate_size": 32768, "num_hidden_layers": 40,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 131072,
        "max_position_embeddings": 131072, "rope_theta": 1e9, "rms_norm_eps": 1e-5, "sliding_window": None,
    },
    "vision_config": {
        "model_type": "pixtral", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
        "intermediate_size": 4096, "image_size": 1540, "patch_size": 14, "head_dim": 64,
    },
    "spatial_merge_size": 2, "multimodal_projector_bias": False, "projector_hidden_act": "gelu",
    "vision_feature_layer": -1,
}
WHOLE_PIPELINE_PARAMS = 32.3e9 + 23.6e9 + 0.1e9  # transformer + text encoder + VAE


def full_size_text_encoder_and_vae() -> tuple[torch.nn.Module, torch.nn.Module]:
    """FLUX.2 [dev]'s text encoder and VAE at full size, on the meta device (no memory)."""
    from diffusers import AutoencoderKLFlux2
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from flux2lab.pipeline import tokenizer as tok

    config = Mistral3Config(**MISTRAL_SMALL_3_1, image_token_index=tok.IMAGE_TOKEN_ID, bos_token_id=tok.BOS_ID,
                            eos_token_id=tok.EOS_ID, pad_token_id=tok.PAD_ID)
    with torch.device("meta"):
        return Mistral3ForConditionalGeneration(config), AutoencoderKLFlux2()  # diffusers' default: FLUX.2's VAE


def build_whole_random(device: str | None, dtype: torch.dtype | None, seed: int = 0) -> Any:
    """`full-random` plus the full-size text encoder and VAE with random weights, and flux2lab's offline
    tokenizer: the whole FLUX.2 [dev] pipeline (prompt encoding, 50 steps, VAE decode), timed as NVIDIA did.
    About 105 GiB in BF16, so an H200 (or larger), not an 80 GB H100."""
    from diffusers import Flux2Pipeline

    from flux2lab.pipeline import tokenizer as tok
    from flux2lab.pipeline.models import materialize_random

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    if torch.device(device).type != "cuda":
        raise Flux2LabError("--whole-pipeline builds the full-size FLUX.2 [dev] pipeline: it needs a CUDA GPU.")
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    need = WHOLE_PIPELINE_PARAMS * torch.finfo(dtype).bits / 8
    if free < need:
        raise Flux2LabError(
            f"--whole-pipeline needs about {need / GIB:.0f} GiB of GPU memory in {dtype} (transformer, 24B text "
            f"encoder, VAE); {device} has {free / GIB:.0f} GiB free. Use an H200, or leave --whole-pipeline out to "
            "time the transformer alone."
        )
    transformer_only = load_pipeline("full-random", device=device, dtype=dtype)
    text_encoder, vae = full_size_text_encoder_and_vae()
    pipe = Flux2Pipeline(
        scheduler=transformer_only.scheduler, vae=materialize_random(vae, device, dtype, seed + 1),
        text_encoder=materialize_random(text_encoder, device, dtype, seed + 2), tokenizer=tok.build_processor(),
        transformer=transformer_only.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.flux2lab_model = dataclasses.replace(model_info(transformer_only), source="full-random (whole pipeline)",
                                              synthetic_text=False)
    return pipe


# --- one run of the ladder ------------------------------------------------------------------------------------

@dataclass
class BenchConfig:
    """What `python -m flux2lab.bench` was asked to do (also rebuilds the command for a torchrun child)."""

    model: str = "tiny"
    device: str | None = None
    dtype: str | None = None
    ladder: str = "default"
    recipe: Path | None = None
    precision: str | None = None
    gpus: tuple[int, ...] | None = None  # multi-GPU rungs; None: all visible GPUs (at least 2)
    steps: int | None = None  # None: 50 for the ladder, the recipe's own with `recipe`
    height: int | None = None
    width: int | None = None
    reps: int = 3
    warmup: int = 1
    warmup_steps: int = 3
    timed_steps: int | None = None
    teacache_schedule: str = "auto"
    floor: bool = True
    whole_pipeline: bool = False  # full-random with the full-size text encoder and VAE
    out: Path = Path("reports/benchmarks/bench")
    command: str = ""

    def check(self) -> None:
        for name, low in (("steps", 2), ("reps", 1), ("warmup", 0), ("warmup_steps", 1), ("timed_steps", 2)):
            value = getattr(self, name)
            if value is not None and value < low:
                why = " (step times are intervals between step ends)" if low == 2 else ""
                raise Flux2LabError(f"--{name.replace('_', '-')} {value}: give an integer >= {low}{why}.")
        if self.whole_pipeline and self.model != "full-random":
            raise Flux2LabError(f"--whole-pipeline adds the full-size text encoder and VAE to --model full-random; "
                                f"'{self.model}' has its own (or none).")
        if self.gpus is not None and (not self.gpus or min(self.gpus) < 2):
            raise Flux2LabError(f"--gpus {','.join(map(str, self.gpus))}: give GPU counts of 2 or more, e.g. 2,4.")

    def child_args(self, recipe_file: Path, out: Path) -> list[str]:
        """The bench arguments that time one recipe (the multi-GPU rung under torchrun)."""
        args = ["--model", self.model, "--recipe", str(recipe_file), "--out", str(out), "--no-floor",
                "--reps", str(self.reps), "--warmup", str(self.warmup), "--warmup-steps", str(self.warmup_steps)]
        if self.timed_steps:
            args += ["--timed-steps", str(self.timed_steps)]
        if self.teacache_schedule != "auto":
            args += ["--teacache-schedule", self.teacache_schedule]
        if self.dtype:
            args += ["--dtype", self.dtype]
        if self.whole_pipeline:
            args.append("--whole-pipeline")
        return args


def visible_gpus(device: torch.device) -> int:
    return torch.cuda.device_count() if device.type == "cuda" else 0


def _mem(device: torch.device, peak: bool = False) -> float | None:
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / GIB


def _time_images(pipe: Any, recipe: Recipe, cfg: BenchConfig, device: torch.device,
                 plan: SkipPlan | None = None) -> dict[str, Any]:
    """Warm up, then time `cfg.reps` images of the recipe (checking a replayed TeaCache plan was followed)."""
    clock = DeviceClock(device)
    # A TeaCache rung warms up on the full schedule so its skip path is compiled/captured as it will be timed.
    warm = recipe if recipe.teacache.enabled else recipe.replace(steps=min(cfg.warmup_steps, recipe.steps))
    t0 = time.perf_counter()
    for i in range(cfg.warmup):
        generate(pipe, [PROMPT], [1000 + i], warm)
    warmup_s = time.perf_counter() - t0
    timed_steps = recipe.steps if recipe.teacache.enabled or not cfg.timed_steps else cfg.timed_steps
    timed = recipe.replace(steps=timed_steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    walls, steps, computed, skipped = [], [], [], []
    t0 = time.perf_counter()
    for rep in range(cfg.reps):
        with _StepMarks(pipe, clock) as marks:
            record = generate(pipe, [PROMPT], [rep], timed).records[0]
        intervals = marks.intervals()
        skips = set(record.skipped_steps)
        if recipe.teacache.enabled and plan and plan.skip_steps is not None and skips != set(plan.skip_steps):
            raise RuntimeError(f"TeaCache skipped steps {sorted(skips)}, not the replayed {list(plan.skip_steps)}")
        steps += intervals
        computed += [t for i, t in enumerate(intervals, start=1) if i not in skips]
        skipped.append(sorted(skips))
        walls.append((record.wall_s, statistics.median(intervals)))
    timed_s = time.perf_counter() - t0
    extra = recipe.steps - timed_steps
    images = [wall + extra * step for wall, step in walls]
    result = {
        "warmup_images": cfg.warmup, "warmup_steps": warm.steps, "warmup_s": warmup_s, "timed_s": timed_s,
        "reps": cfg.reps, "steps": recipe.steps, "timed_steps": timed_steps,
        "image_s": spread(images), "image_values_s": images,
        "image_extrapolated": extra > 0,
        "step_s": spread(steps), "computed_step_s": spread(computed),
        "effective_step_s": statistics.median(images) / recipe.steps,
        "peak_mem_gib": _mem(device, peak=True),
        "skipped_steps": skipped[0] if skipped else [],
        "skipped_identical_in_all_reps": all(s == skipped[0] for s in skipped),
    }
    if extra:
        result["note"] = (f"timed {timed_steps}-step images; per-image time = measured wall + {extra} x "
                          "median step (extrapolated to the full schedule)")
    return result


class Bench:
    """Runs the ladder on one card; `result` is what bench.json holds, rewritten after every rung."""

    def __init__(self, cfg: BenchConfig, on_update: Callable[[dict[str, Any]], None] | None = None,
                 say: Callable[[str], None] = print):
        cfg.check()
        self.cfg, self.on_update, self.say = cfg, on_update or (lambda r: None), say
        self.world, self.rank = parallel.world_size(), parallel.rank()  # (1, 0) outside torchrun
        self.pipe = None
        self.touched = False  # whether the current rung got as far as applying its recipe to the pipeline
        self.load_s: float | None = None

    def _base(self) -> Recipe:
        """The ladder's first recipe, or the one recipe given, with --steps/--height/--width applied."""
        cfg = self.cfg
        recipe = Recipe.load(cfg.recipe) if cfg.recipe is not None else Recipe(steps=50)
        changes = {k: getattr(cfg, k) for k in ("steps", "height", "width") if getattr(cfg, k) is not None}
        return recipe.replace(**changes)

    def _ladder(self, base: Recipe, device: torch.device) -> tuple[list[Rung], set[str]]:
        precision = self.cfg.precision or default_precision(device)
        visible = visible_gpus(device)
        ladder = default_ladder(precision, self.cfg.gpus or (max(visible, 2),), base.steps)
        return ladder, select_rungs(ladder, self.cfg.ladder)

    def _plan(self, base: Recipe, rungs: list[Rung]) -> SkipPlan | None:
        """The TeaCache skip plan for the ladder's (or the given recipe's) TeaCache rung, if it has one."""
        recipe = base
        for rung in rungs:
            recipe = recipe.replace(**rung.changes)
        if not recipe.teacache.enabled:
            return None
        return skip_plan(self.cfg.teacache_schedule, self.cfg.model not in RANDOM_WEIGHTS, recipe)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.world > 1 and cfg.recipe is None:
            raise Flux2LabError(
                "under torchrun the benchmark times one recipe on all ranks: give --recipe FILE. (The single-"
                "process bench writes <out>/xN-gpus/recipe.json and runs or prints that command itself.)"
            )
        started = time.perf_counter()
        base = self._base()
        if cfg.timed_steps is not None and cfg.timed_steps > base.steps:
            raise Flux2LabError(f"--timed-steps {cfg.timed_steps} is more than the {base.steps} steps of an image.")
        # Everything the user can get wrong is checked before a (possibly 60 GiB) model is loaded.
        device = torch.device(cfg.device or default_device())
        if cfg.recipe is not None:
            rungs = [Rung(cfg.recipe.stem, {}, f"recipe {cfg.recipe}")]
            selected = {rungs[0].name}
        else:
            rungs, selected = self._ladder(base, device)
        self.plan = plan = self._plan(base, rungs)
        t0 = time.perf_counter()
        self.pipe = self._load(cfg.device)
        self.load_s = time.perf_counter() - t0  # reported by the first rung that uses this pipeline
        info = model_info(self.pipe)
        device = self.pipe.transformer.device
        height, width = resolution(self.pipe, base)
        self.result = result = {
            "schema": "flux2lab.bench/1",
            "command": cfg.command,
            "measured": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "environment": environment(device),
            "model": {"source": info.source, "kind": info.kind, "revision": info.revision},
            "coverage": ("transformer only: denoising loop on synthetic prompt embeddings, no text encoder or VAE"
                         if info.synthetic_text else "whole pipeline: text encoder, denoising loop and VAE decode"),
            "height": height, "width": width, "steps": base.steps,
            "settings": {"reps": cfg.reps, "warmup": cfg.warmup, "warmup_steps": cfg.warmup_steps,
                         "timed_steps": cfg.timed_steps or base.steps, "ladder": cfg.ladder,
                         "teacache_schedule": plan.describe if plan else None, "ranks": self.world},
            "timing": ("per step: CUDA events at the end of every denoising step (scheduler.step), interval "
                       "between consecutive ends, first step excluded; per image: the whole pipeline call "
                       "(synchronised wall clock); warm-up images excluded"
                       if device.type == "cuda" else "host clock (CPU run)"),
            "floor": None, "rungs": [], "targets": [],
        }
        if cfg.floor:
            self.say(f"floor: timing one step's GEMMs and attention on {result['environment']['device_name']}")
            work = step_workload(dict(self.pipe.transformer.config), image_tokens(self.pipe, height, width),
                                 info.max_sequence_length)
            result["floor"] = measure_floor(work, device, self.pipe.transformer.dtype)
        else:
            result["floor"] = {"skipped": "--no-floor"}
        self._update()

        # Every rung builds on the ones below it, timed or not; one that cannot run here drops out of the rest.
        current, dropped = base, []
        for rung in rungs:
            recipe = current.replace(**rung.changes)
            if rung.name not in selected:
                if rung.gpus == 1:
                    try:
                        self._precheck(rung, recipe, device)
                        current = recipe
                    except Flux2LabError:  # FeatureNotAvailable, or a precision this dtype cannot take
                        dropped.append(rung.name)
                continue
            row = {"name": rung.name, "adds": rung.adds, "status": "ok", "recipe": recipe.to_dict()}
            if dropped:
                row["without"] = list(dropped)
            self.say(f"rung {rung.name}: {rung.adds}")
            self.touched = False
            try:
                row.update(self._run_rung(rung, recipe, device))
            except FeatureNotAvailable as e:
                row.update(status="skipped", reason=str(e))
            except (torch.OutOfMemoryError, Flux2LabError) as e:
                row.update(status="failed", reason=f"{type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 - a bug: keep its traceback, but let the other rungs run
                traceback.print_exc()
                row.update(status="failed", reason=f"{type(e).__name__}: {e} (a flux2lab bug; traceback above)")
            if row["status"] == "ok" and rung.gpus == 1:
                current = recipe
            elif row["status"] != "ok" and rung.gpus == 1:
                dropped.append(rung.name)
            if row["status"] != "ok" and self.touched:  # apply may have half-changed it
                self._discard()
            if row["status"] != "ok":
                self.say(f"  {row['status']}: {row['reason']}")
            result["rungs"].append(row)
            summarize(result)
            self._update()
        if self.pipe is not None:
            self._discard()
        result["wall_s"] = time.perf_counter() - started
        self._update()
        return result

    def _load(self, device: str | None) -> Any:
        if self.cfg.whole_pipeline:
            return build_whole_random(device, dtype_of(self.cfg.dtype))
        return load_pipeline(self.cfg.model, device=device, dtype=dtype_of(self.cfg.dtype))

    def _discard(self) -> None:
        """Drop the pipeline and everything compiled or captured for it, and give its memory back to the driver
        (the full-size loader checks the driver's free memory) before the next one is loaded."""
        if self.pipe is None:
            return
        self.pipe, self.load_s = None, None  # the only reference: nothing else here keeps the pipeline
        torch._dynamo.reset()  # stale compiled blocks would otherwise pile up against the recompile limit
        free_memory()

    def _run_rung(self, rung: Rung, recipe: Recipe, device: torch.device) -> dict[str, Any]:
        if recipe.ulysses_degree > 1 and self.world == 1:
            return self._run_under_torchrun(rung, recipe, device)
        self._precheck(rung, recipe, device)
        row: dict[str, Any] = {}
        if self.pipe is not None and (done := applied_recipe(self.pipe)) is not None and done.model_changes(recipe):
            self._discard()
        if self.pipe is None:
            t0 = time.perf_counter()
            self.pipe = self._load(str(device))
            row["load_s"] = time.perf_counter() - t0
        elif self.load_s is not None:
            row["load_s"], self.load_s = self.load_s, None
        else:
            row["reused_pipeline"] = True
        if recipe.ulysses_degree > 1:
            parallel.check_sequence(self.pipe, *resolution(self.pipe, recipe),
                                    model_info(self.pipe).max_sequence_length, recipe.ulysses_degree)
        t0 = time.perf_counter()
        self.touched = True
        apply(self.pipe, recipe)
        row["apply_s"] = time.perf_counter() - t0
        row["weights_gib"] = _mem(device)
        if recipe.teacache.enabled:
            replay(self.pipe, recipe, self.plan)
            row["teacache"] = self.plan.describe
        row.update(_time_images(self.pipe, recipe, self.cfg, device, self.plan))
        return row

    def _precheck(self, rung: Rung, recipe: Recipe, device: torch.device) -> None:
        """Raise FeatureNotAvailable for what is known not to run here before a pipeline is loaded for it (so
        the loaded one stays reusable)."""
        if recipe.cuda_graphs and device.type != "cuda":
            raise FeatureNotAvailable(f"CUDA graphs need a CUDA GPU; this run is on '{device}'.")
        if recipe.transformer_precision != "bf16":
            from flux2lab.quantizers import resolve_backend

            dtype = (self.pipe.transformer.dtype if self.pipe is not None
                     else dtype_of(self.cfg.dtype) or default_dtype(device))
            resolve_backend(recipe.transformer_precision, recipe.quant_backend, device, dtype)

    def _run_under_torchrun(self, rung: Rung, recipe: Recipe, device: torch.device) -> dict[str, Any]:
        n = recipe.ulysses_degree
        folder = self.cfg.out / rung.name
        recipe_file = folder / "recipe.json"
        child = self.cfg.child_args(recipe_file, folder)
        shown = shlex.join(["torchrun", "--standalone", f"--nproc-per-node={n}", "-m", "flux2lab.bench", *child])
        visible = visible_gpus(device)
        if visible < n:
            recipe.save(recipe_file)
            raise FeatureNotAvailable(
                f"needs {n} GPUs, {visible} visible here. On a machine with {n} GPUs, run the whole ladder there, "
                f"or this rung alone: {shown}"
            )
        recipe.save(recipe_file)
        self._discard()  # every rank loads its own copy; this process's card is one of them
        self.say(f"  launching: {shown}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "flux2lab.bench", *child]
        (folder / "bench.json").unlink(missing_ok=True)
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        bench_json = folder / "bench.json"
        child_rungs = json.loads(bench_json.read_text())["rungs"] if bench_json.is_file() else []
        if not child_rungs:
            lines = proc.stderr.strip().splitlines()
            tail = [ln for ln in lines if ln.startswith("error: ")] or lines[-15:]
            raise Flux2LabError(f"the torchrun launch exited with status {proc.returncode}: " + " | ".join(tail))
        row = dict(child_rungs[0])
        for key in ("name", "adds"):
            row.pop(key, None)
        row["launched"] = shown
        if row.get("status") == "skipped":
            raise FeatureNotAvailable(row.get("reason", "skipped under torchrun"))
        if row.get("status") == "failed":
            raise Flux2LabError(row.get("reason", "failed under torchrun"))
        return row

    def _update(self) -> None:
        if self.rank == 0:
            self.on_update(self.result)


def summarize(result: dict[str, Any]) -> None:
    """Speedups (over the first rung that ran, and over the rung below), distance from the floor and the
    targets, recomputed over the rungs so far."""
    ok = [r for r in result["rungs"] if r["status"] == "ok"]
    previous = None
    for r in ok:
        img = r["image_s"]["median"]
        r["speedup"] = ok[0]["image_s"]["median"] / img
        r["speedup_over"] = ok[0]["name"]
        r["speedup_vs_previous"] = previous["image_s"]["median"] / img if previous else None
        previous = r
        r.update(_floor_distance(r, result.get("floor") or {}))
    result["targets"] = targets(result)


def _floor_distance(row: dict[str, Any], floor: dict[str, Any]) -> dict[str, Any]:
    """How far the rung's computed step is from the floor of its precision (split over its GPUs)."""
    if "bf16" not in floor:
        return {}
    precision = (row["recipe"] or {}).get("transformer_precision", "bf16")
    key = "bf16" if precision == "bf16" else "fp8"
    gpus = (row["recipe"] or {}).get("ulysses_degree", 1)
    floor_step = floor[key]["step_s"] / gpus
    step = (row.get("computed_step_s") or row["step_s"])["median"]
    out = {"floor_step_s": floor_step, "floor_kind": f"{key}" + (f" / {gpus} GPUs" if gpus > 1 else ""),
           "floor_ratio": step / floor_step if floor_step else None}
    if precision == "nvfp4":
        out["floor_note"] = "NVFP4 GEMMs are not timed; the FP8 floor is shown (the NVFP4 floor is lower)"
    return out


# --- targets -------------------------------------------------------------------------------------------------

def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each met / not met / not measured, with the number behind it."""
    rungs = {r["name"]: r for r in result["rungs"]}
    ok = {n: r for n, r in rungs.items() if r["status"] == "ok"}
    env = result["environment"]
    applicable = (result["model"]["kind"] in ("full-random", "pretrained") and env.get("cuda")
                  and (result["height"], result["width"], result["steps"]) == (1024, 1024, 50))
    base = ok.get("eager-bf16")
    precision_rung = next((n for n in rungs if n in ("+fp8", "+nvfp4")), "+fp8")
    stack = ok.get("+teacache")
    out = []

    def add(what: str, value: float | None, limit: float, higher: bool, detail: str) -> None:
        met = None if value is None else (value >= limit if higher else value <= limit)
        out.append({"target": what, "value": value, "limit": limit, "met": met, "detail": detail,
                    "applies_here": bool(applicable)})

    def speedup(name: str, over: dict | None) -> float | None:
        r = ok.get(name)
        return over["image_s"]["median"] / r["image_s"]["median"] if r and over else None

    add("compile >= 1.2x eager-bf16", speedup("compile", base), 1.2, True, "per-image time")
    add(f"{precision_rung} >= 1.8x eager-bf16", speedup(precision_rung, base), 1.8, True, "per-image time")
    teacache = (stack or {}).get("teacache", "")
    add("full single-GPU stack (+teacache) >= 3.0x eager-bf16", speedup("+teacache", base), 3.0, True,
        f"per-image time; {teacache}" if teacache else "per-image time")
    fp8 = ok.get(precision_rung)
    add(f"{precision_rung} compiled step <= 1.3x the floor", fp8.get("floor_ratio") if fp8 else None, 1.3, False,
        "median step / (FP8 GEMMs + attention floor measured in the same run)")
    for n, limit in ((2, 1.85), (4, 3.4)):
        add(f"x{n}-gpus >= {limit}x the 1-GPU full stack", speedup(f"x{n}-gpus", stack), limit, True,
            "per-image time over +teacache on one GPU")
    return out


# --- environment ---------------------------------------------------------------------------------------------

def _run_quiet(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=20, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device) -> dict[str, Any]:
    """The card, driver and library versions a number was measured with."""
    repo = Path(__file__).resolve().parent.parent
    env: dict[str, Any] = {
        "cuda": device.type == "cuda", "device": str(device), "device_name": platform.processor() or "cpu",
        "torch": torch.__version__, "cuda_runtime": torch.version.cuda, "diffusers": dist_version("diffusers"),
        "transformers": dist_version("transformers"), "torchao": dist_version("torchao"), "flux2lab": __version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "git_commit": _run_quiet(["git", "rev-parse", "HEAD"], cwd=repo),
        "git_dirty": bool(_run_quiet(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name, compute_capability=f"{props.major}.{props.minor}",
            memory_gib=props.total_memory / GIB, gpus_visible=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
            driver=_run_quiet(["nvidia-smi", f"--id={device.index or 0}", "--query-gpu=driver_version",
                               "--format=csv,noheader"]),
        )
    return env


# --- outputs -------------------------------------------------------------------------------------------------

def write_report(result: dict[str, Any], out: Path) -> list[Path]:
    """bench.json, bench.md (the table, the floor, the targets) and bench.png (the ladder as bars)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.md", out / "bench.png"]
    paths[0].write_text(json.dumps(result, indent=2, default=str) + "\n")
    paths[1].write_text(markdown(result))
    chart(result, paths[2])
    return paths


def _f(x: float | None, fmt: str = ".3f", unit: str = "") -> str:
    return "—" if x is None else f"{x:{fmt}}{unit}"


def _title(result: dict[str, Any]) -> str:
    env = result["environment"]
    return (f"FLUX.2 {result['model']['source']} · {result['width']}x{result['height']} · {result['steps']} steps · "
            f"{env['device_name']}")


def markdown(result: dict[str, Any]) -> str:
    env, settings, floor = result["environment"], result["settings"], result.get("floor") or {}
    ok = [r for r in result["rungs"] if r["status"] == "ok"]
    base = ok[0]["name"] if ok else "the first rung"
    lines = [
        f"# Speed ladder: {_title(result)}", "",
        f"Command: `{result['command']}` ({result.get('measured', 'time not recorded')})", "",
        f"- Card: {env['device_name']}" + (f" (sm{env['compute_capability']}, {env['memory_gib']:.0f} GiB, "
                                             f"driver {env.get('driver')}, CUDA {env['cuda_runtime']})"
                                             if env.get("cuda") else ""),
        (f"- Software: torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}, "
         f"torchao {env['torchao']}, flux2lab {env['flux2lab']} (git {str(env.get('git_commit'))[:12]}"
         f"{', uncommitted changes' if env.get('git_dirty') else ''})"),
        f"- Model: {result['model']['source']} ({result['model']['kind']}); covers the {result['coverage']}",
        (f"- Timing: {result['timing']}. {settings['reps']} timed image(s) per rung after {settings['warmup']} "
         f"warm-up image(s) of {settings['warmup_steps']} steps (TeaCache rungs warm up on the full schedule)."),
    ]
    if settings["timed_steps"] != result["steps"]:
        lines.append(f"- Timed images run {settings['timed_steps']} steps; per-image times of rungs without TeaCache "
                     f"are extrapolated to {result['steps']} steps (measured wall + remaining steps x median step).")
    if settings.get("teacache_schedule"):
        lines.append(f"- TeaCache: {settings['teacache_schedule']}.")
    lines += [
        "", (f"| rung | adds | s/step median [p25–p75] | s/image ({result['steps']} steps) median [min–max] | "
             f"peak GPU mem | speedup vs {base} | vs rung below | step / floor |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in result["rungs"]:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['adds']} | **{r['status']}** (note {len(notes) + 1}) | | | | | |")
            notes.append(f"{r['name']} {r['status']}: {r['reason']}")
            continue
        st, im = r.get("computed_step_s") or r["step_s"], r["image_s"]
        extra = []
        if r.get("teacache"):
            extra.append(f"{r['teacache']}; skipped {len(r['skipped_steps'])}/{r['steps']}")
        if r.get("without"):
            extra.append(f"without {', '.join(r['without'])}")
        adds = r["adds"] + (f" ({'; '.join(extra)})" if extra else "")
        lines.append(
            f"| {r['name']} | {adds} | {_f(st['median'])} [{_f(st['p25'])}–{_f(st['p75'])}] | "
            f"{_f(im['median'], '.2f')} [{_f(im['min'], '.2f')}–{_f(im['max'], '.2f')}]"
            f"{' (extrap.)' if r.get('image_extrapolated') else ''} | {_f(r.get('peak_mem_gib'), '.1f', ' GiB')} | "
            f"{_f(r.get('speedup'), '.2f', 'x')} | {_f(r.get('speedup_vs_previous'), '.2f', 'x')} | "
            f"{_f(r.get('floor_ratio'), '.2f', 'x')} |"
        )
    if any(r.get("computed_step_s") for r in ok):
        lines.append("\nTeaCache rows show the median *computed* step; their per-image time includes the skipped ones.")
    if notes:
        lines += [""] + [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    spent = [f"{r['name']}: load {_f(r.get('load_s'), '.0f')} s, apply {_f(r.get('apply_s'), '.0f')} s, warm-up "
             f"{_f(r.get('warmup_s'), '.0f')} s, timed {_f(r.get('timed_s'), '.0f')} s" for r in ok]
    if spent:
        lines += ["", f"Time spent (whole run {_f(result.get('wall_s'), '.0f')} s): " + "; ".join(spent) + "."]
    if "bf16" in floor:
        lines += [
            "", (f"## Floor: one step = {floor['tflop_per_step']:.4g} TFLOP ({floor['gemm_tflop']:.4g} in GEMMs, "
                 f"{floor['attention_tflop']:.4g} in attention; {floor['image_tokens']} image + "
                 f"{floor['text_tokens']} text tokens)"), "",
            f"Measured on this card in the same run: {floor['note']}.", "",
            "| GEMMs in | GEMMs | attention | floor per step | GEMM rate | floor per image |",
            "|---|---|---|---|---|---|",
        ]
        for key, label in (("bf16", floor["dtype"]), ("fp8", "fp8 (row-wise)")):
            fl = floor[key]
            lines.append(f"| {label} | {fl['gemm_s']:.3f} s | {fl['attention_s']:.3f} s | {fl['step_s']:.3f} s | "
                         f"{_f(fl['gemm_tflops'], '.4g', ' TFLOP/s')} | {fl['step_s'] * result['steps']:.2f} s |")
        lines.append(f"\nThe FP8 floor keeps the layers flux2lab.quantizers's rule keeps in high precision at "
                     f"{floor['dtype']} ({floor['fp8']['kept_high_tflop']:.4g} TFLOP a step), as the FP8 rung does.")
        if floor["fp8"]["gemms_not_in_fp8"]:
            lines.append(f"\nGEMMs without an FP8 kernel here (counted at {floor['dtype']}): "
                         + "; ".join(floor["fp8"]["gemms_not_in_fp8"]))
    elif floor.get("skipped"):
        lines += ["", f"Floor not measured: {floor['skipped']}."]
    lines += ["", "## Targets", ""]
    if result["targets"] and not result["targets"][0]["applies_here"]:
        lines += [("The targets are set for the full-size model at 1024x1024, 50 steps on an H100/H200; this run "
                   "is not that, so the verdicts below only show the arithmetic."), ""]
    for t in result["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        value = "" if t["value"] is None else f": {t['value']:.2f}x"
        lines.append(f"- **{verdict}** — {t['target']}{value} ({t['detail']})")
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    """Bars of the speedup per rung over the first, labelled like NVIDIA's Figure 4 ("1.0x", "1.7x"...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rungs = result["rungs"]
    fig, ax = plt.subplots(figsize=(1.6 * max(len(rungs), 3) + 1.5, 4.8), dpi=120)
    names = [r["name"] for r in rungs]
    heights = [r.get("speedup") or 0 for r in rungs]
    top = max([h for h in heights if h] + [1.0])
    floor, ok = result.get("floor") or {}, [r for r in rungs if r["status"] == "ok"]
    lines = []
    if "bf16" in floor and ok and ok[0]["recipe"]["transformer_precision"] == "bf16":
        base = ok[0]["image_s"]["median"]
        lines = [(base / (floor[k]["step_s"] * result["steps"]), label)
                 for k, label in (("bf16", f"{floor['dtype']} arithmetic floor"), ("fp8", "FP8 arithmetic floor"))]
        lines = [(v, label) for v, label in lines if v <= 3 * top]  # far above every bar they only squash it
        top = max([top] + [v for v, _ in lines])
    bars = ax.bar(names, heights, color=["#76b900" if r["status"] == "ok" else "#dddddd" for r in rungs],
                  edgecolor="#333333", width=0.65)
    for bar, r in zip(bars, rungs):
        label = f"{r['speedup']:.1f}x" if r["status"] == "ok" else r["status"]
        y = bar.get_height() if r["status"] == "ok" else 0
        ax.text(bar.get_x() + bar.get_width() / 2, y + top * 0.015, label, ha="center", va="bottom",
                fontsize=11, fontweight="bold" if r["status"] == "ok" else "normal",
                color="#222222" if r["status"] == "ok" else "#888888")
    for value, label in lines:
        ax.axhline(value, color="#555555", linestyle="--", linewidth=1)
        ax.text(len(rungs) - 0.5, value, f" {label} ({value:.1f}x)", va="bottom", ha="right", fontsize=8,
                color="#555555")
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel(f"speedup over {ok[0]['name'] if ok else 'the first rung'} (per image)")
    ax.set_title(_title(result) + f"\n{result['coverage'].split(':')[0]}", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
