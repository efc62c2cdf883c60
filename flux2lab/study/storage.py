"""Where studies live: Optuna RDB storages (SQLite by default, set up for several processes, with heartbeats),
and creating or loading a study together with the configuration stored in it."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from flux2lab.common.errors import Flux2LabError
from flux2lab.common.files import prepare_output_dir
from flux2lab.study.config import StudyConfig

CONFIG_ATTR = "flux2lab"  # the study's user attribute holding its StudyConfig
# Heartbeats let a worker on another machine notice a dead worker's trial; a dead worker on this machine is
# seen at once through its process id. The grace period covers a slow storage, not a slow trial.
HEARTBEAT_S = 15
GRACE_S = 60
POLL_S = 2.0  # how often a waiting process looks at the storage again
SQLITE_TIMEOUT_S = 60


def default_storage(experiments: str | Path) -> str:
    """The SQLite file under the experiments folder (made now, so a path that cannot be one fails at once)."""
    path = prepare_output_dir(Path(experiments).resolve(), "--experiments") / "studies.db"
    return f"sqlite:///{path}"


def display_url(url: str) -> str:
    """The storage URL without its password, for messages and provenance."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; SQLite set up for several processes. Errors name the URL."""
    is_sqlite = url.startswith("sqlite")
    # pysqlite starts a transaction only at the first write, so Optuna's read-then-write updates are not atomic
    # across processes: two workers can both read a queued (WAITING) retry and both set it RUNNING, then run
    # the same trial. Turning the driver's own BEGIN off and opening every transaction with BEGIN IMMEDIATE
    # (SQLAlchemy's documented recipe) makes them atomic; the timeout lets the others wait for the lock.
    kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S, "isolation_level": None}} if is_sqlite else {}
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                                 grace_period=GRACE_S)
    # A bad URL, a missing driver, an unreachable server, an unwritable file, a newer schema: all the user's to fix.
    except (SQLAlchemyError, ImportError, RuntimeError, ValueError) as e:
        detail = getattr(e, "orig", None) or e  # the driver's own words, without SQLAlchemy's help links
        raise Flux2LabError(f"cannot open the study storage {display_url(url)}: {type(e).__name__}: {detail}. Give a "
                            "SQLAlchemy URL such as sqlite:///experiments/studies.db or "
                            "postgresql://user@host/db.") from None
    if is_sqlite:
        from sqlalchemy import event

        event.listen(storage.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    return storage


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return sorted(optuna.get_all_study_names(storage))


def load_study(name: str, storage: optuna.storages.BaseStorage, sampler=None) -> tuple[optuna.Study, StudyConfig]:
    """An existing study and its configuration; an unknown name lists the studies that exist."""
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        names = study_names(storage)
        listing = ", ".join(names) if names else "none"
        raise Flux2LabError(f"no study named {name!r} in this storage; studies there: {listing}.") from None
    data = study.user_attrs.get(CONFIG_ATTR)
    if data is None:
        raise Flux2LabError(f"study {name!r} was not made by python -m flux2lab.search (it has no flux2lab "
                            "configuration); choose another --study name.")
    try:
        config = StudyConfig.from_dict(data)
    except Flux2LabError as e:
        raise Flux2LabError(f"study {name!r}: {e}") from None
    if sampler is None:
        study.sampler = config.make_sampler()
    return study, config


def create_or_load(name: str, storage: optuna.storages.BaseStorage,
                   config: StudyConfig | None) -> tuple[optuna.Study, StudyConfig]:
    """Create the study from `config`, or load it; a `config` that differs from the stored one is an error."""
    if name not in study_names(storage):
        if config is None:
            raise Flux2LabError(f"study {name!r} does not exist yet; give --prompts (and the search options) to "
                                "create it.")
        try:
            study = optuna.create_study(study_name=name, storage=storage, directions=config.directions,
                                        sampler=config.make_sampler())
            study.set_user_attr(CONFIG_ATTR, config.to_dict())
            return study, config
        except optuna.exceptions.DuplicatedStudyError:
            time.sleep(POLL_S)  # another process created it a moment ago; let it store its configuration
    study, stored = load_study(name, storage)
    if config is not None and config.to_dict() != stored.to_dict():
        changed = changed_fields(stored.to_dict(), config.to_dict())
        diff = "; ".join(f"{field} (study: {json.dumps(a)[:SHOWN]}, now: {json.dumps(b)[:SHOWN]})"
                         for field, a, b in changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise Flux2LabError(f"study {name!r} already exists with other settings: {diff}.\nRerun with the options it "
                            f"was made with, give only --study {name} to resume it as it is, or pick a new --study.")
    return study, stored


SHOWN = 60  # characters of a changed value in the message


def changed_fields(old: Any, new: Any, field: str = "") -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) for every field that differs, nested ones named like `base_recipe.steps` or
    `prompts.0.seed` (lists of the same length are compared item by item)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = dict.fromkeys([*old, *new])
        return [c for k in keys for c in changed_fields(old.get(k), new.get(k), f"{field}{k}.")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in changed_fields(a, b, f"{field}{i}.")]
    return [] if old == new else [(field.rstrip("."), old, new)]
