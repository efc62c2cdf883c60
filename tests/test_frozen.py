"""Frozen configs: what is frozen comes back identical, and anything else is refused with the reason."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

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
    teacache={"enabled": True, "threshold": 0.08, "ret_steps": 4})


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
    assert list(cal["coefficients"]) == list(RECIPE.teacache.coefficients)
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
    c = freeze(RECIPE.replace(teacache={"threshold": 0.09}), "tiny", prov, created="2026-01-01T00:00:00+00:00")
    assert a.sha256 == b.sha256 != c.sha256


def test_tampered_config_is_refused_with_how_to_refreeze(frozen_file):
    _edit(frozen_file, lambda d: d["recipe"]["teacache"].__setitem__("threshold", 0.2))
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
