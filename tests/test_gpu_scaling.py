"""scripts/gpu_scaling.py's phase watcher: a phase that writes its results and then never exits is reported as
hung at exit and killed, with the workers torchrun starts in sessions of their own; a phase that never finishes
is killed at its timeout."""

from __future__ import annotations

import importlib.util
import os
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_scaling", ROOT / "scripts" / "gpu_scaling.py")
gpu_scaling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_scaling)

# Like torchrun: a worker in a session of its own that writes the summary and then hangs, as a rank did in
# NCCL teardown.
HANGS_AFTER_SUMMARY = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    out = Path(sys.argv[1])
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    (out / "worker.pid").write_text(str(worker.pid))
    (out / "summary.json").write_text("{}")
    print("summary written", flush=True)
    time.sleep(600)
""")


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"  # reaped later
    except (FileNotFoundError, IndexError):
        return True


def test_a_phase_that_hangs_after_its_summary_is_killed_whole_and_reported(tmp_path):
    start = time.monotonic()
    rc, how, elapsed = gpu_scaling.watch([sys.executable, "-c", HANGS_AFTER_SUMMARY, str(tmp_path)],
                                         tmp_path / "log", tmp_path / "summary.json", timeout=60, grace=1)
    assert how.startswith("hung at exit after ") and rc != 0 and elapsed < 30 and time.monotonic() - start < 30
    assert "summary written" in (tmp_path / "log").read_text()
    worker = int((tmp_path / "worker.pid").read_text())
    deadline = time.monotonic() + 10
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not _gone(worker):
        os.kill(worker, 9)
        raise AssertionError("the worker in its own session outlived the phase")


def test_a_phase_that_never_finishes_times_out_and_one_that_exits_is_ok(tmp_path):
    rc, how, _ = gpu_scaling.watch([sys.executable, "-c", "import time; time.sleep(600)"], tmp_path / "log",
                                   tmp_path / "summary.json", timeout=1, grace=60)
    assert how.startswith("timed out after ") and rc != 0
    assert gpu_scaling.watch([sys.executable, "-c", "pass"], tmp_path / "log", tmp_path / "summary.json",
                             timeout=60, grace=60)[:2] == (0, "ok")
    assert gpu_scaling.watch([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log",
                             tmp_path / "summary.json", timeout=60, grace=60)[:2] == (3, "rc 3")
