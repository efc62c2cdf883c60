"""Will a recipe fit the card? A memory plan made before any weight is loaded, and a refusal with the fix.

The plan reads the model's configs (`pipeline.configs`), builds every component on the meta device (no memory)
and counts, per component, its parameters and what they weigh in the recipe's precision:

- the model dtype (BF16: 2 bytes a parameter) for everything that is not quantized;
- FP8 (row-wise): 1 byte a weight plus a float32 scale per row;
- NVFP4: 4.5 bits a weight (E2M1 values and an E4M3 scale per 16), 0.5625 bytes, plus a float32 scale per tensor;
- the layers `quantizers.select_layers` keeps in high precision (embedders, norms, the text encoder's embedding,
  head and vision tower) stay in the model dtype.

Activations at the recipe's resolution are a rough upper bound, one term per stage (the stages run one after
another, so the largest counts): the transformer holds about 24 tensors of (image + text tokens) x hidden width
inside a block (the single-stream block's fused projection alone is 9 hidden widths wide); the VAE decoder
about 12 full-resolution maps of its first block's channels; the text encoder all of its hidden states (the
pipeline asks for every one). `WORKSPACE` adds room for cuBLAS and allocator rounding. On an H200, the whole
FLUX.2 [dev] pipeline in BF16 at 1024x1024 peaked at 107 GiB; this plan says 107.2.

What is on the card at once depends on the recipe's `offload`:

- `none`: every component. Quantized components are placed one at a time (`load_pipeline(staged=True)`), so
  while one is quantized the card also holds the BF16 copy of that one only.
- `model` (diffusers' `enable_model_cpu_offload`): one component at a time, the largest decides.
- `group` (diffusers' block-level group offloading with a prefetch stream): per component, the modules outside
  its top-level block lists plus two blocks (the running one and the prefetched one). A component without
  top-level block lists (the transformers text encoder) moves whole, as diffusers does it.

The card's budget is what `torch.cuda.mem_get_info` reports free, capped by a
`torch.cuda.set_per_process_memory_fraction` limit, or what the user states (`gpu_memory_gib`). Releasing
the text encoder after encoding (`generate(..., release_text_encoder=True)`) frees memory for the rest of a
run, but not before the peak of loading it, so the plan does not count on it; under `model` offloading, the
release puts the transformer and the VAE on the card for good when they fit there together (`resident_need`),
so no weights move per image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flux2lab.common.errors import Flux2LabError
from flux2lab.pipeline.recipe import Recipe

GIB = 2**30
QUANTIZED_BYTES = {"fp8": 1.0, "nvfp4": 0.5625}  # bytes a quantized weight takes, block scales included
WORKSPACE = GIB // 2
TRANSFORMER_ACTIVATIONS = 24  # (tokens x hidden width) tensors alive inside one transformer block
VAE_ACTIVATIONS = 12  # full-resolution maps of the decoder's first-block width alive at once
PLACEMENT_ORDER = ("transformer", "text_encoder", "vae")


@dataclass(frozen=True)
class ComponentMemory:
    """One component's weights in the recipe's precision."""

    name: str
    precision: str
    params: int
    quantized_params: int
    bytes: int  # as it runs
    load_bytes: int  # in the model dtype, as loaded (before quantization)
    group_bytes: int  # on the card at once under group offloading

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Card:
    """How much memory the run may use on its device (None: not a GPU, nothing to plan)."""

    device: str
    bytes: int | None
    source: str  # where the number comes from, for messages


@dataclass(frozen=True)
class MemoryPlan:
    """What a recipe needs on the card, against what the card has."""

    model: str
    recipe: Recipe
    components: tuple[ComponentMemory, ...]
    activations: int
    need: int
    card: Card
    height: int
    width: int
    fixes: tuple[str, ...] = ()  # recipe changes that would fit, when this one does not

    @property
    def fits(self) -> bool:
        return self.card.bytes is None or self.need <= self.card.bytes

    def summary(self) -> str:
        parts = ", ".join(f"{c.name} {c.bytes / GIB:.1f} GiB ({c.precision})" for c in self.components)
        card = "no GPU limit" if self.card.bytes is None else f"{self.card.bytes / GIB:.1f} GiB ({self.card.source})"
        return (f"needs about {self.need / GIB:.1f} GiB with offload '{self.recipe.offload}' at "
                f"{self.height}x{self.width}: {parts}, activations {self.activations / GIB:.1f} GiB; card: {card}")

    def check(self) -> None:
        """Refuse a run that cannot fit, naming what would."""
        if self.fits:
            return
        fixes = "; ".join(self.fixes) if self.fixes else (
            "nothing flux2lab offers fits this card; use a card with more memory")
        raise Flux2LabError(f"{self.model} will not fit {self.card.device}: it {self.summary()}. Fits with: {fixes}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "recipe": self.recipe.to_dict(), "components": [c.to_dict() for c in self.components],
            "activations_bytes": self.activations, "need_bytes": self.need, "card_bytes": self.card.bytes,
            "card_source": self.card.source, "height": self.height, "width": self.width, "fits": self.fits,
            "fixes": list(self.fixes),
        }


# --- weights -------------------------------------------------------------------------------------------------

def _group_bytes(module: nn.Module, sizes: dict[int, float]) -> float:
    """On the card at once under diffusers' block-level group offloading: everything outside the top-level
    block lists, plus the two largest blocks (running and prefetched)."""
    blocks = [b for child in module.children() if isinstance(child, (nn.ModuleList, nn.Sequential)) for b in child]
    in_blocks = {id(t) for b in blocks for t in [*b.parameters(), *b.buffers()]}
    outside = sum(v for k, v in sizes.items() if k not in in_blocks)
    per_block = sorted((sum(sizes.get(id(t), 0.0) for t in [*b.parameters(), *b.buffers()]) for b in blocks),
                       reverse=True)
    return outside + sum(per_block[:2])


def component_memory(name: str, module: nn.Module, precision: str, dtype: torch.dtype) -> ComponentMemory:
    """A component's weights in `precision` (bf16 = unquantized, in `dtype`); the module may be on meta."""
    from flux2lab.quantizers import TEXT_ENCODER_KEEP, select_layers

    dtype_bytes = torch.finfo(dtype).bits // 8
    loaded = {id(t): float(t.numel() * dtype_bytes) for t in [*module.parameters(), *module.buffers()]
              if t.is_floating_point()}
    sizes, quantized = dict(loaded), 0
    if precision != "bf16":
        layers = dict(module.named_modules())
        for layer_name in select_layers(module, TEXT_ENCODER_KEEP if name == "text_encoder" else None)[0]:
            linear = layers[layer_name]
            scales = linear.out_features * 4 if precision == "fp8" else 4  # float32 per row / per tensor
            sizes[id(linear.weight)] = linear.weight.numel() * QUANTIZED_BYTES[precision] + scales
            quantized += linear.weight.numel()
    return ComponentMemory(name=name, precision=precision, params=sum(p.numel() for p in module.parameters()),
                           quantized_params=quantized, bytes=int(sum(sizes.values())),
                           load_bytes=int(sum(loaded.values())), group_bytes=int(_group_bytes(module, sizes)))


# --- activations ---------------------------------------------------------------------------------------------

def activation_bytes(components: Mapping[str, nn.Module | None], height: int, width: int, text_tokens: int,
                     dtype: torch.dtype) -> int:
    """The largest stage's activations at height x width (see the module docstring for the formula)."""
    b = torch.finfo(dtype).bits // 8
    transformer, vae, text_encoder = (components.get(n) for n in ("transformer", "vae", "text_encoder"))
    stages = []
    if transformer is not None:
        t = transformer.config
        per_side = 2 ** (len(vae.config.block_out_channels) - 1) * 2 if vae is not None else 16
        tokens = (height // per_side) * (width // per_side) + text_tokens
        stages.append(TRANSFORMER_ACTIVATIONS * tokens * t.num_attention_heads * t.attention_head_dim * b)
    if vae is not None:
        stages.append(VAE_ACTIVATIONS * height * width * vae.config.block_out_channels[0] * b)
    if text_encoder is not None:
        c = text_encoder.config.get_text_config()
        stages.append(text_tokens * ((c.num_hidden_layers + 1) * c.hidden_size + c.intermediate_size) * b)
    return int(max(stages, default=0)) + WORKSPACE


# --- the plan ------------------------------------------------------------------------------------------------

def card_memory(device: str | torch.device, gpu_memory_gib: float | None = None) -> Card:
    """The bytes a run may use on `device`: the stated GiB, else free memory under any per-process cap."""
    device = torch.device(device)
    if gpu_memory_gib is not None:
        if not gpu_memory_gib > 0:
            raise Flux2LabError(f"--gpu-memory {gpu_memory_gib}: give the card's memory in GiB, a positive number.")
        return Card(str(device), int(gpu_memory_gib * GIB), f"--gpu-memory {gpu_memory_gib:g}")
    if device.type != "cuda":
        return Card(str(device), None, "not a GPU")
    if not torch.cuda.is_available():
        raise Flux2LabError(f"device '{device}' was asked for, but this machine has no CUDA GPU. Use --device cpu.")
    if device.index is None:  # "cuda": the current card (torch's per-process-fraction query needs an index)
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    capped = int(total * fraction) - torch.cuda.memory_reserved(device)
    if capped < free:
        return Card(str(device), capped, f"per-process cap {fraction:.2f} of {total / GIB:.0f} GiB")
    return Card(str(device), free, f"free on {torch.cuda.get_device_name(device)}")


def _need(components: tuple[ComponentMemory, ...], activations: int, offload: str) -> int:
    by_name = {c.name: c for c in components}
    ordered = [by_name[n] for n in PLACEMENT_ORDER if n in by_name]
    largest_load = max((c.load_bytes for c in ordered if c.precision != "bf16"), default=0)
    if offload == "model":
        return max(largest_load, max(c.bytes for c in ordered) + activations)
    if offload == "group":
        return max(largest_load, max(c.group_bytes for c in ordered) + activations)
    placed, placement = 0, 0
    for c in ordered:
        placement = max(placement, placed + c.load_bytes)
        placed += c.bytes
    return max(placement, placed + activations)


def plan(model: str, components: Mapping[str, nn.Module | None], recipe: Recipe, *, height: int, width: int,
         text_tokens: int, dtype: torch.dtype, card: Card) -> MemoryPlan:
    """The plan for `recipe` on `card`, from the components' module trees (meta device is fine).

    `height`/`width` are the model's native size, used where the recipe leaves them to the model."""
    height, width = recipe.height or height, recipe.width or width
    mems = tuple(component_memory(name, module, _precision(recipe, name), dtype)
                 for name, module in components.items() if module is not None)

    def need_of(r: Recipe, h: int, w: int) -> int:
        ms = tuple(component_memory(c.name, components[c.name], _precision(r, c.name), dtype)
                   if c.precision != _precision(r, c.name) else c for c in mems)
        return _need(ms, activation_bytes(components, h, w, text_tokens, dtype), r.offload)

    activations = activation_bytes(components, height, width, text_tokens, dtype)
    need = _need(mems, activations, recipe.offload)
    fixes: list[str] = []
    if card.bytes is not None and need > card.bytes:
        for tier in _candidates(recipe, height, width):  # the first tier with anything that fits
            for label, hint, (r, h, w) in tier:
                n = need_of(r, h, w)
                if n <= card.bytes:
                    fixes.append(f"{label} (about {n / GIB:.1f} GiB; {hint})")
            if fixes:
                break
    return MemoryPlan(model=model, recipe=recipe, components=mems, activations=activations, need=need, card=card,
                      height=height, width=width, fixes=tuple(fixes))


def resident_need(components: Mapping[str, nn.Module | None], recipe: Recipe, *, height: int, width: int,
                  text_tokens: int, dtype: torch.dtype) -> int:
    """Bytes the components need on the card together, already in the recipe's precision, with activations."""
    mems = [component_memory(n, m, _precision(recipe, n), dtype) for n, m in components.items() if m is not None]
    return sum(c.bytes for c in mems) + activation_bytes(components, height, width, text_tokens, dtype)


def _precision(recipe: Recipe, name: str) -> str:
    return {"transformer": recipe.transformer_precision, "text_encoder": recipe.text_encoder_precision}.get(name, "bf16")


def _candidates(recipe: Recipe, height: int, width: int) -> list[list[tuple[str, str, tuple[Recipe, int, int]]]]:
    """Recipe changes that lower memory: single changes first, then combinations."""
    can_offload = recipe.offload == "none" and not recipe.cuda_graphs and recipe.ulysses_degree == 1
    offloads = [(f"offload '{m}'", f"recipe field offload, or --offload {m}; the same images, slower",
                 (recipe.replace(offload=m), height, width)) for m in ("model", "group") if can_offload]
    fp8_text = recipe.text_encoder_precision == "bf16"
    singles = list(offloads)
    if fp8_text:
        singles.append(("text_encoder_precision 'fp8'", "recipe field; the prompt embeddings change slightly",
                        (recipe.replace(text_encoder_precision="fp8"), height, width)))
    h, w = height // 2 // 16 * 16, width // 2 // 16 * 16
    if h >= 256 and w >= 256:
        singles.append((f"height {h} width {w}", "--height/--width; other images",
                        (recipe.replace(height=h, width=w), h, w)))
    combos = [(f"{label} with text_encoder_precision 'fp8'", hint, (r.replace(text_encoder_precision="fp8"), h_, w_))
              for label, hint, (r, h_, w_) in offloads if fp8_text]
    return [singles, combos]


def components_of(source: str, dtype: torch.dtype) -> tuple[dict[str, nn.Module | None], dict[str, int]]:
    """Each component of `source` as a module tree without weights (meta device), and its native size and
    text tokens. `tiny` and `mini` are small enough to be built for real."""
    from flux2lab.pipeline import models

    if source in ("tiny", "mini"):
        pipe = models.load_pipeline(source, device="cpu", dtype=dtype)
        info = models.model_info(pipe)
        components = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "vae": pipe.vae}
        return components, {"height": info.height, "width": info.width, "text_tokens": info.max_sequence_length}
    if source == "full-random":
        return ({"transformer": models.build_transformer_on_meta()},
                {"height": 1024, "width": 1024, "text_tokens": models.FULL_TEXT_TOKENS})
    return meta_components(models.read_configs(source))


def meta_components(configs: Any) -> tuple[dict[str, nn.Module | None], dict[str, int]]:
    """The components a `pipeline.configs.PipelineConfigs` describes, on the meta device."""
    import transformers
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    from flux2lab.pipeline.configs import call_settings

    settings = call_settings(configs)
    encoder_class = getattr(transformers, configs.text_encoder_class)
    with torch.device("meta"):
        components = {
            "transformer": Flux2Transformer2DModel.from_config(configs.transformer),
            "text_encoder": encoder_class(configs.text_encoder),
            "vae": AutoencoderKLFlux2.from_config(configs.vae),
        }
    return components, {"height": settings["height"], "width": settings["width"],
                        "text_tokens": settings["max_sequence_length"]}


def plan_for(source: str, recipe: Recipe, device: str | None = None, dtype: str | torch.dtype | None = None,
             gpu_memory_gib: float | None = None) -> MemoryPlan:
    """The plan for loading `source` (built-in name, folder or hub id) and running `recipe` on `device`."""
    from flux2lab.pipeline import models

    device = device or models.default_device()
    dtype = models.dtype_of(dtype) or models.default_dtype(device)
    components, native = components_of(source, dtype)
    return plan(source, components, recipe, height=native["height"], width=native["width"],
                text_tokens=native["text_tokens"], dtype=dtype, card=card_memory(device, gpu_memory_gib))


def load_for(source: str, recipe: Recipe, device: str | None = None, dtype: str | torch.dtype | None = None,
             gpu_memory_gib: float | None = None) -> Any:
    """Plan, refuse what cannot fit (before any weight is read), then load: staged in host memory when the
    recipe quantizes or offloads on a GPU, so the card never holds more than the plan counted."""
    from flux2lab.pipeline import models

    device = device or models.default_device()
    plan_for(source, recipe, device, dtype, gpu_memory_gib).check()
    quantizes = recipe.transformer_precision != "bf16" or recipe.text_encoder_precision != "bf16"
    staged = torch.device(device).type == "cuda" and (quantizes or recipe.offload != "none")
    return models.load_pipeline(source, device=device, dtype=dtype, staged=staged)
