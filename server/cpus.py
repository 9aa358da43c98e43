"""How many CPUs this process may really use: the cgroup CPU quota and the affinity mask, not the node's cores.

``os.cpu_count()`` answers the node's core count, so a pod limited to 2 CPUs on a 64-core node would
start 64 decode threads (each holding a decoded image) and 64 ONNX Runtime threads. The quota is read
from cgroup v2 ``cpu.max`` or cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; tests pass a
fake root.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup quota (e.g. 1.5), or None when there is no quota."""
    v2 = root / "cpu.max"
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process can use: the affinity mask, capped by the cgroup quota (rounded up), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None and quota > 0:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def lower_priority(niceness: int = 5) -> None:
    """Raise this thread's nice value (Linux threads have their own), so the event loop, which
    answers health checks and routes calls, is scheduled ahead of the pool's heavy work."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):  # not on Linux, or not allowed
        pass
