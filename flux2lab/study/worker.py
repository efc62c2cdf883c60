"""Workers of a study: `run_worker` runs trials until the study is done, however many processes or machines
share it; `start_workers` starts extra worker processes on this machine, one GPU each where there are several."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence

import optuna

from flux2lab.study.config import StudyConfig
from flux2lab.study.objective import TrialRunner
from flux2lab.study.recovery import Status, recover, status
from flux2lab.study.storage import POLL_S


def run_worker(study: optuna.Study, config: StudyConfig, runner: TrialRunner, *,
               on_update: Callable[[Status], None] = lambda _: None,
               notify: Callable[[str], None] = lambda _: None) -> Status:
    """Run trials until every grid point (or the TPE budget) is done; wait while other workers finish theirs.

    To run failed points again, call `recover(..., retry_failed=True)` once first (not per worker).

    Resuming and several workers rest on Optuna's RDB storage plus four rules:

    - a worker records its host and process in each trial; a RUNNING trial whose process on this host is gone is
      failed at once, and Optuna's heartbeats fail the trials of dead workers on other machines;
    - a FAIL without a recorded reason (an interrupted trial) is re-queued once as a WAITING copy of its grid
      point (the grid point id travels with it, as Optuna's RetryHeartbeatStaleTrialCallback does it); a trial
      that raised or produced non-finite images records its reason and stays failed (`retry_failed` re-queues
      those);
    - a worker starts a trial only while some grid point is neither done nor being worked on, waits while other
      workers' trials run, and stops when every point is done;
    - if two workers still race to one grid point, the trial with the higher number is pruned before any work.

    GridSampler gives trial number k grid point k, so while trial numbers (handed out atomically by the storage)
    stay below the grid size, workers never meet. Retries use up numbers; past the grid size GridSampler picks
    among points not finished and not running, where two workers can pick the same one (its documented caveat),
    and the last rule settles it. Optuna 5's GridSampler counts a FAILed point as visited and never proposes it
    again, which is why retries are queued explicitly.
    """
    # One trial per `optimize` call, because between trials this loop must recover dead workers' trials and wait
    # while only other workers' trials run; Optuna's MaxTrialsCallback and GridSampler.is_exhausted count FAILed
    # and pruned trials as done, which `status` does not (see there).
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


def start_workers(count: int, device: str | None,
                  command: Callable[[int, str | None], list[str]]) -> tuple[list[subprocess.Popen], str | None]:
    """Start workers 1 to count-1 on this machine (the calling process is worker 0). With several GPUs each gets
    its own through CUDA_VISIBLE_DEVICES; on the CPU they share the cores. `command(index, device)` is worker
    `index`'s command line (`device` None: its default). Returns the processes and the calling process's device."""
    import torch

    on_gpu = device in (None, "cuda") and torch.cuda.is_available()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = (visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]) if on_gpu else []
    threads = max(1, (os.cpu_count() or 1) // count)
    procs = []
    for i in range(1, count):
        env = dict(os.environ)
        if len(gpus) > 1:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        if not gpus and "OMP_NUM_THREADS" not in env:  # CPU workers share the cores instead of oversubscribing
            env["OMP_NUM_THREADS"] = str(threads)
        procs.append(subprocess.Popen(command(i, None if len(gpus) > 1 else device), env=env))
    if not gpus and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)
    # The first visible GPU is cuda:0 inside this process, whatever CUDA_VISIBLE_DEVICES says.
    return procs, ("cuda:0" if len(gpus) > 1 else device)


def wait_for_workers(procs: Sequence[subprocess.Popen], study: optuna.Study, config: StudyConfig, *,
                     on_update: Callable[[Status], None] = lambda _: None) -> None:
    """Wait while `procs` finish their last trials, passing where the study stands to `on_update` meanwhile."""
    while any(p.poll() is None for p in procs):
        on_update(status(study, config))
        time.sleep(POLL_S)


def stop_workers(procs: Sequence[subprocess.Popen]) -> None:
    """Terminate those of `procs` still running (the calling process stopped early) and wait for them."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait()
