"""What the machine offers the runner: cores, memory, GPUs, the filesystem of the study folder."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

#: peak resident memory of one CPU run per profile, GB (smoke measured at 2.7 GB); sets the default --jobs on CPU
CPU_RUN_MEMORY_GB = {"smoke": 3.0, "demo": 4.0, "gpu": 12.0, "paper": 48.0}
#: concurrent runs one SQLite store is allowed: 32 processes writing 100 metrics each at full speed met no lock
#: error on a local disk (with the tracker's retry), and a bundle writes a few records per epoch; we keep a margin
SQLITE_MAX_JOBS = 16
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "fuse.sshfs"}


def cpu_count() -> int:
    """CPU cores this process may use."""
    with contextlib.suppress(AttributeError):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def memory_gb() -> float:
    """Available memory in GB (``MemAvailable``; total memory where that is unknown)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024**2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3


def visible_gpus() -> list[str]:
    """The CUDA devices runs can be given, as ``CUDA_VISIBLE_DEVICES`` entries (empty without CUDA)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[:n] if len(visible) >= n else [str(i) for i in range(n)]


def default_jobs(profile: str, gpus: int, cores: int, memory: float) -> int:
    """Runs at once: one per GPU; on CPU, as many as the cores and the memory bear (``CPU_RUN_MEMORY_GB``)."""
    if gpus:
        return gpus
    return max(1, min(cores, int(memory // CPU_RUN_MEMORY_GB.get(profile, 8.0))))


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from ``/proc/mounts``; ``""`` where unknown)."""
    best, kind = "", ""
    target = str(path.resolve())
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/")):
                if len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    return kind
