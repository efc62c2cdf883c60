"""User-facing errors.

Everything a user can get wrong (a bad file, field, flag or missing weight) raises `Flux2LabError` with a
message that names the thing and the fix. Commands print that message and exit with status 2 instead of
showing a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class Flux2LabError(Exception):
    """A mistake in input, configuration or environment that the user can fix."""


class FeatureNotAvailable(Flux2LabError):
    """A recipe asks for something this machine (or this build of flux2lab) cannot do."""
