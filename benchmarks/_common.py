"""Helpers shared by benchmark scripts: device name, library versions, git commit, results path."""
from __future__ import annotations

import datetime
import importlib
import re
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def device_name(device: torch.device) -> str:
    """Human-readable device name: the GPU's name on CUDA, ``cpu`` otherwise."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_slug(device: torch.device) -> str:
    """File-name-safe device name, e.g. ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def versions() -> dict:
    """Versions of the libraries that shape the numbers (``None`` where not installed)."""
    found = {}
    for name in ("torch", "triton", "transformers", "flash_attn"):
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception:  # not installed, or broken without CUDA
            found[name] = None
    return found


def git_commit() -> str | None:
    """The checkout's commit, with ``-dirty`` when it has uncommitted changes; ``None`` outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def default_results_path(kind: str, device: torch.device) -> Path:
    """``benchmarks/results/<kind>-<device>-<date>.json``."""
    return RESULTS / f"{kind}-{device_slug(device)}-{datetime.date.today().isoformat()}.json"


def proc_memory_bytes(field: str) -> int | None:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process in bytes, from /proc/self/status;
    None where that is unavailable (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Start VmHWM afresh from the current RSS (Linux ``clear_refs``), so a peak measured next is not an earlier
    phase's; False where that is unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True
