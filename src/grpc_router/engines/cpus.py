"""How many CPUs this process may use: its CPU affinity, capped by a container's CPU limit.

`os.cpu_count()` counts the host's CPUs. A pod with `limits: {cpu: 2}` on a 64-core node sees
64 of them, and its cgroup quota throttles it to two cores' worth of time. Threads sized to the
host would then spin against the quota. Engines size their thread pools with `available_cpus`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs in this process's affinity mask, capped by its cgroup CPU quota (rounded down,
    at least 1) where one is set."""
    affinity = getattr(os, "sched_getaffinity", None)
    cpus = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU limit of this process's cgroup, in CPUs (quota / period), as the process sees it
    under its cgroup namespace; None without a limit or when there is no cgroup to read.
    cgroup v2 keeps it in `cpu.max` ("max 100000" or "200000 100000"), v1 in
    `cpu/cpu.cfs_quota_us` (-1 for none) and `cpu/cpu.cfs_period_us`."""
    try:
        fields = (root / "cpu.max").read_text(encoding="ascii").split()
    except OSError:
        fields = []
    if len(fields) == 2:
        if fields[0] == "max":
            return None
        return _ratio(fields[0], fields[1])
    try:
        quota = (root / "cpu" / "cpu.cfs_quota_us").read_text(encoding="ascii")
        period = (root / "cpu" / "cpu.cfs_period_us").read_text(encoding="ascii")
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None
