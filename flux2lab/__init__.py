"""flux2lab: make FLUX.2 [dev] fast and prove what the speed costs in image quality."""

from __future__ import annotations

__version__ = "0.1.0"


def dist_version(dist: str) -> str | None:
    """An installed distribution's version, or None; records name the software a number came from."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
