"""The whole FLUX.2 [dev] pipeline at full size with random weights (`--whole-pipeline`), timed as NVIDIA did.

`full-random` builds the full-size transformer only; this adds FLUX.2 [dev]'s text encoder (Mistral Small 3.1,
24B) and VAE at full size, so a timed image includes prompt encoding and VAE decode. About 105 GiB in BF16.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from flux2lab.benchmark.provenance import GIB
from flux2lab.common.errors import Flux2LabError
from flux2lab.pipeline.models import default_device, default_dtype, load_pipeline, model_info

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
