"""flux2lab: make FLUX.2 [dev] fast and prove what the speed costs in image quality."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

# torchao 0.18 registers enums with torch's pytree at import, and torch >= 2.11 logs a deprecation warning for
# each; it says nothing to a flux2lab user and lands before every command's --help.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
# diffusers warns at import that torchao 0.18 lacks tensor classes of older torchao checkpoints; flux2lab never
# loads such checkpoints.
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)


def dist_version(dist: str) -> str | None:
    """An installed distribution's version, or None; records name the software a number came from."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
