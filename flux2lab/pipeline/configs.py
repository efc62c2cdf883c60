"""A FLUX.2 pipeline's configs, read without its weights, and how to call it according to them.

A folder or hub model says how it is called through the configs diffusers and transformers store: the VAE's
`sample_size` is the native resolution, the tokenizer's `model_max_length` caps the text tokens, and the
transformer's `joint_attention_dim` over the text encoder's `hidden_size` is how many hidden states are
stacked. What those do not decide (which layers, when several choices fit) comes from `flux2lab.json`
beside model_index.json (`SETTINGS_FILE`), which `models.save_pipeline` writes only when it is needed.
Everything is checked here before any weight is read, so a wrong folder fails in a second with its name.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKLFlux2, Flux2Pipeline, Flux2Transformer2DModel

from flux2lab.common.errors import Flux2LabError

FLUX2_DEV = "black-forest-labs/FLUX.2-dev"

# flux2lab's settings that diffusers does not store, for a saved pipeline whose configs do not decide them
# (see `call_settings`); written by `save_pipeline` only when needed. Keys: height, width,
# max_sequence_length, text_encoder_out_layers (each optional).
SETTINGS_FILE = "flux2lab.json"
SETTINGS_KEYS = ("height", "width", "max_sequence_length", "text_encoder_out_layers")
# The files a FLUX.2 pipeline folder holds besides weights (what `Flux2Pipeline.save_pretrained` writes).
REQUIRED_FILES = ("model_index.json", "transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                  "text_encoder/config.json", "tokenizer/tokenizer_config.json")


@dataclass(frozen=True)
class PipelineConfigs:
    """A FLUX.2 pipeline's component configs, read without its weights (defaults filled in)."""

    where: str  # the folder or hub id, for messages
    transformer: dict
    vae: dict
    text_encoder: Any  # a transformers PretrainedConfig (Mistral3Config for FLUX.2 [dev])
    text_encoder_class: str  # as named in model_index.json
    tokenizer_max_length: int | None  # the tokenizer's model_max_length
    settings: dict  # flux2lab.json, {} when absent


def _with_defaults(cls: type, config: dict) -> dict:
    """A diffusers config with the class's defaults for keys it leaves out (what `from_config` would use)."""
    defaults = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}


def _call_default(name: str) -> Any:
    """`Flux2Pipeline.__call__`'s default for an argument (FLUX.2 [dev]'s value)."""
    return inspect.signature(Flux2Pipeline.__call__).parameters[name].default


def not_in_cache(source: str) -> Flux2LabError:
    return Flux2LabError(
        f"the weights of '{source}' are not in the Hugging Face cache "
        f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}/hub) and could not be downloaded "
        f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}). Supply them one of two ways: on a "
        f"machine with internet, `hf download {source}` (accept the licence on the model page first) and "
        f"copy the cache here (set HF_HOME to it); or pass the downloaded folder itself, the one holding "
        f"model_index.json, as --model /path/to/folder."
    )


def _json_file(source: str, rel: str, required: bool) -> dict | None:
    """One JSON file of a pipeline folder or hub repo (hub: through the cache, honouring HF_HUB_OFFLINE)."""
    local = Path(source).expanduser()
    if local.exists():
        path = local / rel
        if not path.is_file():
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError

        try:
            path = Path(hf_hub_download(source, rel))
        except (OSError, ValueError, HfHubHTTPError) as e:  # offline, not cached, gated, unknown repo or file
            if required:
                raise not_in_cache(source) from e
            return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Flux2LabError(f"{path} is not valid JSON ({e}); restore it from the original download.") from None
    if not isinstance(data, dict):
        raise Flux2LabError(f"{path} must hold a JSON object; restore it from the original download.")
    return data


def read_configs(source: str) -> PipelineConfigs:
    """The configs of a FLUX.2 diffusers pipeline (folder or hub id), checked before any weight is read."""
    from transformers import AutoConfig

    local = Path(source).expanduser()
    where = str(local) if local.exists() else source
    if local.exists():
        missing = [rel for rel in REQUIRED_FILES if not (local / rel).is_file()]
        if "model_index.json" in missing:
            raise Flux2LabError(
                f"{local} is not a diffusers pipeline folder: it has no model_index.json. Point --model at the "
                f"folder that holds model_index.json (e.g. a download of {FLUX2_DEV}, or a folder written by "
                "Flux2Pipeline.save_pretrained)."
            )
    index = _json_file(source, "model_index.json", required=True)
    if index.get("_class_name") != "Flux2Pipeline":
        raise Flux2LabError(
            f"{where} holds a {index.get('_class_name')!r} pipeline (model_index.json), not a FLUX.2 one "
            "('Flux2Pipeline'); flux2lab runs FLUX.2 [dev]-style pipelines only."
        )
    if local.exists() and missing:
        raise Flux2LabError(
            f"{local} is not a complete FLUX.2 diffusers pipeline: it lacks {', '.join(missing)}. A folder written "
            f"by Flux2Pipeline.save_pretrained, or a full download of {FLUX2_DEV}, has them all."
        )
    te_class = (index.get("text_encoder") or [None, None])[1]
    if te_class is None:
        raise Flux2LabError(f"{where} has no text encoder (model_index.json lists none); flux2lab needs one.")
    transformer = _json_file(source, "transformer/config.json", required=True)
    vae = _json_file(source, "vae/config.json", required=True)
    tokenizer = _json_file(source, "tokenizer/tokenizer_config.json", required=False) or {}
    settings = _json_file(source, SETTINGS_FILE, required=False) or {}
    unknown = sorted(set(settings) - set(SETTINGS_KEYS))
    if unknown:
        raise Flux2LabError(f"{where}/{SETTINGS_FILE}: unknown key(s) {', '.join(unknown)}; allowed: "
                            f"{', '.join(SETTINGS_KEYS)}.")
    try:
        text_encoder = AutoConfig.from_pretrained(where, subfolder="text_encoder")
    except (OSError, ValueError) as e:
        raise Flux2LabError(f"{where}/text_encoder/config.json cannot be read as a transformers config: {e}") from None
    max_length = tokenizer.get("model_max_length")
    return PipelineConfigs(
        where=where, transformer=_with_defaults(Flux2Transformer2DModel, transformer),
        vae=_with_defaults(AutoencoderKLFlux2, vae), text_encoder=text_encoder, text_encoder_class=te_class,
        tokenizer_max_length=max_length if isinstance(max_length, int) else None, settings=settings,
    )


def configs_of(pipe: Flux2Pipeline) -> PipelineConfigs:
    """The same configs, from a loaded pipeline (what `save_pretrained` would write)."""
    tokenizer = getattr(pipe.tokenizer, "tokenizer", pipe.tokenizer)
    return PipelineConfigs(
        where="this pipeline", transformer=dict(pipe.transformer.config), vae=dict(pipe.vae.config),
        text_encoder=pipe.text_encoder.config, text_encoder_class=type(pipe.text_encoder).__name__,
        tokenizer_max_length=getattr(tokenizer, "model_max_length", None), settings={},
    )


def derived_settings(configs: PipelineConfigs) -> dict[str, Any]:
    """How to call the pipeline, from its configs alone (a value is None where they do not decide it).

    - resolution: the VAE's `sample_size` (1024 for FLUX.2 [dev], 64 for `tiny` and `mini`);
    - text tokens: the pipeline's default (512) unless the tokenizer's `model_max_length` is smaller;
    - text-encoder layers: the transformer reads `joint_attention_dim / hidden_size` stacked hidden states.
      The pipeline's default (10, 20, 30) when that count and the encoder's depth allow it (FLUX.2 [dev]:
      3 of 40 layers); every layer when the encoder has exactly that many (`tiny`, `mini`); else undecided.
    """
    size = configs.vae["sample_size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    max_length = _call_default("max_sequence_length")
    if configs.tokenizer_max_length is not None:
        max_length = min(max_length, configs.tokenizer_max_length)
    text = configs.text_encoder.get_text_config()
    stacked, rest = divmod(configs.transformer["joint_attention_dim"], text.hidden_size)
    if rest:
        raise Flux2LabError(
            f"{configs.where}: the transformer's joint_attention_dim ({configs.transformer['joint_attention_dim']}) "
            f"is not a multiple of the text encoder's hidden_size ({text.hidden_size}); the two do not belong "
            "to one FLUX.2 pipeline."
        )
    default_layers = tuple(_call_default("text_encoder_out_layers"))
    layers = None
    if len(default_layers) == stacked and max(default_layers) <= text.num_hidden_layers:
        layers = default_layers
    elif stacked == text.num_hidden_layers:
        layers = tuple(range(1, stacked + 1))
    return {"height": height, "width": width, "max_sequence_length": max_length, "text_encoder_out_layers": layers}


def call_settings(configs: PipelineConfigs) -> dict[str, Any]:
    """`derived_settings`, overridden by the folder's flux2lab.json; an error names what stays undecided."""
    settings = {**derived_settings(configs), **configs.settings}
    text = configs.text_encoder.get_text_config()
    stacked = configs.transformer["joint_attention_dim"] // text.hidden_size
    layers = settings["text_encoder_out_layers"]
    if layers is None:
        raise Flux2LabError(
            f"{configs.where}: which text-encoder layers to stack cannot be read from the configs (the transformer "
            f"takes {stacked} of the encoder's {text.num_hidden_layers}). Write them into {SETTINGS_FILE} beside "
            'model_index.json, e.g. {"text_encoder_out_layers": [...]}, or save the pipeline with '
            "flux2lab.pipeline.models.save_pipeline."
        )
    if (not isinstance(layers, (list, tuple)) or len(layers) != stacked
            or not all(isinstance(n, int) and 0 <= n <= text.num_hidden_layers for n in layers)):
        raise Flux2LabError(
            f"{configs.where}/{SETTINGS_FILE}: text_encoder_out_layers = {layers!r} must list {stacked} layer "
            f"numbers between 0 and {text.num_hidden_layers} (the transformer stacks {stacked} hidden states)."
        )
    settings["text_encoder_out_layers"] = tuple(layers)
    for key in ("height", "width", "max_sequence_length"):
        if not isinstance(settings[key], int) or isinstance(settings[key], bool) or settings[key] < 1:
            raise Flux2LabError(f"{configs.where}: {key} = {settings[key]!r} is not a positive integer "
                                f"(fix it in {SETTINGS_FILE}).")
    return settings
