"""The frozen config: a recipe a serving team can trust and run unchanged.

A frozen config is a recipe plus the model it was calibrated for and where it came from (calibration fit,
study/trial, metrics, date), stored as JSON with a SHA-256 of its canonical form inside. Loading recomputes the
hash and checks the format and schema version, so a file edited by hand, truncated, or written by a newer
flux2lab is refused with a message that says which, instead of silently running something nobody measured.

What the hash protects: it detects accidental edits and corruption, not someone who edits the file and
re-hashes it (the hash needs no secret). For tamper evidence, set `FLUX2LAB_FROZEN_KEY`: `freeze` and `save`
then add an HMAC-SHA256 `signature` over the same content, and loading checks it:

- a config with a signature is verified when the key is set (a wrong key or a re-hashed edit is refused);
  without the key, only its hash is checked;
- a config without a signature is accepted, unless `FLUX2LAB_FROZEN_REQUIRE_SIGNATURE=1` (or
  `load_frozen(..., require_signature=True)`), which refuses it and also requires the key to be set.
  Tamper evidence needs both variables: with the key alone, deleting the `signature` field passes.

    frozen = freeze(recipe, pipe, {"calibration": "experiments/calibration/x/fit.json", "study": "s", "trial": 7,
                                   "metrics": {"lpips": 0.08}})
    frozen.save("experiments/frozen/x.json")
    frozen = load_frozen("experiments/frozen/x.json")   # -> FrozenConfig, verified
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

from flux2lab import __version__
from flux2lab.common.errors import Flux2LabError
from flux2lab.common.files import atomic_write_text
from flux2lab.pipeline.models import ModelInfo
from flux2lab.pipeline.recipe import CacheSettings, Recipe

FORMAT = "flux2lab.frozen"
SCHEMA_VERSION = 2  # 2: the recipe's `cache` field (any step cache); 1 (TeaCache only) is read and migrated
READ_VERSIONS = (1, 2)
PROVENANCE_KEYS = ("calibration", "study", "trial", "metrics", "notes")
REFREEZE_HINT = ("python -m flux2lab.frozen {src} --out NEW.json (re-freezes its recipe and model with this "
                 "flux2lab; the new file records that it was re-frozen)")
KEY_ENV = "FLUX2LAB_FROZEN_KEY"
REQUIRE_ENV = "FLUX2LAB_FROZEN_REQUIRE_SIGNATURE"
SIGNATURE_PREFIX = "hmac-sha256:"
SIGN_HINT = f"{KEY_ENV}=KEY python -m flux2lab.frozen {{src}} --sign --out SIGNED.json"


class FrozenConfigError(Flux2LabError):
    """A frozen config file is missing, malformed, tampered with, or from an unknown schema."""


def canonical_json(data: Any) -> str:
    """The byte-stable form the hash is taken over: sorted keys, no whitespace, floats as Python repr."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def json_sha256(data: Any) -> str:
    """SHA-256 of `data`'s canonical JSON: what a frozen config records, and how reports name a recipe."""
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def signing_key() -> bytes | None:
    """The HMAC key from FLUX2LAB_FROZEN_KEY, or None when it is not set."""
    key = os.environ.get(KEY_ENV)
    if key is None:
        return None
    if not key:
        raise FrozenConfigError(f"{KEY_ENV} is set but empty: give the signing key, or unset it to not sign.")
    return key.encode()


def signature_required(require: bool | None = None) -> bool:
    """`require` if given, else FLUX2LAB_FROZEN_REQUIRE_SIGNATURE (1/true/yes or 0/false/no; unset = no)."""
    if require is not None:
        return require
    value = os.environ.get(REQUIRE_ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise FrozenConfigError(f"{REQUIRE_ENV}={value!r}: use 1 (refuse unsigned configs) or 0.")


def sign(content: Mapping[str, Any], key: bytes) -> str:
    """HMAC-SHA256 of `content`'s canonical JSON (the bytes the sha256 covers), as 'hmac-sha256:<hex>'."""
    return SIGNATURE_PREFIX + hmac.new(key, canonical_json(content).encode(), hashlib.sha256).hexdigest()


def _freeze_json(value: Any) -> Any:
    """Read-only view of JSON data, so a loaded config cannot drift from its hash in memory either."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze_json(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze_json(v) for v in value)
    return value


def _thaw_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw_json(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw_json(v) for v in value]
    return value


@dataclass(frozen=True)
class ModelIdentity:
    """Which weights a config was calibrated for: `source` as loaded, and the revision/checksum where known."""

    source: str
    kind: str | None = None
    revision: str | None = None

    @classmethod
    def of(cls, model: Any) -> ModelIdentity:
        """From a loaded pipeline, a `ModelInfo`, a source string, a dict, or a ModelIdentity."""
        if isinstance(model, ModelIdentity):
            return model
        info = getattr(model, "flux2lab_model", model)
        if isinstance(info, ModelInfo):
            return cls(info.source, info.kind, info.revision)
        if isinstance(model, str):
            return cls(model)
        if isinstance(model, Mapping) and isinstance(model.get("source"), str):
            unknown = set(model) - {"source", "kind", "revision"}
            if unknown:
                raise FrozenConfigError(f"model identity has unknown field(s) {sorted(unknown)}; "
                                        "allowed: source, kind, revision.")
            return cls(model["source"], model.get("kind"), model.get("revision"))
        raise FrozenConfigError(
            f"cannot tell which model {model!r} is: pass the pipeline, its ModelInfo, a source string "
            "('tiny', a hub id, a folder) or {'source': ..., 'revision': ...}."
        )

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "revision": self.revision}


@dataclass(frozen=True)
class FrozenConfig:
    """An immutable, verified recipe with its model identity and provenance. Build with `freeze`/`load_frozen`."""

    recipe: Recipe
    model: ModelIdentity
    provenance: Mapping[str, Any]
    sha256: str
    schema_version: int = SCHEMA_VERSION
    signature: str | None = None
    # The recipe exactly as an older schema stored it: what the hash and signature cover, while `recipe` holds it
    # migrated to this schema (so a version-1 file still verifies and saves byte-for-byte the same content).
    stored_recipe: Mapping[str, Any] | None = None

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]

    def content(self) -> dict[str, Any]:
        """Everything the hash and signature cover (the file minus its `sha256` and `signature` fields)."""
        recipe = self.recipe.to_dict() if self.stored_recipe is None else _thaw_json(self.stored_recipe)
        return {"format": FORMAT, "schema_version": self.schema_version, "recipe": recipe,
                "model": self.model.to_dict(), "provenance": _thaw_json(self.provenance)}

    def to_dict(self) -> dict[str, Any]:
        signature = {"signature": self.signature} if self.signature else {}
        return {**self.content(), "sha256": self.sha256, **signature}

    def save(self, path: str | Path) -> Path:
        """Write the config (atomically); signed with FLUX2LAB_FROZEN_KEY when it is set."""
        path = Path(path)
        key = signing_key()
        data = self.to_dict() if key is None else {**self.to_dict(), "signature": sign(self.content(), key)}
        if path.is_dir():
            raise FrozenConfigError(f"{path} is a folder; give a file name such as {path / 'frozen.json'}.")
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise FrozenConfigError(f"cannot write {path}: {blocker} is a file, not a folder. Choose another path.")
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def model_warnings(self, info: ModelInfo) -> list[str]:
        """Differences between the calibrated model and the loaded one that a user should see (not errors:
        `--model` may point at a local copy of the same weights)."""
        warnings = []
        if info.source != self.model.source:
            warnings.append(f"config {self.short_hash} was calibrated for model '{self.model.source}'; running "
                            f"'{info.source}' instead.")
        if self.model.revision and info.revision and info.revision != self.model.revision:
            warnings.append(f"model revision differs: config has {self.model.revision}, loaded weights are "
                            f"{info.revision}. TeaCache coefficients and quality metrics may not hold.")
        elif self.model.revision and not info.revision:
            warnings.append(f"config expects model revision {self.model.revision}; the loaded weights' revision "
                            "is unknown, so it cannot be checked.")
        return warnings


def calibration_record(fit_path: str | Path, coefficients: Sequence[float] | None = None, *,
                       mag_ratios: Sequence[float] | None = None) -> dict[str, Any]:
    """Provenance of a calibration: the fit file, its checksum, and the calibrated values a cache used (TeaCache's
    coefficients, MagCache's magnitude ratios)."""
    path = Path(fit_path)
    if not path.is_file():
        raise FrozenConfigError(f"calibration fit {path} does not exist; pass the fit.json the values came from.")
    used = {"coefficients": coefficients, "mag_ratios": mag_ratios}
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            **{k: list(v) for k, v in used.items() if v is not None}}


def calibrated_values(cache: CacheSettings) -> dict[str, Any]:
    """What a cache took from a calibration, as `calibration_record` keywords."""
    if cache.method == "teacache":
        return {"coefficients": cache.coefficients}
    if cache.method == "magcache":
        return {"mag_ratios": cache.as_dict().get("mag_ratios")}
    return {}


def _provenance(recipe: Recipe, given: Mapping[str, Any] | None, created: str | None) -> dict[str, Any]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(PROVENANCE_KEYS) - {"refrozen_from"})
    if unknown:
        raise FrozenConfigError(f"provenance has unknown key(s) {unknown}; allowed: {', '.join(PROVENANCE_KEYS)}.")
    cal = given.get("calibration")
    if isinstance(cal, (str, Path)):
        given["calibration"] = calibration_record(cal, **calibrated_values(recipe.cache))
    out = {k: given.get(k) for k in PROVENANCE_KEYS}
    if "refrozen_from" in given:
        out["refrozen_from"] = given["refrozen_from"]
    out["created"] = created or datetime.now(timezone.utc).isoformat(timespec="seconds")
    out["flux2lab_version"] = __version__
    try:
        canonical_json(out)
    except (TypeError, ValueError) as e:
        raise FrozenConfigError(f"provenance must be plain JSON data (numbers finite): {e}.") from None
    return out


def freeze(recipe: Recipe, model: Any, provenance: Mapping[str, Any] | None = None, *,
           created: str | None = None) -> FrozenConfig:
    """Freeze `recipe` for `model` (pipeline, ModelInfo, source string or {'source','revision'}).

    `provenance` may hold: `calibration` (path to fit.json, recorded with its SHA-256 and the recipe's
    coefficients, or a dict), `study`, `trial`, `metrics` (dict), `notes`. `created` (ISO date) and the
    flux2lab version are added.
    """
    if not isinstance(recipe, Recipe):
        raise FrozenConfigError(f"freeze() takes a Recipe, got {type(recipe).__name__}.")
    identity = ModelIdentity.of(model)
    prov = _provenance(recipe, provenance, created)
    unhashed = FrozenConfig(recipe, identity, _freeze_json(prov), sha256="")
    key = signing_key()
    return replace(unhashed, sha256=json_sha256(unhashed.content()),
                   signature=sign(unhashed.content(), key) if key else None)


def _read(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise FrozenConfigError(f"{path} is a folder; give the frozen config or recipe JSON file in it.")
    if not path.is_file():
        raise FrozenConfigError(f"frozen config {path} does not exist.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise FrozenConfigError(f"{path}: not UTF-8 text (byte {e.start}); a frozen config is a JSON file. "
                                "Re-freeze it from its study or recipe.") from None
    except json.JSONDecodeError as e:
        raise FrozenConfigError(f"{path}: not valid JSON ({e}); the file is damaged. Re-freeze it from its "
                                "study or recipe.") from None
    if not isinstance(data, dict):
        raise FrozenConfigError(f"{path}: a frozen config is a JSON object, got {type(data).__name__}.")
    return data


def _check_signature(path: Path, content: dict[str, Any], signature: Any, require: bool) -> None:
    """The module docstring's rule: verify a signature when the key is set; refuse unsigned ones if required."""
    key = signing_key()
    if require and key is None:
        raise FrozenConfigError(f"{REQUIRE_ENV} asks for signed frozen configs, but {KEY_ENV} is not set: set the "
                                f"key the configs were signed with (or unset {REQUIRE_ENV}) to load {path}.")
    if signature is None:
        if require:
            raise FrozenConfigError(f"{path} is not signed, and {REQUIRE_ENV} refuses unsigned frozen configs. "
                                    f"If you trust its content, sign it: {SIGN_HINT.format(src=path)}.")
        return
    if not isinstance(signature, str) or not signature.startswith(SIGNATURE_PREFIX):
        raise FrozenConfigError(f"{path}: field 'signature' must be '{SIGNATURE_PREFIX}<hex>', got {signature!r}; "
                                "the file is damaged. Restore the original.")
    if key is not None and not hmac.compare_digest(signature, sign(content, key)):
        raise FrozenConfigError(
            f"{path}: its signature does not match {KEY_ENV}: either the file was changed and re-hashed after it "
            f"was signed, or it was signed with another key. Use the key it was signed with; otherwise do not "
            f"run it: restore the original, or re-freeze and sign it: {KEY_ENV}=KEY "
            f"{REFREEZE_HINT.format(src=path)}."
        )


def load_frozen(path: str | Path, *, require_signature: bool | None = None) -> FrozenConfig:
    """Read and verify a frozen config: format, schema version, hash, signature, then the recipe's own validation.

    `require_signature` (default: FLUX2LAB_FROZEN_REQUIRE_SIGNATURE) refuses configs without a signature.
    """
    path = Path(path)
    data = _read(path)
    hint = REFREEZE_HINT.format(src=path)
    if data.get("format") != FORMAT:
        what = "a plain recipe" if "transformer_precision" in data else f"format {data.get('format')!r}"
        raise FrozenConfigError(f"{path} is not a frozen config ({what}). Freeze it first: {hint}.")
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        writer = (data.get("provenance") or {}).get("flux2lab_version", "a newer version")
        raise FrozenConfigError(
            f"{path} was written by a newer flux2lab ({writer}, schema_version {version}); this flux2lab "
            f"({__version__}) reads schema_version {SCHEMA_VERSION}. Upgrade flux2lab, or re-freeze the "
            f"recipe with this one: {hint}."
        )
    if version not in READ_VERSIONS:
        raise FrozenConfigError(f"{path}: unknown schema_version {version!r} (this flux2lab reads "
                                f"{', '.join(map(str, READ_VERSIONS))}). Re-freeze it: {hint}.")
    stored = data.get("sha256")
    content = {k: v for k, v in data.items() if k not in ("sha256", "signature")}
    try:
        actual = json_sha256(content)
    except (TypeError, ValueError):
        actual = None
    if stored != actual:
        raise FrozenConfigError(
            f"{path} was modified after it was frozen: its content hashes to {actual}, but the file records "
            f"sha256 {stored}. Frozen configs are not edited by hand (the recipe's metrics were measured for "
            f"the original). Restore the original, or, if the change is intended, re-freeze it: {hint}."
        )
    _check_signature(path, content, data.get("signature"), signature_required(require_signature))
    unknown = sorted(set(content) - {"format", "schema_version", "recipe", "model", "provenance"})
    if unknown:
        raise FrozenConfigError(f"{path}: unknown field(s) {unknown} for schema_version {SCHEMA_VERSION}.")
    recipe = Recipe.from_dict(content.get("recipe"), source=f"{path} (recipe)")
    if not isinstance(content.get("provenance"), dict):
        raise FrozenConfigError(f"{path}: field 'provenance' must be an object.")
    old_recipe = _freeze_json(content["recipe"]) if version != SCHEMA_VERSION else None
    return FrozenConfig(recipe, ModelIdentity.of(content.get("model")), _freeze_json(content["provenance"]),
                        stored, version, data.get("signature"), old_recipe)


def refreeze(path: str | Path, model: Any | None = None) -> FrozenConfig:
    """A new frozen config from a recipe file or an (edited) frozen config, with provenance saying so.

    Metrics of an edited config no longer describe it, so they are dropped; the old hash is kept for the trail.
    """
    path = Path(path)
    data = _read(path)
    if data.get("format") != FORMAT:
        recipe = Recipe.from_dict(data, source=str(path))
        if model is None:
            raise FrozenConfigError(f"{path} is a plain recipe: say which model it is for with --model.")
        return freeze(recipe, model, {"notes": f"frozen from recipe {path}"})
    recipe = Recipe.from_dict(data.get("recipe"), source=f"{path} (recipe)")
    old = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
    prov = {k: old.get(k) for k in ("calibration", "study", "trial", "notes")}
    prov["refrozen_from"] = {"path": str(path), "sha256": data.get("sha256"),
                             "metrics_dropped": old.get("metrics") is not None}
    return freeze(recipe, model if model is not None else data.get("model"), prov)
