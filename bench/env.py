"""What a result was measured on: device name, library versions, commit (recorded with every run)."""

from __future__ import annotations

import datetime
import os
import platform
import re
import resource
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PEER_DISTRIBUTIONS = ("liger-kernel", "cut-cross-entropy")  # PyTorch's own peer is versioned by "torch"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or f"cpu-{platform.machine()}"


def slug(text: str) -> str:
    s = re.sub(r"\(r\)|\(tm\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "device"


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> Dict[str, Any]:
    """HEAD and whether the tree had uncommitted changes (a dirty tree's numbers may not be
    reproducible from the commit alone)."""
    def git(*args: str) -> Optional[str]:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if head else None
    return {"commit": head, "dirty": None if status is None else bool(status)}


def environment(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "tokpo_kernels": _version("tokpo_kernels"),
        # Versions of the peers' packages (None = not installed): a peer's row is only as current as this.
        "peers": {dist: _version(dist) for dist in PEER_DISTRIBUTIONS},
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        # Other processes competing for the cores make CPU timings meaningless; record how busy
        # the machine was so a noisy result can be recognised as such.
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        **git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    return info


class CpuContention:
    """How many cores *other* processes kept busy while this run was going, on average.

    The load average cannot say this (it counts our own workers too), so: all busy CPU time of the
    machine from /proc/stat, minus the CPU time of this process and its (finished) workers, over
    the wall time. CPU timings are only meaningful when this is near 0. ``None`` off Linux.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> Optional[tuple]:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields[:3]) + sum(fields[5:8])  # user nice system + irq softirq steal
        own = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        return busy / os.sysconf("SC_CLK_TCK"), own, time.monotonic()

    def other_cores(self) -> Optional[float]:
        end = self._sample()
        if self._start is None or end is None:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self._start, strict=True))
        return max(0.0, busy - own) / wall if wall > 0 else None
