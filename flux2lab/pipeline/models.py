"""One loader for every model flux2lab runs on.

- `tiny`: a FLUX.2 pipeline of the real diffusers/transformers classes at toy size, random weights, built
  offline in seconds; every code path runs on it on a CPU.
- `mini`: the same classes at small size, *trained* on flux2lab's synthetic world (`flux2lab.zoo`), so quality
  can be measured against ground truth offline; its weights ship in flux2lab/zoo/weights/.
- `full-random`: the full-size FLUX.2 [dev] transformer with random weights and synthetic prompt
  embeddings of the real shape, for speed measurements (time per step does not depend on weight values).
- a hub id or local folder: the real `Flux2Pipeline.from_pretrained`, called as its own configs say
  (`flux2lab.pipeline.configs`); `save_pipeline` writes a folder that loads back called the same way.

Each pipeline carries a `ModelInfo` (`pipe.flux2lab_model`) with how to call it (sequence length, text
encoder layers, native resolution) and its identity for provenance.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel

from flux2lab.common.errors import Flux2LabError
from flux2lab.pipeline.configs import (
    SETTINGS_FILE,
    SETTINGS_KEYS,
    call_settings,
    configs_of,
    derived_settings,
    not_in_cache,
    read_configs,
)


@dataclass(frozen=True)
class ModelInfo:
    """How to call a loaded model and what it is (for provenance and reports)."""

    source: str  # what the user asked for: "tiny", "full-random", a hub id or a folder
    kind: str  # "builtin", "full-random" or "pretrained"
    height: int  # native resolution
    width: int
    max_sequence_length: int
    text_encoder_out_layers: tuple[int, ...]
    revision: str | None = None  # hub commit or weight checksum where known
    synthetic_text: bool = False  # no text encoder/VAE: prompts become seeded embeddings, output is latents


# The full-size FLUX.2 [dev] transformer is diffusers' default Flux2Transformer2DModel config (a test checks
# its 8 + 48 blocks and 32.2B parameters); the real model reads 512 text tokens.
FULL_TEXT_TOKENS = 512

TINY_TRANSFORMER = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=64, timestep_guidance_channels=64, axes_dims_rope=(4, 4, 4, 4),
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
    latent_channels=4, norm_num_groups=8, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
)
TINY_TEXT_HIDDEN = 32
TINY_TEXT_LAYERS = (1, 2)  # hidden states stacked into the prompt embedding (2 x 32 = joint_attention_dim)
TINY_TEXT_TOKENS = 64  # the tokenizer's model_max_length, so a saved `tiny` is called the same way


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """BF16 on GPUs (as deployed); float32 on CPU, where bf16 matmuls are slow and gain nothing."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def build_text_encoder(hidden: int, layers: int, vocab_size: int):
    """A small `Mistral3ForConditionalGeneration` (text + Pixtral vision tower) from a config."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from flux2lab.pipeline import tokenizer as tok

    config = Mistral3Config(
        text_config={
            "model_type": "mistral", "vocab_size": vocab_size, "hidden_size": hidden,
            "intermediate_size": hidden * 2, "max_position_embeddings": 1024, "num_attention_heads": 4,
            "num_hidden_layers": layers, "num_key_value_heads": 2, "head_dim": hidden // 4, "rms_norm_eps": 1e-5,
            "sliding_window": None, "bos_token_id": tok.BOS_ID, "eos_token_id": tok.EOS_ID,
            "pad_token_id": tok.PAD_ID,
        },
        vision_config={
            "model_type": "pixtral", "hidden_size": hidden, "num_hidden_layers": 1, "num_attention_heads": 4,
            "intermediate_size": hidden * 2, "image_size": tok.IMAGE_SIZE, "patch_size": tok.PATCH_SIZE,
            "num_channels": 3, "head_dim": hidden // 4,
        },
        image_token_index=tok.IMAGE_TOKEN_ID, spatial_merge_size=1, vision_feature_layer=-1,
        bos_token_id=tok.BOS_ID, eos_token_id=tok.EOS_ID, pad_token_id=tok.PAD_ID,
    )
    return Mistral3ForConditionalGeneration(config)


def build_tiny(device: str, dtype: torch.dtype, seed: int = 0) -> Flux2Pipeline:
    """The `tiny` pipeline: real classes, toy sizes, random weights fixed by `seed`."""
    from flux2lab.pipeline import tokenizer as tok

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(**TINY_TRANSFORMER)
        vae = AutoencoderKLFlux2(**TINY_VAE)
        text_encoder = build_text_encoder(TINY_TEXT_HIDDEN, max(TINY_TEXT_LAYERS), tok.VOCAB_SIZE)
    processor = tok.build_processor()
    processor.tokenizer.model_max_length = TINY_TEXT_TOKENS
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=processor,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.flux2lab_model = ModelInfo(
        source="tiny", kind="builtin", height=TINY_VAE["sample_size"], width=TINY_VAE["sample_size"],
        max_sequence_length=TINY_TEXT_TOKENS, text_encoder_out_layers=TINY_TEXT_LAYERS,
    )
    # Built in float32; cast only when another dtype is asked for (diffusers warns on every cast).
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)


def build_transformer_on_meta(**config) -> Flux2Transformer2DModel:
    """The transformer's module tree without memory: for counting, layer selection and later materialising."""
    with torch.device("meta"):
        return Flux2Transformer2DModel(**config)


RANDOM_INIT_STD = 0.02


def materialize_random(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype,
                       seed: int = 0) -> torch.nn.Module:
    """Give a meta-device module real storage on `device`, filled in place with N(0, RANDOM_INIT_STD) values.

    Random init on the target device (not CPU then copy) keeps 32B parameters to seconds; diffusers'
    own init would run the per-layer initialisers on CPU first.
    """
    module = module.to(dtype).to_empty(device=device)  # cast on meta first: no float32 copy (129 GB for 32B)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, RANDOM_INIT_STD, generator=gen)
        for b in module.buffers():
            if b.is_floating_point():
                b.zero_()
    return module


def build_full_random(device: str, dtype: torch.dtype, seed: int = 0) -> Flux2Pipeline:
    """The full-size FLUX.2 [dev] transformer with random weights; no text encoder, no VAE."""
    if torch.device(device).type != "cuda":
        raise Flux2LabError(
            "model 'full-random' (the 32.2B-parameter FLUX.2 [dev] transformer, 60 GiB in BF16) needs a CUDA "
            "GPU with about 64 GiB free; this machine has none. Use --model tiny on CPU."
        )
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    need = 32.3e9 * torch.finfo(dtype).bits / 8
    if free < need:
        raise Flux2LabError(
            f"model 'full-random' needs {need / 2**30:.0f} GiB of GPU memory in {dtype}; {device} has "
            f"{free / 2**30:.0f} GiB free. Use a larger GPU (H100 80 GB / H200) or free the memory."
        )
    transformer = materialize_random(build_transformer_on_meta(), device, dtype, seed)
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.flux2lab_model = ModelInfo(
        source="full-random", kind="full-random", height=1024, width=1024,
        max_sequence_length=FULL_TEXT_TOKENS, text_encoder_out_layers=(10, 20, 30), synthetic_text=True,
    )
    return pipe


def _revision_of(folder: Path) -> str | None:
    """Hub snapshot folders are named by commit; for other folders, a checksum of the model index."""
    if folder.parent.name == "snapshots":
        return folder.name
    index = folder / "model_index.json"
    return "sha256:" + hashlib.sha256(index.read_bytes()).hexdigest()[:16] if index.is_file() else None


def save_pipeline(pipe: Flux2Pipeline, folder: str | Path) -> Path:
    """`save_pretrained`, plus flux2lab.json for the call settings the saved configs do not decide by themselves,
    so `load_pipeline(folder)` calls the model as this pipeline is called."""
    folder = Path(folder)
    pipe.save_pretrained(folder)
    info = model_info(pipe)
    derived = derived_settings(configs_of(pipe))
    extra = {k: getattr(info, k) for k in SETTINGS_KEYS if derived[k] != getattr(info, k)}
    if extra:
        (folder / SETTINGS_FILE).write_text(json.dumps(extra, indent=2) + "\n")
    return folder


def load_pretrained(source: str, device: str, dtype: torch.dtype) -> Flux2Pipeline:
    """`Flux2Pipeline.from_pretrained`, called as its own configs say, with one clear error if absent."""
    configs = read_configs(source)
    settings = call_settings(configs)
    local = Path(source).expanduser()
    try:
        pipe = Flux2Pipeline.from_pretrained(configs.where, dtype=dtype)
    except (OSError, ValueError) as e:
        if local.exists():
            raise Flux2LabError(f"could not load the FLUX.2 pipeline from {local}: {e}") from None
        raise not_in_cache(source) from None
    snapshot = Path(getattr(pipe, "config", {}).get("_name_or_path", "") or source)
    pipe.flux2lab_model = ModelInfo(
        source=source, kind="pretrained", **settings,
        revision=_revision_of(snapshot) if snapshot.exists() else None,
    )
    return pipe.to(device)


def build_mini(device: str, dtype: torch.dtype) -> Flux2Pipeline:
    """`mini`: FLUX.2 at small size, trained on flux2lab's synthetic world (flux2lab.zoo, imported on use)."""
    from flux2lab.zoo.mini import build_mini as build

    return build(device, dtype)


BUILTIN: dict[str, Callable[[str, torch.dtype], Flux2Pipeline]] = {
    "tiny": build_tiny,
    "mini": build_mini,
    "full-random": build_full_random,
}


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_of(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype from its command-line name (bf16 | fp16 | fp32); torch dtypes and None pass through."""
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name


def check_source(source: str) -> None:
    """Refuse, before any work, a model that is neither built in, an existing folder, nor a hub id (owner/name);
    whether a hub model's weights are at hand is found when it loads."""
    if source in BUILTIN or Path(source).expanduser().exists() or HUB_ID.fullmatch(source):
        return
    if any(sep in source for sep in ("/", "\\")) or source.startswith(("~", ".")):
        raise Flux2LabError(f"model folder {source} does not exist; check --model (the folder holding "
                            "model_index.json).")
    raise Flux2LabError(f"model {source!r} is unknown: not a built-in model ({', '.join(BUILTIN)}), an existing folder "
                        "or a hub id (owner/name, e.g. black-forest-labs/FLUX.2-dev); check --model.")


def load_pipeline(source: str, device: str | None = None, dtype: str | torch.dtype | None = None, *,
                  staged: bool = False) -> Flux2Pipeline:
    """Load a FLUX.2 pipeline: `tiny`, `mini`, `full-random`, a hub id, or a local diffusers folder.

    `staged`: keep the weights in host memory for now; `core.apply` then moves one component at a time to
    `device`, quantizing it there (so at most one component is on the card in BF16), or hands them to the
    recipe's offloading. `full-random` (the transformer alone) is always built on `device`.
    """
    check_source(source)
    device = device or default_device()
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise Flux2LabError(f"device '{device}' was asked for, but this machine has no CUDA GPU. Use --device cpu.")
    dtype = dtype_of(dtype) or default_dtype(device)
    where = "cpu" if staged and source != "full-random" else device
    pipe = BUILTIN[source](where, dtype) if source in BUILTIN else load_pretrained(source, where, dtype)
    return compute_on(pipe, device)


def compute_on(pipe: Flux2Pipeline, device: str | torch.device) -> Flux2Pipeline:
    """Say which device the pipeline computes on; `core.apply` moves weights held in host memory there."""
    pipe.flux2lab_device = torch.device(device)
    return pipe


def compute_device(pipe: Flux2Pipeline) -> torch.device:
    """The device the pipeline computes on, wherever staging or offloading keeps its weights meanwhile."""
    return getattr(pipe, "flux2lab_device", None) or pipe._execution_device


def free_memory() -> None:
    """Give a dropped pipeline's memory back before the next one loads (two full-size models do not fit one
    card): collect it, then return the CUDA caching allocator's free blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_info(pipe: Flux2Pipeline) -> ModelInfo:
    info = getattr(pipe, "flux2lab_model", None)
    if info is None:
        raise Flux2LabError("this pipeline was not loaded with flux2lab.pipeline.models.load_pipeline; load it there.")
    return info


def image_tokens(pipe: Flux2Pipeline, height: int, width: int) -> int:
    """Image tokens the transformer sees at height x width."""
    per_side = pipe.vae_scale_factor * 2  # VAE downsampling, then 2x2 patch packing
    return (height // per_side) * (width // per_side)
