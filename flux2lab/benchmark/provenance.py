"""Provenance of a measured number: the card, driver, library versions and git state it was measured with."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from flux2lab import __version__, dist_version

GIB = 2**30
REPO = Path(__file__).resolve().parents[2]


def _run_quiet(cmd: list[str], cwd: Path | None = None) -> str | None:
    """The command's stripped stdout, or None when it is missing, fails or hangs."""
    try:
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=20, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device) -> dict[str, Any]:
    """The card, driver and library versions a number was measured with."""
    env: dict[str, Any] = {
        "cuda": device.type == "cuda", "device": str(device), "device_name": platform.processor() or "cpu",
        "torch": torch.__version__, "cuda_runtime": torch.version.cuda, "diffusers": dist_version("diffusers"),
        "transformers": dist_version("transformers"), "torchao": dist_version("torchao"), "flux2lab": __version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "git_commit": _run_quiet(["git", "rev-parse", "HEAD"], cwd=REPO),
        "git_dirty": bool(_run_quiet(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO)),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name, compute_capability=f"{props.major}.{props.minor}",
            memory_gib=props.total_memory / GIB, gpus_visible=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
            driver=_run_quiet(["nvidia-smi", f"--id={device.index or 0}", "--query-gpu=driver_version",
                               "--format=csv,noheader"]),
        )
    return env
