"""Optuna studies over TeaCache settings: search space, objective, storage, Pareto front and freeze selection.

NVIDIA picked TeaCache's threshold and `ret_steps` for FLUX.2 [dev] by grid search. A study automates that for
any model and quality budget: every trial generates the prompt set with one candidate recipe, is timed, and
is scored against an uncached reference made once with the same prompts and seeds. Two objectives (speed,
quality loss) give a Pareto front; `select` picks the fastest point within a quality budget.

Everything that defines a study (model, prompts and seeds, base recipe, coefficients, search space, sampler,
objectives) is stored in the study itself (user attribute "flux2lab"), so any process that can open the
storage can work on it: `python -m flux2lab.search --study NAME --storage URL` joins or resumes a study.

Resuming and several workers rest on Optuna's RDB storage plus four rules, all implemented in `run_worker`:

- a worker records its host and process in each trial; a RUNNING trial whose process on this host is gone is
  failed at once, and Optuna's heartbeats fail the trials of dead workers on other machines;
- a FAIL without a recorded reason (an interrupted trial) is re-queued once as a WAITING copy of its grid point
  (the grid point id travels with it, as Optuna's RetryHeartbeatStaleTrialCallback does it); a trial that
  raised or produced non-finite images records its reason and stays failed (`retry_failed` re-queues those);
- a worker starts a trial only while some grid point is neither done nor being worked on, waits while other
  workers' trials run, and stops when every point is done;
- if two workers still race to one grid point, the trial with the higher number is pruned before any work.

GridSampler gives trial number k grid point k, so while trial numbers (handed out atomically by the storage)
stay below the grid size, workers never meet. Retries use up numbers; past the grid size GridSampler picks
among points not finished and not running, where two workers can pick the same one (its documented caveat),
and the last rule settles it. Optuna 5's GridSampler counts a FAILed point as visited and never proposes it
again, which is why retries are queued explicitly.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from flux2lab.common.errors import Flux2LabError
from flux2lab.pipeline.recipe import PRECISIONS, Recipe, RecipeError, is_int, is_number

if TYPE_CHECKING:
    from flux2lab.pipeline.prompts import PromptEntry

CONFIG_ATTR = "flux2lab"
CONFIG_VERSION = 1
PARAMS = ("threshold", "ret_steps", "cutoff_steps", "transformer_precision")
QUALITY_METRICS = {"lpips": "minimize", "psnr": "maximize", "ssim": "maximize"}  # usable as objective/budget
SPEED_METRICS = {"time": ("time_per_image", "minimize"), "skipped": ("skipped_fraction", "maximize")}
# Heartbeats let a worker on another machine notice a dead worker's trial; a dead worker on this machine is
# seen at once through its process id. The grace period covers a slow storage, not a slow trial.
HEARTBEAT_S = 15
GRACE_S = 60
POLL_S = 2.0
ASSIGN_WAIT_S = 10.0  # how long a new trial waits for lower-numbered ones to get their grid point
SQLITE_TIMEOUT_S = 60


# ------------------------------------------------------------------------------------------ search space


@dataclass(frozen=True)
class SearchSpace:
    """Candidate values per parameter (grid points are their product; TPE searches between min and max)."""

    values: Mapping[str, tuple]

    @property
    def size(self) -> int:
        return math.prod(len(v) for v in self.values.values())

    def points(self) -> list[dict[str, Any]]:
        names = list(self.values)
        return [dict(zip(names, combo)) for combo in itertools.product(*self.values.values())]

    def to_dict(self) -> dict[str, list]:
        return {k: list(v) for k, v in self.values.items()}

    def suggest(self, trial: optuna.Trial, sampler: str) -> dict[str, Any]:
        """Ask the trial for every parameter: the listed values for the grid, their range for TPE."""
        params = {}
        for name, values in self.values.items():
            numeric = all(isinstance(v, (int, float)) for v in values) and len(set(values)) > 1
            if sampler == "grid" or not numeric:
                params[name] = trial.suggest_categorical(name, list(values))
            elif name == "threshold":
                params[name] = trial.suggest_float(name, min(values), max(values))
            else:
                params[name] = trial.suggest_int(name, min(values), max(values))
        return params


def recipe_for(base: Recipe, params: Mapping[str, Any]) -> Recipe:
    """The base recipe with TeaCache on and the trial's parameters set."""
    teacache = {k: params[k] for k in ("threshold", "ret_steps", "cutoff_steps") if k in params}
    changes: dict[str, Any] = {"teacache": {"enabled": True, **teacache}}
    if "transformer_precision" in params:
        changes["transformer_precision"] = params["transformer_precision"]
    return base.replace(**changes)


def default_space(steps: int) -> dict[str, list]:
    """Thresholds around NVIDIA's 0.05, and ret_steps of 0, 10% and 20% of the steps (NVIDIA: 10 of 50)."""
    return {"threshold": [0.02, 0.05, 0.1, 0.2], "ret_steps": sorted({0, steps // 10, steps // 5})}


def _parse_list(text: str, flag: str) -> list[Any]:
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in items):
        raise Flux2LabError(f"{flag} {text!r}: give comma-separated values, e.g. {flag} 0.05,0.1.")
    out: list[Any] = []
    for s in items:
        if s.lower() in ("none", "null"):
            out.append(None)
            continue
        try:
            out.append(json.loads(s))
        except json.JSONDecodeError:
            out.append(s)  # a precision name
    return out


def read_grid_file(path: str | Path) -> dict[str, list]:
    """A YAML or JSON mapping {parameter: [values]}."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise Flux2LabError(f"grid file {path} does not exist.")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise Flux2LabError(
            f"grid file {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({e})."
        ) from None
    if not isinstance(data, dict):
        raise Flux2LabError(f"grid file {path}: expected a mapping like {{threshold: [0.05, 0.1], ret_steps: [0, 5]}}.")
    return data


def build_space(base: Recipe, grid: Mapping[str, Any] | None = None, grid_source: str = "grid",
                flags: Mapping[str, str | None] | None = None) -> SearchSpace:
    """Merge a grid file's values with command-line lists (which win per parameter) and check them all.

    `flags` maps a parameter to its comma-separated text and the flag's name is derived from the parameter.
    Without any values for threshold and ret_steps, `default_space(base.steps)` supplies them.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, vals in (grid or {}).items():
        if name not in PARAMS:
            raise Flux2LabError(f"{grid_source}: unknown parameter {name!r}; allowed: {', '.join(PARAMS)}.")
        values[name], sources[name] = vals, f"{grid_source}, {name}"
    for name, text in (flags or {}).items():
        if text is not None:
            flag = FLAG_OF[name]
            values[name], sources[name] = _parse_list(text, flag), flag
    for name, vals in default_space(base.steps).items():
        if name not in values:
            values[name], sources[name] = vals, f"default {name}"
    ordered = {name: values[name] for name in PARAMS if name in values}
    space = SearchSpace({k: tuple(v) if isinstance(v, list) else v for k, v in ordered.items()})
    validate_space(space, base, sources)
    return space


FLAG_OF = {"threshold": "--threshold", "ret_steps": "--ret-steps", "cutoff_steps": "--cutoff-steps",
           "transformer_precision": "--precision"}


def validate_space(space: SearchSpace, base: Recipe, sources: Mapping[str, str] | None = None) -> None:
    """Every value in range and every grid point a valid recipe; errors name the flag or file and the value."""
    sources = sources or {}
    steps = base.steps
    for name, vals in space.values.items():
        where = sources.get(name, name)
        if not isinstance(vals, tuple) or not vals:
            raise Flux2LabError(f"{where}: give a non-empty list of values, got {vals!r}.")
        repeated = sorted({repr(v) for v in vals if list(vals).count(v) > 1})
        if repeated:
            raise Flux2LabError(f"{where}: value(s) {', '.join(repeated)} listed more than once.")
        for v in vals:
            if name == "threshold" and not (is_number(v) and v >= 0):
                raise Flux2LabError(f"{where}: threshold {v!r} is invalid; TeaCache thresholds are numbers >= 0.")
            if name == "ret_steps" and not (is_int(v) and 0 <= v <= steps):
                raise Flux2LabError(f"{where}: ret_steps {v!r} is invalid; give integers from 0 to the step count "
                                    f"({steps} steps; see --steps).")
            if name == "cutoff_steps" and v is not None and not (is_int(v) and 0 <= v <= steps):
                raise Flux2LabError(f"{where}: cutoff_steps {v!r} is invalid; give none or integers from 0 to the "
                                    f"step count ({steps} steps; see --steps).")
            if name == "transformer_precision" and v not in PRECISIONS:
                raise Flux2LabError(f"{where}: precision {v!r} is unknown; allowed: {', '.join(PRECISIONS)}.")
    for point in space.points():
        try:
            recipe_for(base, point)
        except RecipeError as e:
            raise Flux2LabError(f"grid point {point} is not a valid recipe: {e}") from None


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class StudyConfig:
    """What a study is; stored in the study so every worker and a later --freeze see the same thing."""

    model: str
    prompts: tuple[dict, ...]  # {"id", "text", "images", "seed"}
    base_recipe: dict  # Recipe.to_dict(), TeaCache off, coefficients set
    space: dict[str, list]
    sampler: str = "grid"  # grid | tpe
    n_trials: int | None = None  # TPE only
    sampler_seed: int = 0
    quality_metric: str = "ssim"
    speed_metric: str = "time"
    calibration: dict | None = None  # frozen.calibration_record of the fit, None = published coefficients
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.sampler not in ("grid", "tpe"):
            raise Flux2LabError(f"sampler {self.sampler!r} is unknown; use grid or tpe.")
        if self.sampler == "tpe" and not (is_int(self.n_trials) and self.n_trials > 0):
            raise Flux2LabError("the TPE sampler needs --n-trials N (N >= 1).")
        if self.quality_metric not in QUALITY_METRICS:
            raise Flux2LabError(f"quality metric {self.quality_metric!r} is unknown; use {', '.join(QUALITY_METRICS)}.")
        if self.speed_metric not in SPEED_METRICS:
            raise Flux2LabError(f"speed metric {self.speed_metric!r} is unknown; use {', '.join(SPEED_METRICS)}.")

    @property
    def base(self) -> Recipe:
        return Recipe.from_dict(self.base_recipe, source="study base recipe")

    @property
    def search_space(self) -> SearchSpace:
        return SearchSpace({k: tuple(v) for k, v in self.space.items()})

    @property
    def directions(self) -> list[str]:
        return [SPEED_METRICS[self.speed_metric][1], QUALITY_METRICS[self.quality_metric]]

    @property
    def total(self) -> int:
        """Grid points, or the TPE trial budget."""
        return self.search_space.size if self.sampler == "grid" else int(self.n_trials)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # plain JSON types, as the storage returns them

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudyConfig:
        if data.get("version") != CONFIG_VERSION:
            raise Flux2LabError(f"study configuration version {data.get('version')!r} is not supported by this "
                                f"flux2lab (it reads {CONFIG_VERSION}).")
        return cls(**{**data, "prompts": tuple(data["prompts"])})

    def make_sampler(self, seed: int | None = None) -> optuna.samplers.BaseSampler:
        """GridSampler with the study's seed (every worker must see the same grid order); TPE seeded per worker."""
        if self.sampler == "grid":
            return optuna.samplers.GridSampler(self.space, seed=self.sampler_seed)
        return optuna.samplers.TPESampler(seed=self.sampler_seed if seed is None else seed)


# -------------------------------------------------------------------------------------------- storage


def prompt_records(entries: Sequence[PromptEntry], seeds: Sequence[int]) -> tuple[dict[str, Any], ...]:
    """Prompts and seeds as a study's configuration stores them (JSON, so every worker reads the same set)."""
    return tuple({"id": e.id, "text": e.prompt.text, "images": list(e.prompt.images), "seed": s}
                 for e, s in zip(entries, seeds))


def default_storage(experiments: str | Path) -> str:
    path = Path(experiments).resolve() / "studies.db"
    path.parent.mkdir(parents=True, exist_ok=True)
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
        raise Flux2LabError(f"cannot open the study storage {display_url(url)}: {type(e).__name__}: {e}. Give a "
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
    config = StudyConfig.from_dict(data)
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
        a, b = stored.to_dict(), config.to_dict()
        diff = ", ".join(f"{k} (study: {json.dumps(a[k])[:80]}; now: {json.dumps(b[k])[:80]})"
                         for k in a if a[k] != b.get(k))
        raise Flux2LabError(f"study {name!r} already exists with other settings: {diff}. Rerun with the options it "
                            f"was made with, give only --study {name} to resume it as it is, or pick a new --study.")
    return study, stored


# ------------------------------------------------------------------------------------- trial bookkeeping


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return ""


HOST = f"{socket.gethostname()}/{_boot_id()}"


def _proc_stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def this_worker() -> dict[str, Any]:
    stat = _proc_stat(os.getpid())
    return {"host": HOST, "pid": os.getpid(), "start": stat[19] if stat else None}


def worker_gone(worker: Mapping[str, Any] | None) -> bool:
    """True when the worker ran on this machine and its process no longer exists (or is a zombie, or its pid
    was reused). Workers elsewhere are left to heartbeats."""
    if not worker or worker.get("host") != HOST:
        return False
    pid = int(worker["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    return stat is not None and (stat[0] == "Z" or (worker.get("start") is not None and stat[19] != worker["start"]))


def _reason(t: FrozenTrial) -> str | None:
    return t.user_attrs.get("fail_reason")


def point_of(t: FrozenTrial) -> Any:
    """A trial's grid point id (grid) or its own number (TPE: every trial is its own point)."""
    return t.system_attrs.get("grid_id", ("trial", t.number))


@dataclass
class Status:
    """Where a study stands, by grid point (grid) or against its trial budget (TPE)."""

    total: int
    complete: int = 0
    failed: list[FrozenTrial] = field(default_factory=list)  # failed with a reason and not queued again
    running: int = 0
    waiting: int = 0
    open: int = 0  # points nobody has done, is doing, or has queued

    @property
    def done(self) -> int:
        return self.complete + len(self.failed)

    @property
    def startable(self) -> bool:
        return self.open > 0 or self.waiting > 0


def _counted_trials(study: optuna.Study, config: StudyConfig) -> list[FrozenTrial]:
    trials = study.get_trials(deepcopy=False)
    # A grid trial killed inside `ask`, before GridSampler gave it a point, stays RUNNING without one: ignored.
    if config.sampler == "grid":
        trials = [t for t in trials if "grid_id" in t.system_attrs]
    return trials


def status(study: optuna.Study, config: StudyConfig, trials: list[FrozenTrial] | None = None) -> Status:
    """`trials`: a snapshot of `_counted_trials` already read (else the storage is read)."""
    trials = _counted_trials(study, config) if trials is None else trials
    retried = {t.user_attrs.get("retry_of") for t in trials}
    st = Status(total=config.total)
    st.running = sum(t.state == TrialState.RUNNING for t in trials)
    st.waiting = sum(t.state == TrialState.WAITING for t in trials)
    by_point: dict[Any, list[FrozenTrial]] = {}
    for t in trials:
        by_point.setdefault(point_of(t), []).append(t)
    busy = 0
    for ts in by_point.values():
        states = {t.state for t in ts}
        if TrialState.COMPLETE in states:
            st.complete += 1
        elif states & {TrialState.RUNNING, TrialState.WAITING}:
            busy += 1
        elif failed := [t for t in ts if t.state == TrialState.FAIL and _reason(t) and t.number not in retried]:
            st.failed.append(failed[-1])
    st.open = max(0, st.total - st.done - busy)
    return st


def _queue_retry(study: optuna.Study, config: StudyConfig, t: FrozenTrial) -> None:
    attrs = {"retry_of": t.number}
    if config.sampler == "grid":
        # A WAITING copy that carries its grid point, so GridSampler gives it the same values (what Optuna's
        # RetryHeartbeatStaleTrialCallback does for stale trials).
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, user_attrs=attrs,
            system_attrs={k: t.system_attrs[k] for k in ("grid_id", "search_space")}))
    else:
        study.enqueue_trial(t.params, user_attrs=attrs)


def _orphaned(t: FrozenTrial) -> bool:
    """A trial whose worker died between creating it and starting the objective: it has no worker record and
    maybe no heartbeat either, so nothing else would ever fail it."""
    started = t.datetime_start or datetime.now()
    return "worker" not in t.user_attrs and (datetime.now() - started).total_seconds() > GRACE_S


def _fail_dead_trials(study: optuna.Study, notify: Callable[[str], None]) -> None:
    """RUNNING trials whose worker process on this machine is gone (or that were orphaned before their worker
    recorded itself) become FAIL without a reason, so they are retried."""
    storage = study._storage  # the storage-level calls Optuna's own fail_stale_trials makes
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if not (worker_gone(worker) or _orphaned(t)):
            continue
        why = f"worker process {worker['pid']} on this machine stopped" if worker else "its worker never started it"
        try:
            storage.set_trial_user_attr(t._trial_id, "interrupted", why)
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # finished, or failed by another worker, meanwhile
        notify(f"trial {t.number} {dict(t.params)} was interrupted ({why}); it will be redone.")


def recover(study: optuna.Study, config: StudyConfig, *, retry_failed: bool = False,
            notify: Callable[[str], None] = lambda _: None) -> None:
    """Fail the RUNNING trials of dead workers, then queue one retry per interrupted trial (and, with
    `retry_failed`, per trial that failed with a reason), unless its point is done or taken."""
    _fail_dead_trials(study, notify)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = _counted_trials(study, config)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    taken = {point_of(t) for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)}
    budget = status(study, config, trials).open if config.sampler == "tpe" else math.inf
    for t in trials:
        if t.state != TrialState.FAIL or t.number in retried or point_of(t) in taken:
            continue
        if (_reason(t) and not retry_failed) or budget <= 0:
            continue
        _queue_retry(study, config, t)
        taken.add(point_of(t))
        budget -= 0 if _reason(t) else 1  # a retried failure was already counted as done


def duplicate_of(study: optuna.Study, number: int) -> int | None:
    """Another trial that owns this trial's grid point: a COMPLETE one, or a queued/running one with a lower
    number, so of two racing trials exactly the lower-numbered one goes on.

    GridSampler gives a trial its point inside `ask`, just after the storage numbered it; a lower-numbered
    trial created a moment ago may not have its point yet, so wait (briefly) until it does.
    """
    deadline = time.monotonic() + ASSIGN_WAIT_S
    while True:
        trials = study.get_trials(deepcopy=False)
        now = datetime.now()
        pending = [t for t in trials if t.number < number and t.state == TrialState.RUNNING
                   and "grid_id" not in t.system_attrs
                   and (now - (t.datetime_start or now)).total_seconds() < ASSIGN_WAIT_S]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    me = next(t for t in trials if t.number == number)
    if "grid_id" not in me.system_attrs:
        return None
    for t in trials:
        if t.number == number or t.system_attrs.get("grid_id") != me.system_attrs["grid_id"]:
            continue
        if t.state == TrialState.COMPLETE or (
                t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number < number):
            return t.number
    return None


# ------------------------------------------------------------------------------------------ the objective


class NonFiniteImages(RuntimeError):
    """The decoder produced NaN or infinite values: the image is garbage, whatever PIL shows."""


class _FiniteCheck:
    """Watches the VAE decoder's output during generation (PIL conversion would hide NaNs as black)."""

    def __init__(self, pipe):
        self.bad = 0
        decoder = getattr(getattr(pipe, "vae", None), "decoder", None)
        self.handle = decoder.register_forward_hook(self._check) if decoder is not None else None

    def _check(self, module, args, output):
        import torch

        sample = getattr(output, "sample", output)
        if isinstance(sample, torch.Tensor) and not torch.isfinite(sample).all():
            self.bad += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()


class TrialRunner:
    """Loads pipelines lazily (one per transformer precision, up to `keep_pipelines`), makes the reference
    once, and scores each trial's recipe. Its `objective` is what `Study.optimize` calls."""

    def __init__(self, study: optuna.Study, config: StudyConfig, study_dir: Path, *, device: str | None = None,
                 dtype=None, weights: Mapping[str, Path | None], keep_pipelines: int = 1, progress: bool = False):
        self.study, self.config, self.study_dir = study, config, Path(study_dir)
        self.device, self.dtype = device, dtype
        self.weights = dict(weights)
        self.keep = max(1, keep_pipelines)
        self.progress = progress
        self.pipes: list = []
        self.reference: list | None = None
        self.ref_time: float | None = None
        self.worker = this_worker()

    # -- model and reference

    def pipeline(self, recipe: Recipe):
        """A loaded pipeline whose model-changing fields match `recipe` (loading one if needed)."""
        from flux2lab.pipeline import core
        from flux2lab.pipeline.models import free_memory, load_pipeline

        for pipe in self.pipes:
            if not core.applied_recipe(pipe).model_changes(recipe):
                return pipe
        if len(self.pipes) >= self.keep:
            self.pipes.pop(0)
            free_memory()
        pipe = load_pipeline(self.config.model, device=self.device, dtype=self.dtype)
        prompts, seeds = self.prompts()
        # One untimed one-step image (generate applies the recipe's model changes first): first-call costs
        # (allocation, kernels, compilation) stay out of timings.
        core.generate(pipe, prompts[:1], seeds[:1], recipe.replace(steps=1, teacache={"enabled": False}))
        self.pipes.append(pipe)
        return pipe

    def prompts(self):
        """The study's prompts and seeds, as `generate` takes them (the inverse of `prompt_records`)."""
        from flux2lab.pipeline.core import Prompt

        entries = self.config.prompts
        return [Prompt(p["text"], tuple(p["images"])) for p in entries], [p["seed"] for p in entries]

    def ensure_reference(self) -> None:
        """The uncached reference images, from the study folder's cache (made there once, under a file lock so
        workers sharing the folder make them once)."""
        if self.reference is not None:
            return
        from filelock import FileLock

        from flux2lab.pipeline.imagecache import ImageCache, generate_cached

        base = self.config.base
        pipe = self.pipeline(base)
        prompts, seeds = self.prompts()
        self.study_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.study_dir / "reference.lock")):
            gen, _ = generate_cached(pipe, prompts, seeds, base, ImageCache(self.study_dir / "reference"),
                                     progress=self.progress)
        self.reference = gen.images
        self.ref_time = gen.mean_wall_s

    # -- one trial

    def measure(self, recipe: Recipe) -> dict[str, Any]:
        """Generate the prompt set with `recipe` and score it; the user attributes of the trial."""
        from flux2lab import metrics
        from flux2lab.pipeline import core
        from flux2lab.pipeline.models import model_info

        pipe = self.pipeline(recipe)
        prompts, seeds = self.prompts()
        with _FiniteCheck(pipe) as check:
            gen = core.generate(pipe, prompts, seeds, recipe)
        if check.bad:
            raise NonFiniteImages(f"{check.bad} of {len(prompts)} image(s) decoded to NaN/inf values")
        results = metrics.evaluate(self.reference, gen.images, self.weights, prompts=[p.text for p in prompts],
                                   options=metrics.MetricOptions(device=self.device))
        values = {name: r.to_dict()["value"] for name, r in results.items()}
        bad = [n for n, v in values.items() if math.isnan(float(v))]
        if bad:
            raise NonFiniteImages(f"metric(s) {', '.join(bad)} are NaN")
        time_per_image = gen.mean_wall_s
        info = model_info(pipe)
        return {
            "recipe": recipe.to_dict(), "metrics": values, "time_per_image": time_per_image,
            "skipped_fraction": gen.skipped_fraction, "ref_time_per_image": self.ref_time,
            "speedup": self.ref_time / time_per_image if time_per_image > 0 else None,
            "model": {"source": info.source, "kind": info.kind, "revision": info.revision},
            "device": str(pipe.transformer.device),
        }

    def objective(self, trial: optuna.Trial) -> tuple[float, float]:
        trial.set_user_attr("worker", self.worker)
        params = self.config.search_space.suggest(trial, self.config.sampler)
        owner = duplicate_of(self.study, trial.number)
        if owner is not None:
            trial.set_user_attr("duplicate_of", owner)
            raise optuna.TrialPruned(f"grid point already taken by trial {owner}")
        try:
            attrs = self.measure(recipe_for(self.config.base, params))
            values = objective_values(self.config, attrs)
        except Exception as e:
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}"[:2000])
            raise
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        return values


def objective_values(config: StudyConfig, attrs: Mapping[str, Any]) -> tuple[float, float]:
    speed = attrs[SPEED_METRICS[config.speed_metric][0]]
    quality = attrs["metrics"].get(config.quality_metric)
    if quality is None:
        raise Flux2LabError(f"this worker did not measure {config.quality_metric}, the study's quality objective.")
    return float(speed), float(quality)  # metric values are stored JSON-safe: "inf" for identical images


# ---------------------------------------------------------------------------------------------- workers


def run_worker(study: optuna.Study, config: StudyConfig, runner: TrialRunner, *,
               on_update: Callable[[Status], None] = lambda _: None,
               notify: Callable[[str], None] = lambda _: None) -> Status:
    """Run trials until every grid point (or the TPE budget) is done; wait while other workers finish theirs.

    To run failed points again, call `recover(..., retry_failed=True)` once first (not per worker)."""
    while True:
        recover(study, config, notify=notify)
        st = status(study, config)
        on_update(st)
        if st.startable:
            runner.ensure_reference()  # before the first trial: a reference that cannot be made stops the worker
            study.optimize(runner.objective, n_trials=1, catch=(Exception,))
        elif st.running:
            time.sleep(POLL_S)
        else:
            return st


# ----------------------------------------------------------------------------------- Pareto front and freeze


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def speed_key(config: StudyConfig, t: FrozenTrial) -> float:
    """Smaller is faster, whichever speed metric the study optimises."""
    v = float(t.user_attrs[SPEED_METRICS[config.speed_metric][0]])
    return v if config.speed_metric == "time" else -v


def quality_key(config: StudyConfig, t: FrozenTrial) -> float:
    """Smaller is better, whichever quality metric the study optimises."""
    v = float(t.user_attrs["metrics"][config.quality_metric])
    return v if QUALITY_METRICS[config.quality_metric] == "minimize" else -v


def pareto_front(study: optuna.Study, config: StudyConfig) -> list[FrozenTrial]:
    """Optuna's Pareto-optimal trials, fastest first."""
    return sorted(study.best_trials, key=lambda t: (speed_key(config, t), quality_key(config, t)))


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    v = float(v)
    return format(v, spec) if math.isfinite(v) else str(v)


# Quality metrics the search's table and plot show, where measured.
SHOWN_METRICS = ("lpips", "psnr", "ssim", "clip_delta")


def measured_metrics(trials: Sequence[FrozenTrial], names: Sequence[str] = SHOWN_METRICS) -> list[str]:
    """Those of `names` that at least one of `trials` measured, in `names`' order."""
    return [m for m in names if any(m in (t.user_attrs.get("metrics") or {}) for t in trials)]


def format_table(trials: Sequence[FrozenTrial], config: StudyConfig) -> str:
    """One row per trial: its parameters, speed and every quality metric it has."""
    params = list(config.space)
    names = measured_metrics(trials)
    head = ["trial", *params, "skipped", "s/img", "speedup", *names]
    rows = [head]
    for t in trials:
        m = t.user_attrs.get("metrics", {})
        rows.append([str(t.number), *(str(t.params.get(p, "-")) for p in params),
                     f"{100 * t.user_attrs['skipped_fraction']:.0f}%", _fmt(t.user_attrs["time_per_image"], ".3f"),
                     _fmt(t.user_attrs.get("speedup"), ".2f") + "x",
                     *(_fmt(m.get(n), ".2f" if n in ("psnr", "clip_delta") else ".5f") for n in names)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def plot_pareto(study: optuna.Study, config: StudyConfig, path: str | Path) -> Path | None:
    """Speed against each measured quality metric; the study's Pareto front in red. None if nothing finished."""
    from matplotlib.figure import Figure

    trials = complete_trials(study)
    if not trials:
        return None
    front = {t.number for t in study.best_trials}
    names = measured_metrics(trials)
    speed_attr = SPEED_METRICS[config.speed_metric][0]
    xlabel = "time per image (s)" if config.speed_metric == "time" else "skipped steps (fraction)"
    fig = Figure(figsize=(4.4 * len(names), 3.8))
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        pts = [(float(t.user_attrs[speed_attr]), float(t.user_attrs["metrics"][name]), t.number) for t in trials
               if name in t.user_attrs["metrics"] and math.isfinite(float(t.user_attrs["metrics"][name]))]
        rest = [p for p in pts if p[2] not in front]
        best = sorted(p for p in pts if p[2] in front)
        ax.scatter([p[0] for p in rest], [p[1] for p in rest], c="0.6", s=18, label="trials")
        ax.plot([p[0] for p in best], [p[1] for p in best], "o-", c="tab:red", ms=5, label="Pareto front")
        for x, y, n in best:
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        better = "lower" if name == "lpips" else "higher"
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{name} vs reference ({better} is better)")
        hidden = sum(1 for t in trials if name in t.user_attrs["metrics"]
                     and not math.isfinite(float(t.user_attrs["metrics"][name])))
        ax.set_title(name + (" (objective)" if name == config.quality_metric else "")
                     + (f"; {hidden} identical to the reference (inf) not shown" if hidden else ""), fontsize=9)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.suptitle(f"study {study.study_name}: {config.model}, {len(trials)} trials", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# A budget bounds a quality metric on its bad side: at most X where lower is better, at least X where higher is.
BUDGETS = {k: "max" if direction == "minimize" else "min" for k, direction in QUALITY_METRICS.items()}


def describe_budgets(budgets: Mapping[str, float]) -> str:
    return ", ".join(f"--{BUDGETS[k]}-{k} {v:g}" for k, v in budgets.items())


def _violation(t: FrozenTrial, budgets: Mapping[str, float]) -> float:
    """How far a trial is outside the budgets (0 = within), relative to each bound."""
    total = 0.0
    for name, bound in budgets.items():
        v = t.user_attrs.get("metrics", {}).get(name)
        if v is None:
            return math.inf
        over = float(v) - bound if BUDGETS[name] == "max" else bound - float(v)
        total += max(0.0, over) / max(abs(bound), 1e-12)
    return total


def select(study: optuna.Study, config: StudyConfig, budgets: Mapping[str, float]) -> FrozenTrial:
    """The fastest complete trial within every budget (ties: better quality objective, then lower number).

    With a budget on the study's quality objective this is the fastest Pareto point within it; a budget on
    another metric can pick a faster trial than any on the front, which is what a budget asks for.
    """
    if not budgets:
        raise Flux2LabError("--freeze needs a quality budget: --max-lpips X, --min-psnr X or --min-ssim X.")
    unknown = sorted(set(budgets) - set(BUDGETS))
    if unknown:
        raise Flux2LabError(f"no budget flag for {unknown}; use {', '.join(BUDGETS)}.")
    trials = complete_trials(study)
    if not trials:
        raise Flux2LabError(f"study {study.study_name!r} has no complete trials yet; run the search first.")
    for name in budgets:
        if not any(name in t.user_attrs.get("metrics", {}) for t in trials):
            measured = sorted({m for t in trials for m in t.user_attrs.get("metrics", {}) if m in BUDGETS})
            raise Flux2LabError(f"no trial of study {study.study_name!r} measured {name} (its weights were missing "
                                f"when the study ran); budget on what it measured: {', '.join(measured)}.")
    within = [t for t in trials if _violation(t, budgets) == 0]
    if not within:
        closest = sorted(trials, key=lambda t: (_violation(t, budgets), speed_key(config, t)))[:3]
        raise Flux2LabError(f"no trial of study {study.study_name!r} meets {describe_budgets(budgets)} "
                            f"({len(trials)} complete trials). The closest:\n{format_table(closest, config)}")
    return min(within, key=lambda t: (speed_key(config, t), quality_key(config, t), t.number))


def freeze_trial(study: optuna.Study, config: StudyConfig, trial: FrozenTrial, out: str | Path, *,
                 storage_url: str, budgets: Mapping[str, float]) -> Path:
    """Write the trial's recipe as a frozen config (flux2lab.frozen) with the study as its provenance."""
    from flux2lab.pipeline.frozen import freeze

    recipe = Recipe.from_dict(trial.user_attrs["recipe"], source=f"trial {trial.number} of {study.study_name}")
    attrs = trial.user_attrs
    on_front = trial.number in {t.number for t in study.best_trials}
    provenance = {
        "calibration": config.calibration,
        "study": {"name": study.study_name, "storage": display_url(storage_url), "sampler": config.sampler,
                  "objectives": [f"{SPEED_METRICS[config.speed_metric][0]} ({config.directions[0]})",
                                 f"{config.quality_metric} ({config.directions[1]})"],
                  "prompts": len(config.prompts), "complete_trials": len(complete_trials(study))},
        "trial": {"number": trial.number, "params": dict(trial.params), "device": attrs.get("device"),
                  "on_pareto_front": on_front},
        "metrics": {**attrs["metrics"], "time_per_image": attrs["time_per_image"],
                    "skipped_fraction": attrs["skipped_fraction"], "speedup": attrs.get("speedup"),
                    "ref_time_per_image": attrs.get("ref_time_per_image")},
        "notes": (f"fastest trial within {describe_budgets(budgets)}; coefficients: "
                  + ("calibration fit" if config.calibration else "published FLUX.2 [dev] (NVIDIA)")),
    }
    return freeze(recipe, attrs["model"], provenance).save(out)
