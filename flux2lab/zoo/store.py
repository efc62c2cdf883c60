"""The zoo's weight files: one safetensors file per network, with the config that builds it inside.

Keeping the config in the file's metadata makes each file self-describing (a smoke run's small networks and
the shipped ones load the same way) and keeps the shipped set to one file per network.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flux2lab.common.errors import Flux2LabError

WEIGHTS_DIR = Path(__file__).parent / "weights"  # the shipped weights
TRAIN_COMMAND = "python -m flux2lab.zoo.train --out flux2lab/zoo/weights"
FILES = ("vae", "transformer", "text_encoder", "yardstick")


def path_of(name: str, folder: str | Path | None = None) -> Path:
    return Path(folder or WEIGHTS_DIR) / f"{name}.safetensors"


def save(module: torch.nn.Module, path: str | Path, config: dict) -> Path:
    """Floating-point weights as float16 (half the bytes; these small networks lose nothing measurable)."""
    state = {
        k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in module.state_dict().items()
    }
    # Tied weights (a text encoder's embedding and head) are one tensor twice; safetensors wants them apart.
    seen: set[int] = set()
    for k, v in state.items():
        if v.data_ptr() in seen:
            state[k] = v.clone()
        seen.add(v.data_ptr())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"config": json.dumps(config)})
    return path


def missing_error(path: Path) -> Flux2LabError:
    return Flux2LabError(
        f"the trained weights of the mini model are missing: {path} does not exist. They ship with flux2lab "
        f"(flux2lab/zoo/weights/); in a checkout without them, train them with `{TRAIN_COMMAND}` (about 8 "
        "minutes on one H100), or give the folder that holds them."
    )


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise missing_error(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise Flux2LabError(f"{path} is not a safetensors weight file ({e}); give a file written by "
                            "flux2lab.zoo (or the folder holding them).") from None
    if "config" not in meta:
        raise Flux2LabError(f"{path} has no config in its metadata; it was not written by flux2lab.zoo.")
    return json.loads(meta["config"])


def load_into(module: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Fill `module` (built from `read_config(path)`) with the file's weights, in the module's dtype."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = module.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    module.load_state_dict(state, strict=True)
    return module


def checksum(folder: str | Path | None = None, names: tuple[str, ...] = FILES) -> str:
    """One short hash over the weight files: the `revision` of a zoo model in reports."""
    h = hashlib.sha256()
    for name in names:
        h.update(path_of(name, folder).read_bytes())
    return "sha256:" + h.hexdigest()[:16]
