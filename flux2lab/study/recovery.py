"""Trial bookkeeping for resumable, shared studies: which worker runs a trial, which trials were interrupted,
where the study stands per grid point, re-queuing interrupted points once, and settling two workers that
race to one point. `flux2lab.study.worker.run_worker` states the rules these implement."""

from __future__ import annotations

import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from flux2lab.study.config import StudyConfig
from flux2lab.study.space import describe_point
from flux2lab.study.storage import GRACE_S

ASSIGN_WAIT_S = 10.0  # how long a new trial waits for lower-numbered ones to get their grid point


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
    """This process as a trial records its worker: host (and boot), pid, and the process's start time."""
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
    """`trials`: a snapshot of `_counted_trials` already read (else the storage is read).

    Counted per point rather than by GridSampler.is_exhausted or MaxTrialsCallback, which take an interrupted
    trial awaiting its retry, or a duplicate pruned while its point still runs, for a finished point."""
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


def _fail_dead_trials(study: optuna.Study, config: StudyConfig, notify: Callable[[str], None]) -> None:
    """RUNNING trials whose worker process on this machine is gone (or that were orphaned before their worker
    recorded itself) become FAIL without a reason, so they are retried. Heartbeats would notice only after
    GRACE_S (and never for an orphan without one); the process id shows a worker on this machine died at once."""
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
        notify(f"trial {t.number} ({describe_point(config.trial_point(t))}) was interrupted ({why}); it will be redone.")


def recover(study: optuna.Study, config: StudyConfig, *, retry_failed: bool = False,
            notify: Callable[[str], None] = lambda _: None) -> None:
    """Fail the RUNNING trials of dead workers, then queue one retry per interrupted trial (and, with
    `retry_failed`, per trial that failed with a reason), unless its point is done or taken."""
    _fail_dead_trials(study, config, notify)
    # Retries are queued below from the stored states, not by RetryHeartbeatStaleTrialCallback: that acts only on
    # the trials its own fail_stale_trials call fails (a worker dying in between loses the retry), copies the dead
    # worker's record into the copy, and knows neither trials failed by process id, taken points nor TPE budgets.
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
