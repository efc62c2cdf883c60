"""`apply(pipe, recipe)` and `generate(pipe, prompts, seeds, recipe)`: the loop everything else is made of.

Calibrate, search, compare, run and bench all *take a pipeline, apply a recipe, generate, measure*. `apply`
changes the pipeline in place and remembers the recipe it applied: parts that rewrite the model
(precision, compile, CUDA graphs, parallelism) are applied once, and asking for different ones on the same
pipeline is an error (load a fresh one); TeaCache settings can be swapped freely, which is what a search
does between trials. `generate` returns images together with what happened to each.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import Flux2Pipeline
from PIL import Image

from flux2lab.common.errors import Flux2LabError
from flux2lab.hooks import step_caches, teacache
from flux2lab.hooks.block_counter import BlockCounter
from flux2lab.pipeline.caches import DIFFUSERS_METHODS
from flux2lab.pipeline.models import compute_device, free_memory, model_info
from flux2lab.pipeline.recipe import Recipe
from flux2lab.quantizers import TEXT_ENCODER_KEEP, quantize

# Set on a transformer whose blocks `apply` compiled with fullgraph=True (diffusers' step caches cannot run there).
COMPILED_FULLGRAPH = "flux2lab_compiled_fullgraph"


@dataclass(frozen=True)
class Prompt:
    """A prompt, optionally with reference images (FLUX.2 multi-reference editing)."""

    text: str
    images: tuple[str, ...] = ()

    @classmethod
    def of(cls, p: str | Prompt) -> Prompt:
        return p if isinstance(p, Prompt) else cls(p)


@dataclass
class ImageRecord:
    """What happened while one image was made."""

    prompt: str
    seed: int
    wall_s: float
    step_s: list[float] | None = None  # time per denoising step, when asked for
    teacache: list[dict[str, Any]] | None = None  # per-step TeaCache log, when TeaCache is on
    reference_images: list[str] = field(default_factory=list)
    cache_method: str = "none"
    # Fraction of the transformer's block stack that really ran (hooks.block_counter), and per step; None where
    # it was not counted (CUDA graphs replay blocks without Python, so nothing can count them).
    computed_fraction: float | None = None
    step_fractions: list[float] | None = None

    @property
    def skipped_steps(self) -> list[int]:
        return [e["step"] for e in self.teacache or [] if not e["computed"]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt, "seed": self.seed, "wall_s": self.wall_s, "step_s": self.step_s,
            "reference_images": self.reference_images, "skipped_steps": self.skipped_steps,
            "teacache": self.teacache, "cache_method": self.cache_method,
            "computed_fraction": self.computed_fraction, "step_fractions": self.step_fractions,
        }


@dataclass
class Generation:
    """Images (PIL, or latents for models without a VAE) and one record per image."""

    images: list[Any]
    records: list[ImageRecord]
    encode_s: float = 0.0  # prompts encoded up front (release_text_encoder), outside the images' wall times

    @property
    def mean_wall_s(self) -> float:
        """Mean seconds per image (nan for no images)."""
        return sum(r.wall_s for r in self.records) / len(self.records) if self.records else float("nan")

    @property
    def skipped_fraction(self) -> float:
        """TeaCache's skipped steps over all steps (0 for other methods: see computed_fraction)."""
        steps = sum(len(r.teacache) for r in self.records if r.teacache)
        return sum(len(r.skipped_steps) for r in self.records) / steps if steps else 0.0

    @property
    def computed_fraction(self) -> float | None:
        """Mean fraction of the block stack that ran per image (None when not counted)."""
        counted = [r.computed_fraction for r in self.records if r.computed_fraction is not None]
        return sum(counted) / len(counted) if counted and len(counted) == len(self.records) else None


def applied_recipe(pipe: Flux2Pipeline) -> Recipe | None:
    return getattr(pipe, "flux2lab_recipe", None)


def apply(pipe: Flux2Pipeline, recipe: Recipe) -> Flux2Pipeline:
    """Turn a stock `Flux2Pipeline` into the accelerated one the recipe describes (in place)."""
    previous = applied_recipe(pipe)
    if previous is None:
        _apply_model_changes(pipe, recipe)
    elif changed := previous.model_changes(recipe):
        raise Flux2LabError(
            f"this pipeline was already built with a recipe that differs in {', '.join(changed)}; those change "
            "the model itself and cannot be undone in place. Load a fresh pipeline for the new recipe."
        )
    _apply_cache(pipe, recipe)
    pipe.flux2lab_recipe = recipe
    return pipe


def _apply_model_changes(pipe: Flux2Pipeline, recipe: Recipe) -> None:
    # Quantize first: compile and CUDA graphs must see the final (quantized) layers. Each component is quantized
    # on the compute device; a staged pipeline (models.load_pipeline(staged=True)) is moved there one component
    # at a time, so only one is ever on the card in BF16, and components to offload go back to host memory.
    # A BF16 component has nothing to quantize: it is placed with the rest below (moving 60 GiB to the card and
    # back for nothing took about a minute of an offloaded run's warm-up on an H200).
    device = compute_device(pipe)
    for name, precision, keep in (("transformer", recipe.transformer_precision, None),
                                  ("text_encoder", recipe.text_encoder_precision, TEXT_ENCODER_KEEP)):
        module = getattr(pipe, name)
        if module is None or precision == "bf16":
            continue
        module.to(device)
        quantize(module, precision, backend=recipe.quant_backend, keep=keep)
        if recipe.offload != "none":
            module.to("cpu")
    if recipe.offload == "none":
        pipe.to(device)
    else:
        _offload(pipe, recipe.offload, device)
    if recipe.ulysses_degree > 1:
        from flux2lab import parallel

        parallel.enable_ulysses(pipe.transformer, recipe.ulysses_degree)
    if recipe.cuda_graphs:
        from flux2lab.hooks import cudagraphs

        # Captures the blocks below every other hook and compiles them there itself when `compile` is on.
        cudagraphs.enable(pipe.transformer, compile=recipe.compile)
    elif recipe.compile:
        # Regional compilation: each repeated block is compiled once and reused, so warm-up takes seconds,
        # not minutes, and the step is as fast as a whole-model compile (diffusers' recommendation). diffusers'
        # step caches decide inside the blocks in torch.compiler.disable'd code, which fullgraph=True refuses:
        # with one of them the blocks compile with graph breaks there (images unchanged).
        fullgraph = recipe.cache.method not in DIFFUSERS_METHODS
        pipe.transformer.compile_repeated_blocks(fullgraph=fullgraph)
        setattr(pipe.transformer, COMPILED_FULLGRAPH, fullgraph)


def _offload(pipe: Flux2Pipeline, mode: str, device: torch.device) -> None:
    """diffusers' own offloading: `model` keeps one component on the card at a time; `group` one block at a
    time, the next one prefetched on a side CUDA stream."""
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                                  num_blocks_per_group=1, use_stream=device.type == "cuda")


def encode_prompts(pipe: Flux2Pipeline, texts: Sequence[str]) -> None:
    """Encode prompts now and keep their embeddings (in host memory) for `generate`."""
    info = model_info(pipe)
    cache = getattr(pipe, "flux2lab_prompt_embeds", None)
    if cache is None:
        cache = pipe.flux2lab_prompt_embeds = {}
    for text in dict.fromkeys(texts):
        if text not in cache:
            embeds, _ = pipe.encode_prompt(prompt=text, device=compute_device(pipe),
                                           max_sequence_length=info.max_sequence_length,
                                           text_encoder_out_layers=info.text_encoder_out_layers)
            cache[text] = embeds.to("cpu")


def drop_text_encoder(pipe: Flux2Pipeline, card: Any = None) -> None:
    """Drop the text encoder (24B parameters for FLUX.2 [dev]) once every prompt is encoded; the pipeline then
    generates only the prompts `encode_prompts` kept.

    The encoder leaves the card first, moved to host memory in place (each parameter's data swapped, as
    offloading does): on an H200 under model offloading, dropping it while on the card left 37.8 GiB allocated
    there, held by references the drop could not see. Under `model` offloading the rest then stays on the card
    when it fits there (`card`: a `memory.Card`, by default what the compute device has free): the transformer
    no longer moves in and out per image, and the images are the same. Otherwise offloading goes on without
    the encoder."""
    from flux2lab.pipeline import memory

    if pipe.text_encoder is None:
        return
    recipe = applied_recipe(pipe)
    remodel = recipe is not None and recipe.offload == "model"
    if remodel:
        pipe.remove_all_hooks()  # the hook chain holds the encoder; rebuilt below without it, if still needed
    pipe.text_encoder.to("cpu")
    pipe.register_modules(text_encoder=None)
    free_memory()
    if remodel:
        device = compute_device(pipe)
        card = card or memory.card_memory(device)
        height, width = resolution(pipe, recipe)
        need = memory.resident_need({"transformer": pipe.transformer, "vae": pipe.vae}, recipe, height=height,
                                    width=width, text_tokens=model_info(pipe).max_sequence_length,
                                    dtype=pipe.vae.dtype)
        if card.bytes is None or need <= card.bytes:
            pipe.to(device)
        else:
            pipe.enable_model_cpu_offload(device=device)


def _apply_cache(pipe: Flux2Pipeline, recipe: Recipe) -> None:
    """Attach the recipe's step cache (one at a time). Re-applying TeaCache swaps the config on the hooks already
    attached (no recompilation of a compiled model); a diffusers cache is attached anew."""
    method, t = recipe.cache.method, pipe.transformer
    if method != "teacache":
        teacache.remove_teacache(t)
    if method not in DIFFUSERS_METHODS:
        step_caches.remove_step_cache(t)
    if method == "teacache":
        teacache.apply_teacache(t, teacache.TeaCacheConfig.from_recipe(recipe), scheduler=pipe.scheduler)
    elif method in DIFFUSERS_METHODS:
        step_caches.apply_step_cache(t, method, recipe.cache.as_dict(), recipe.steps,
                                     compile_fullgraph=getattr(t, COMPILED_FULLGRAPH, False))


def synthetic_prompt_embeds(pipe: Flux2Pipeline, prompt: str) -> torch.Tensor:
    """Seeded stand-in embeddings of the real shape, for models without a text encoder (`full-random`)."""
    info = model_info(pipe)
    t = pipe.transformer
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    emb = torch.randn(1, info.max_sequence_length, t.config.joint_attention_dim, generator=gen)
    return emb.to(device=t.device, dtype=t.dtype)


def resolution(pipe: Flux2Pipeline, recipe: Recipe) -> tuple[int, int]:
    """(height, width) the recipe generates at: its own, else the model's native size."""
    info = model_info(pipe)
    return recipe.height or info.height, recipe.width or info.width


def _load_reference_images(paths: Sequence[str]) -> list[Image.Image]:
    images = []
    for p in paths:
        if not Path(p).is_file():
            raise Flux2LabError(f"reference image {p} does not exist.")
        images.append(Image.open(p).convert("RGB"))
    return images


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(
    pipe: Flux2Pipeline,
    prompts: Sequence[str | Prompt],
    seeds: int | Sequence[int],
    recipe: Recipe,
    *,
    time_steps: bool = False,
    progress: bool = False,
    release_text_encoder: bool = False,
    count_blocks: bool = True,
) -> Generation:
    """Make one image per (prompt, seed) pair with the recipe (applied first if it is not yet).

    `seeds` is one seed for every prompt or one per prompt. With `time_steps`, every denoising step is
    timed (the device is synchronised after each step, which costs a little). With `release_text_encoder`,
    every prompt is encoded up front (`Generation.encode_s`; then not in the images' times) and the text
    encoder is dropped before the first image: for runs that know all their prompts, it frees the encoder's
    memory (44 GiB in BF16 for FLUX.2 [dev]) for the denoising; the images are the same. With `count_blocks`
    (not with CUDA graphs), each record says what fraction of the block stack really ran.
    """
    from tqdm.auto import tqdm

    prompts = [Prompt.of(p) for p in prompts]
    seeds = [seeds] * len(prompts) if isinstance(seeds, int) else list(seeds)
    if len(seeds) != len(prompts):
        raise Flux2LabError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed or one per prompt.")
    if applied_recipe(pipe) != recipe:
        apply(pipe, recipe)
    info = model_info(pipe)
    height, width = resolution(pipe, recipe)
    device = compute_device(pipe)
    encode_s = 0.0
    if release_text_encoder and not info.synthetic_text and pipe.text_encoder is not None:
        start = time.perf_counter()
        encode_prompts(pipe, [p.text for p in prompts])
        encode_s = time.perf_counter() - start
        drop_text_encoder(pipe)
    embeds = getattr(pipe, "flux2lab_prompt_embeds", {})
    counter = BlockCounter(pipe.transformer) if count_blocks and not recipe.cuda_graphs else None
    try:
        images, records = [], []
        for prompt, seed in tqdm(list(zip(prompts, seeds)), desc="images", disable=not progress, unit="img"):
            image, record = _one_image(pipe, prompt, seed, recipe, info, (height, width), device, embeds, counter,
                                       time_steps)
            images.append(image)
            records.append(record)
    finally:
        if counter is not None:
            counter.close()
    return Generation(images=images, records=records, encode_s=encode_s)


def _one_image(pipe: Flux2Pipeline, prompt: Prompt, seed: int, recipe: Recipe, info: Any, size: tuple[int, int],
               device: torch.device, embeds: dict, counter: BlockCounter | None,
               time_steps: bool) -> tuple[Any, ImageRecord]:
    """One pipeline call under the recipe's cache: the image and what happened."""
    height, width = size
    step_ends: list[float] = []

    def on_step_end(_pipe, _i, _t, kwargs):
        if time_steps:
            _sync(device)
            step_ends.append(time.perf_counter())
        return kwargs

    call: dict[str, Any] = {
        "height": height, "width": width, "num_inference_steps": recipe.steps, "guidance_scale": recipe.guidance,
        "generator": torch.Generator(device="cpu").manual_seed(seed), "callback_on_step_end": on_step_end,
    }
    if info.synthetic_text:
        call.update(prompt_embeds=synthetic_prompt_embeds(pipe, prompt.text), output_type="latent")
    else:
        call.update(max_sequence_length=info.max_sequence_length,
                    text_encoder_out_layers=info.text_encoder_out_layers, output_type="pil")
        if prompt.text in embeds:
            call["prompt_embeds"] = embeds[prompt.text].to(device)
        elif pipe.text_encoder is None:
            raise Flux2LabError(
                f"prompt {prompt.text[:60]!r} was not encoded before this pipeline's text encoder was released; "
                "load a fresh pipeline for new prompts (or encode them all before releasing it)."
            )
        else:
            call["prompt"] = prompt.text
        if prompt.images:
            call["image"] = _load_reference_images(prompt.images)
    method = recipe.cache.method
    if method == "teacache":
        teacache.reset_teacache(pipe.transformer)
    # diffusers' caches keep their state per cache_context, which Flux2Pipeline never opens: one per image.
    context = step_caches.step_cache_context(pipe.transformer) if method in DIFFUSERS_METHODS else nullcontext()
    if counter is not None:
        counter.reset()
    _sync(device)
    start = time.perf_counter()
    with context:
        out = pipe(**call).images
    _sync(device)
    wall = time.perf_counter() - start
    step_s = None
    if time_steps:
        # The first step also carries prompt encoding and latent preparation; it is measured from the
        # call's start, which is what a user waits for.
        edges = [start, *step_ends]
        step_s = [b - a for a, b in zip(edges, edges[1:])]
    log = teacache.teacache_log(pipe.transformer) if method == "teacache" else None
    record = ImageRecord(
        prompt=prompt.text, seed=seed, wall_s=wall, step_s=step_s, teacache=log, reference_images=list(prompt.images),
        cache_method=method, computed_fraction=None if counter is None else counter.computed_fraction(),
        step_fractions=None if counter is None else counter.step_fractions())
    return out[0], record
