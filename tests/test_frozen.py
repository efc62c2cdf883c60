"""Frozen configs: what is frozen comes back identical, and anything else is refused with the reason."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from flux2lab.common.errors import Flux2LabError
from flux2lab.frozen import main
from flux2lab.pipeline.frozen import (
    FORMAT,
    SCHEMA_VERSION,
    FrozenConfigError,
    ModelIdentity,
    canonical_json,
    freeze,
    load_frozen,
)
from flux2lab.pipeline.models import ModelInfo
from flux2lab.pipeline.recipe import Recipe

RECIPE = Recipe(steps=20, height=512, width=512).replace(
    cache={"method": "teacache", "threshold": 0.08, "ret_steps": 4})


@pytest.fixture
def fit(tmp_path):
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"coefficients": [1.0, 2.0, 3.0, 4.0]}))
    return path


@pytest.fixture
def frozen_file(tmp_path, fit):
    f = freeze(RECIPE, {"source": "black-forest-labs/FLUX.2-dev", "revision": "abc123"},
               {"calibration": str(fit), "study": "flux2-search", "trial": 17, "metrics": {"lpips": 0.07, "speedup": 1.9}})
    return f.save(tmp_path / "frozen" / "x.json")


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def test_round_trip_keeps_recipe_model_provenance_and_hash(frozen_file, fit):
    data = json.loads(frozen_file.read_text())
    assert data["format"] == FORMAT and data["schema_version"] == SCHEMA_VERSION
    # The stored hash is the SHA-256 of the canonical JSON of everything but itself.
    body = {k: v for k, v in data.items() if k != "sha256"}
    assert data["sha256"] == hashlib.sha256(canonical_json(body).encode()).hexdigest()

    f = load_frozen(frozen_file)
    assert f.recipe == RECIPE
    assert f.model == ModelIdentity("black-forest-labs/FLUX.2-dev", None, "abc123")
    assert f.sha256 == data["sha256"] and f.short_hash == data["sha256"][:12]
    cal = f.provenance["calibration"]
    assert cal["sha256"] == hashlib.sha256(fit.read_bytes()).hexdigest()
    assert list(cal["coefficients"]) == list(RECIPE.cache.coefficients)
    assert f.provenance["trial"] == 17 and f.provenance["metrics"]["lpips"] == 0.07
    assert f.provenance["created"] and f.provenance["flux2lab_version"]
    # Saving again writes the same bytes: the file is canonical.
    again = f.save(frozen_file.parent / "again.json")
    assert again.read_text() == frozen_file.read_text()


def test_frozen_config_is_immutable(frozen_file):
    f = load_frozen(frozen_file)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.recipe = Recipe()
    with pytest.raises(TypeError):
        f.provenance["metrics"]["lpips"] = 0.0
    with pytest.raises(TypeError):
        f.provenance["trial"] = 3


def test_hash_depends_on_recipe_and_model_only_through_content():
    prov = {"study": "s"}
    a = freeze(RECIPE, "tiny", prov, created="2026-01-01T00:00:00+00:00")
    b = freeze(RECIPE, "tiny", prov, created="2026-01-01T00:00:00+00:00")
    c = freeze(RECIPE.replace(cache={"threshold": 0.09}), "tiny", prov, created="2026-01-01T00:00:00+00:00")
    assert a.sha256 == b.sha256 != c.sha256


def test_tampered_config_is_refused_with_how_to_refreeze(frozen_file):
    _edit(frozen_file, lambda d: d["recipe"]["cache"].__setitem__("threshold", 0.2))
    with pytest.raises(FrozenConfigError, match="modified after it was frozen") as e:
        load_frozen(frozen_file)
    assert "re-freeze" in str(e.value) and "python -m flux2lab.frozen" in str(e.value)


def test_removed_hash_is_refused(frozen_file):
    _edit(frozen_file, lambda d: d.pop("sha256"))
    with pytest.raises(FrozenConfigError, match="modified after it was frozen"):
        load_frozen(frozen_file)


def test_newer_schema_is_refused_naming_the_versions(frozen_file):
    _edit(frozen_file, lambda d: d.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(FrozenConfigError, match="newer flux2lab") as e:
        load_frozen(frozen_file)
    assert f"schema_version {SCHEMA_VERSION + 1}" in str(e.value) and "Upgrade flux2lab" in str(e.value)


@pytest.mark.parametrize("version", [0, "1", None])
def test_unknown_schema_is_refused(frozen_file, version):
    _edit(frozen_file, lambda d: d.update(schema_version=version))
    with pytest.raises(FrozenConfigError, match="unknown schema_version"):
        load_frozen(frozen_file)


def test_plain_recipe_and_broken_files_are_refused(tmp_path):
    recipe = RECIPE.save(tmp_path / "recipe.json")
    with pytest.raises(FrozenConfigError, match="plain recipe"):
        load_frozen(recipe)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FrozenConfigError, match="not valid JSON"):
        load_frozen(tmp_path / "bad.json")
    with pytest.raises(FrozenConfigError, match="does not exist"):
        load_frozen(tmp_path / "missing.json")


def test_freeze_checks_its_inputs(tmp_path):
    with pytest.raises(FrozenConfigError, match="unknown key"):
        freeze(RECIPE, "tiny", {"trail": 3})
    with pytest.raises(FrozenConfigError, match="does not exist"):
        freeze(RECIPE, "tiny", {"calibration": str(tmp_path / "nofit.json")})
    with pytest.raises(FrozenConfigError, match="plain JSON"):
        freeze(RECIPE, "tiny", {"metrics": {"fid": float("nan")}})
    with pytest.raises(FrozenConfigError, match="cannot tell which model"):
        freeze(RECIPE, 42)


def test_model_identity_from_loaded_model_and_revision_warnings():
    info = ModelInfo(source="/data/flux2", kind="pretrained", height=1024, width=1024, max_sequence_length=512,
                     text_encoder_out_layers=(10, 20, 30), revision="abc123")
    f = freeze(RECIPE, info)
    assert f.model == ModelIdentity("/data/flux2", "pretrained", "abc123")
    assert f.model_warnings(info) == []
    local_copy = dataclasses.replace(info, source="/mnt/copy")
    assert len(f.model_warnings(local_copy)) == 1  # another path to the same revision: only noted
    other = dataclasses.replace(info, revision="fff000")
    assert any("revision differs" in w for w in f.model_warnings(other))


def test_refreeze_an_edited_config_records_where_it_came_from(frozen_file, tmp_path, capsys):
    old_sha = json.loads(frozen_file.read_text())["sha256"]
    _edit(frozen_file, lambda d: d["recipe"].__setitem__("steps", 28))
    assert main([str(frozen_file), "--out", str(tmp_path / "new.json")]) == 0
    new = load_frozen(tmp_path / "new.json")
    assert new.recipe.steps == 28 and new.model.revision == "abc123"
    assert new.provenance["refrozen_from"]["sha256"] == old_sha
    assert new.provenance["refrozen_from"]["metrics_dropped"] is True and new.provenance["metrics"] is None
    assert new.provenance["trial"] == 17
    assert main([str(tmp_path / "new.json"), "--check"]) == 0
    assert "OK" in capsys.readouterr().out


def test_freeze_a_plain_recipe_from_the_command_line(tmp_path):
    recipe = RECIPE.save(tmp_path / "recipe.json")
    with pytest.raises(FrozenConfigError, match="--model"):
        main([str(recipe), "--out", str(tmp_path / "f.json")])
    main([str(recipe), "--out", str(tmp_path / "f.json"), "--model", "tiny"])
    assert load_frozen(tmp_path / "f.json").model.source == "tiny"


KEY = "team-secret"


def test_a_rehashed_edit_passes_the_hash_but_not_the_signature(frozen_file, monkeypatch):
    # The SHA-256 needs no secret: an edit that recomputes it loads. Signed with a key, the edit is caught.
    def rehash(d, threshold=0.2):
        d["recipe"]["cache"]["threshold"] = threshold
        d["sha256"] = hashlib.sha256(canonical_json({k: v for k, v in d.items()
                                                     if k not in ("sha256", "signature")}).encode()).hexdigest()

    _edit(frozen_file, rehash)
    assert load_frozen(frozen_file).recipe.cache.threshold == 0.2

    monkeypatch.setenv("FLUX2LAB_FROZEN_KEY", KEY)
    signed = load_frozen(frozen_file).save(frozen_file.parent / "signed.json")
    assert json.loads(signed.read_text())["signature"].startswith("hmac-sha256:")
    assert load_frozen(signed).signature == json.loads(signed.read_text())["signature"]
    _edit(signed, lambda d: rehash(d, threshold=0.3))
    with pytest.raises(FrozenConfigError, match="signature does not match FLUX2LAB_FROZEN_KEY") as e:
        load_frozen(signed)
    assert str(signed) in str(e.value) and "re-freeze" in str(e.value)


def test_freeze_signs_and_a_wrong_key_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLUX2LAB_FROZEN_KEY", KEY)
    path = freeze(RECIPE, "tiny").save(tmp_path / "f.json")
    data = json.loads(path.read_text())
    assert data["signature"].startswith("hmac-sha256:")
    assert load_frozen(path).recipe == RECIPE
    # The signature is outside what the hash covers: the hash of a signed file is the unsigned one's.
    assert data["sha256"] == hashlib.sha256(canonical_json(
        {k: v for k, v in data.items() if k not in ("sha256", "signature")}).encode()).hexdigest()
    monkeypatch.setenv("FLUX2LAB_FROZEN_KEY", "another-key")
    with pytest.raises(FrozenConfigError, match="signed with another key") as e:
        load_frozen(path)
    assert str(path) in str(e.value)
    # Without the key, only the hash is checked, and --check says so.
    monkeypatch.delenv("FLUX2LAB_FROZEN_KEY")
    assert load_frozen(path).signature == data["signature"]
    assert main([str(path), "--check"]) == 0
    assert "signature not checked" in capsys.readouterr().out


def test_require_signature_refuses_unsigned_and_keyless(tmp_path, monkeypatch, capsys):
    unsigned = freeze(RECIPE, "tiny").save(tmp_path / "unsigned.json")
    assert "signature" not in json.loads(unsigned.read_text())
    monkeypatch.setenv("FLUX2LAB_FROZEN_REQUIRE_SIGNATURE", "1")
    with pytest.raises(FrozenConfigError, match="FLUX2LAB_FROZEN_KEY is not set"):
        load_frozen(unsigned)
    monkeypatch.setenv("FLUX2LAB_FROZEN_KEY", KEY)
    with pytest.raises(FrozenConfigError, match="not signed") as e:
        load_frozen(unsigned)
    assert "--sign" in str(e.value) and str(unsigned) in str(e.value)
    assert load_frozen(unsigned, require_signature=False).recipe == RECIPE
    # The fix the message names: sign the config as it is (same content, same sha256).
    assert main([str(unsigned), "--sign", "--out", str(tmp_path / "signed.json")]) == 0
    signed = load_frozen(tmp_path / "signed.json")
    assert signed.sha256 == json.loads(unsigned.read_text())["sha256"] and signed.signature
    assert main([str(tmp_path / "signed.json"), "--check"]) == 0
    assert "signature verified" in capsys.readouterr().out
    monkeypatch.setenv("FLUX2LAB_FROZEN_REQUIRE_SIGNATURE", "maybe")
    with pytest.raises(FrozenConfigError, match="FLUX2LAB_FROZEN_REQUIRE_SIGNATURE"):
        load_frozen(tmp_path / "signed.json")
    monkeypatch.delenv("FLUX2LAB_FROZEN_REQUIRE_SIGNATURE")
    monkeypatch.setenv("FLUX2LAB_FROZEN_KEY", "")
    with pytest.raises(FrozenConfigError, match="set but empty"):
        load_frozen(tmp_path / "signed.json")


def test_damaged_signature_field_is_refused(tmp_path, monkeypatch):
    path = freeze(RECIPE, "tiny").save(tmp_path / "f.json")
    _edit(path, lambda d: d.update(signature=42))
    with pytest.raises(FrozenConfigError, match="field 'signature'"):
        load_frozen(path)


def test_frozen_command_does_not_overwrite_silently(tmp_path, monkeypatch):
    recipe = RECIPE.save(tmp_path / "recipe.json")
    out = tmp_path / "f.json"
    out.write_text("keep me")
    with pytest.raises(Flux2LabError, match="already exists.*--force"):
        main([str(recipe), "--out", str(out), "--model", "tiny"])
    assert out.read_text() == "keep me"
    assert main([str(recipe), "--out", str(out), "--model", "tiny", "--force"]) == 0
    assert load_frozen(out).model.source == "tiny"
    with pytest.raises(Flux2LabError, match="--sign needs the signing key"):
        main([str(out), "--sign", "--out", str(tmp_path / "s.json")])
    with pytest.raises(FrozenConfigError, match="is a folder"):
        main([str(recipe), "--out", str(tmp_path), "--model", "tiny"])
    with pytest.raises(FrozenConfigError, match="is a file, not a folder"):
        main([str(recipe), "--out", str(out / "x.json"), "--model", "tiny"])


# --- schema 2: the cache field; version-1 files still verify and run -----------------------------------------------

V1_FROZEN = Path(__file__).resolve().parents[1] / "reports" / "mini" / "search" / "frozen.json"


def test_a_version_1_frozen_config_verifies_and_migrates(tmp_path):
    f = load_frozen(V1_FROZEN)
    assert f.schema_version == 1
    raw = json.loads(V1_FROZEN.read_text())
    assert f.recipe.cache.method == "teacache"  # migrated: TeaCache was version 1's only cache
    assert list(f.recipe.cache.coefficients) == raw["recipe"]["teacache"]["coefficients"]
    assert f.recipe.cache.threshold == raw["recipe"]["teacache"]["threshold"]
    assert f.content()["recipe"] == raw["recipe"]  # the hash still covers the file's own (version-1) content
    copy = f.save(tmp_path / "copy.json")
    assert json.loads(copy.read_text())["sha256"] == raw["sha256"] and load_frozen(copy).recipe == f.recipe


def test_a_version_1_recipe_with_teacache_off_runs_uncached():
    r = Recipe.from_dict({"schema_version": 1, "steps": 8, "teacache": {"enabled": False, "threshold": 0.3}})
    assert r.cache.method == "none" and r.to_dict()["schema_version"] == 2


def test_an_edited_version_1_config_is_still_refused(tmp_path):
    data = json.loads(V1_FROZEN.read_text())
    data["recipe"]["teacache"]["threshold"] = 0.5
    (tmp_path / "edited.json").write_text(json.dumps(data))
    with pytest.raises(FrozenConfigError, match="modified after it was frozen"):
        load_frozen(tmp_path / "edited.json")


@pytest.mark.parametrize("cache", [
    {"method": "taylorseer", "cache_interval": 3},
    {"method": "first_block", "threshold": 0.1},
    {"method": "seacache", "threshold": 0.5, "max_consecutive_cached": 4},
    {"method": "magcache", "threshold": 0.1, "mag_ratios": [1.0, 0.99, 0.98, 0.97, 0.96, 0.95]},
    {"method": "teacache", "threshold": 0.1, "ret_steps": 2, "residual_order": 1, "residual_slope": 0.75},
])
def test_every_cache_method_freezes_and_loads(cache, tmp_path):
    recipe = Recipe(steps=6).replace(cache=cache)
    f = freeze(recipe, "tiny").save(tmp_path / "f.json")
    loaded = load_frozen(f)
    stored = loaded.recipe.cache.to_dict()
    assert loaded.recipe == recipe and {k: stored[k] for k in cache} == cache
