"""`mini`: a small FLUX.2 trained on the synthetic world, so quality claims have a real denoiser to stand on.

The stock diffusers/transformers classes at small size: `AutoencoderKLFlux2` (64x64 RGB -> 16x16x8 latents,
patchified by the pipeline to 8x8 tokens of 32 channels), `Flux2Transformer2DModel` (2 double + 4 single
blocks, width 192, guidance embedding), a frozen `Mistral3ForConditionalGeneration` text encoder whose
layers 1-3 are stacked into the prompt embedding, the offline tokenizer, and the scheduler configured as
FLUX.2 [dev]'s (exponential dynamic shifting, mu from the pipeline's `compute_empirical_mu`). Weights live in
`flux2lab/zoo/weights/` (made by `python -m flux2lab.zoo.train`); each file carries its own config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)

from flux2lab.pipeline.models import ModelInfo, build_text_encoder
from flux2lab.zoo import store

RESOLUTION = 64
MAX_SEQUENCE_LENGTH = 64  # the chat-templated prompt: 26 system-prompt tokens + captions of at most 27 words
GUIDANCE = 4.0  # what the pipeline feeds the guidance embedding by default (Recipe.guidance too)

# The shipped sizes, and the much smaller ones of `--smoke` runs (tests, CPU). Both are plain configs of the
# diffusers/transformers classes; the trainer writes the one it used into each weight file.
SIZES = {
    "mini": dict(
        vae=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 64, 128),
            layers_per_block=1,
            latent_channels=8,
            norm_num_groups=16,
            sample_size=RESOLUTION,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=dict(hidden=64, layers=3),
        transformer=dict(
            patch_size=1,
            in_channels=32,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=32,
            num_attention_heads=6,
            joint_attention_dim=3 * 64,
            timestep_guidance_channels=64,
            axes_dims_rope=(8, 8, 8, 8),
        ),
    ),
    "smoke": dict(
        vae=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=RESOLUTION,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=dict(hidden=32, layers=3),
        transformer=dict(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=3 * 32,
            timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4),
        ),
    ),
}


def text_encoder_layers(config: dict) -> tuple[int, ...]:
    """Every layer's output but the embedding's, stacked: joint_attention_dim = layers x hidden."""
    return tuple(range(1, config["layers"] + 1))


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.2 [dev]'s scheduler config: the pipeline shifts the sigmas by mu = compute_empirical_mu(...)."""
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential"
    )


def build_vae(config: dict) -> AutoencoderKLFlux2:
    return AutoencoderKLFlux2(**config)


def build_transformer(config: dict) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(**config)


def build_frozen_text_encoder(config: dict, seed: int = 0):
    from flux2lab.pipeline import tokenizer as tok

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_text_encoder(config["hidden"], config["layers"], tok.VOCAB_SIZE)
    return encoder.eval().requires_grad_(False)


def assemble(
    vae, text_encoder, transformer, text_config: dict, source: str, revision: str | None
) -> Flux2Pipeline:
    """A `Flux2Pipeline` around the parts, with the `ModelInfo` that says how to call it."""
    from flux2lab.pipeline import tokenizer as tok

    processor = tok.build_processor()
    processor.tokenizer.model_max_length = MAX_SEQUENCE_LENGTH  # so a saved `mini` folder is called the same way
    pipe = Flux2Pipeline(
        scheduler=build_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=processor,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.flux2lab_model = ModelInfo(
        source=source,
        kind="builtin",
        height=RESOLUTION,
        width=RESOLUTION,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        text_encoder_out_layers=text_encoder_layers(text_config),
        revision=revision,
    )
    return pipe


def build_mini(device: str, dtype: torch.dtype, folder: str | Path | None = None) -> Flux2Pipeline:
    """The trained `mini` pipeline from its weight files (the shipped ones unless `folder` is given)."""
    paths = {name: store.path_of(name, folder) for name in ("vae", "text_encoder", "transformer")}
    configs = {name: store.read_config(p) for name, p in paths.items()}  # raises if a file is missing
    vae = store.load_into(build_vae(configs["vae"]), paths["vae"])
    text_encoder = store.load_into(build_frozen_text_encoder(configs["text_encoder"]), paths["text_encoder"])
    transformer = store.load_into(build_transformer(configs["transformer"]), paths["transformer"])
    revision = store.checksum(folder, names=tuple(paths))
    pipe = assemble(
        vae.eval(),
        text_encoder,
        transformer.eval(),
        configs["text_encoder"],
        "mini" if folder is None else str(folder),
        revision,
    )
    return pipe.to(device=device, dtype=dtype)
