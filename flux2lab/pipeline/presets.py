"""Named recipes for the command line: `bf16`, `fp8`, `nvfp4`, `teacache`, combined with `+`.

`--a bf16 --b nvfp4+teacache@experiments/calibration/x/fit.json` reads better than two JSON files.
A spec is either a recipe JSON file or `+`-joined parts applied in order to a base recipe:

- `bf16` | `fp8` | `nvfp4`: the transformer's precision;
- `te-fp8`: the text encoder in FP8 (what NVIDIA shipped);
- `teacache`: TeaCache with NVIDIA's published FLUX.2 [dev] coefficients and settings;
- `teacache@FIT.json`: TeaCache with the coefficients of a calibration fit;
- `thresh=X`, `ret=N`, `cutoff=N`: TeaCache settings.
"""

from __future__ import annotations

import json
from pathlib import Path

from flux2lab.common.errors import Flux2LabError
from flux2lab.pipeline.recipe import Recipe, is_number

PRESET_HELP = ("a recipe JSON file, or presets joined by '+': bf16 | fp8 | nvfp4 | te-fp8 | teacache | "
               "teacache@FIT.json | thresh=X | ret=N | cutoff=N (e.g. nvfp4+teacache@fit.json+thresh=0.3)")


def coefficients_from_fit(path: str | Path) -> tuple[float, ...]:
    """The polynomial a calibration wrote to fit.json (highest degree first)."""
    path = Path(path)
    if path.is_dir():
        raise Flux2LabError(f"calibration fit {path} is a folder; give the fit.json in it.")
    if not path.is_file():
        raise Flux2LabError(f"calibration fit {path} does not exist; make one with python -m flux2lab.calibrate.")
    try:
        coeffs = json.loads(path.read_text(encoding="utf-8"))["coefficients"]
    except UnicodeDecodeError:
        raise Flux2LabError(f"{path}: not UTF-8 text, so not a calibration fit; re-run calibrate.") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise Flux2LabError(f"{path}: not a calibration fit (no 'coefficients' list); re-run calibrate.") from None
    if not isinstance(coeffs, list) or not coeffs or not all(is_number(c) for c in coeffs):
        raise Flux2LabError(f"{path}: 'coefficients' must be a non-empty list of finite numbers (highest degree "
                            f"first), got {coeffs!r}; re-run calibrate.")
    return tuple(float(c) for c in coeffs)


def _number(part: str, value: str, kind: type):
    try:
        return kind(value)
    except ValueError:
        raise Flux2LabError(f"preset part '{part}': {value!r} is not a valid {kind.__name__}.") from None


def resolve_recipe(spec: str, base: Recipe | None = None) -> Recipe:
    """Turn a preset spec (or a recipe file path) into a Recipe built on `base`."""
    base = base or Recipe()
    if spec.endswith(".json") and "@" not in spec:
        return Recipe.load(spec)
    recipe = base
    for part in spec.split("+"):
        name, _, arg = part.partition("@") if "@" in part else part.partition("=")
        if part in ("bf16", "fp8", "nvfp4"):
            recipe = recipe.replace(transformer_precision=part)
        elif part == "te-fp8":
            recipe = recipe.replace(text_encoder_precision="fp8")
        elif part == "teacache":
            recipe = recipe.replace(teacache={"enabled": True})
        elif name == "teacache" and arg:
            recipe = recipe.replace(teacache={"enabled": True, "coefficients": coefficients_from_fit(arg)})
        elif name == "thresh":
            recipe = recipe.replace(teacache={"threshold": _number(part, arg, float)})
        elif name == "ret":
            recipe = recipe.replace(teacache={"ret_steps": _number(part, arg, int)})
        elif name == "cutoff":
            recipe = recipe.replace(teacache={"cutoff_steps": _number(part, arg, int)})
        else:
            raise Flux2LabError(f"unknown preset '{part}' in '{spec}'; use {PRESET_HELP}.")
    return recipe
