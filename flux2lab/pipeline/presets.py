"""Named recipes for the command line: `bf16`, `fp8`, `nvfp4`, `teacache`, `taylorseer`, ..., combined with `+`.

`--a bf16 --b nvfp4+teacache@experiments/calibration/x/fit.json` reads better than two JSON files.
A spec is either a recipe JSON file or `+`-joined parts applied in order to a base recipe:

- `bf16` | `fp8` | `nvfp4`: the transformer's precision;
- `te-fp8`: the text encoder in FP8 (what NVIDIA shipped);
- `teacache`: TeaCache with NVIDIA's published FLUX.2 [dev] coefficients and settings;
- `teacache@FIT.json`: TeaCache with the coefficients of a calibration fit;
- `taylorseer[=N]`: diffusers' TaylorSeer, computing every N-th step; `fbc[=X]`: FirstBlockCache at threshold X;
  `seacache[=X]`: SeaCache at threshold X; `magcache@FIT.json`: MagCache with a calibration's magnitude ratios;
- `thresh=X`, `ret=N`, `cutoff=N`, `order=N`, `slope=X`: settings of the cache chosen so far (TeaCache if none).
"""

from __future__ import annotations

import json
from pathlib import Path

from flux2lab.common.errors import Flux2LabError
from flux2lab.common.values import is_number
from flux2lab.pipeline.recipe import Recipe

PRESET_HELP = ("a recipe JSON file, or presets joined by '+': bf16 | fp8 | nvfp4 | te-fp8 | teacache | "
               "teacache@FIT.json | taylorseer[=N] | fbc[=X] | seacache[=X] | magcache@FIT.json | thresh=X | ret=N | "
               "cutoff=N | order=N | slope=X (e.g. nvfp4+teacache@fit.json+thresh=0.3+order=1)")
# Settings a `name=value` part sets on the current cache (TeaCache when none is chosen yet), and their types.
SETTING_PARTS = {"thresh": ("threshold", float), "ret": ("ret_steps", int), "cutoff": ("cutoff_steps", int),
                 "order": ("residual_order", int), "slope": ("residual_slope", float)}


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
        elif name == "teacache":
            fit = {"coefficients": coefficients_from_fit(arg)} if arg else {}
            recipe = recipe.replace(cache={"method": "teacache", **fit})
        elif name == "taylorseer":
            recipe = recipe.replace(cache={"method": "taylorseer",
                                           **({"cache_interval": _number(part, arg, int)} if arg else {})})
        elif name in ("fbc", "seacache"):
            method = "first_block" if name == "fbc" else "seacache"
            recipe = recipe.replace(cache={"method": method, **({"threshold": _number(part, arg, float)} if arg else {})})
        elif name == "magcache":
            if not arg:
                raise Flux2LabError(f"preset '{part}': MagCache needs its calibrated ratios: magcache@FIT.json "
                                    "(python -m flux2lab.calibrate records them).")
            from flux2lab.calibration import mag_ratios_from_fit

            recipe = recipe.replace(cache={"method": "magcache", "mag_ratios": mag_ratios_from_fit(arg)})
        elif name in SETTING_PARTS and arg:
            field, kind = SETTING_PARTS[name]
            method = {"method": "teacache"} if recipe.cache.method == "none" else {}
            recipe = recipe.replace(cache={**method, field: _number(part, arg, kind)})
        else:
            raise Flux2LabError(f"unknown preset '{part}' in '{spec}'; use {PRESET_HELP}.")
    return recipe
