"""The CPUs a container may use, from its cgroup CPU quota. A worker limited to 4 CPUs on a 64-core
node must not start 64 model threads: the kernel's CFS quota would throttle all of them, every
period. (Go's runtime, the JVM and .NET size their thread pools the same way.)"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path

from inferstack.config import Settings

log = logging.getLogger("inferstack.worker")

# The container's own cgroup, as a pod sees it (cgroup namespaces: Kubernetes on cgroup v2, Docker).
CGROUP_ROOT = Path("/sys/fs/cgroup")


def quota_cpus(root: Path | None = None) -> int | None:
    """ceil(quota / period) where the cgroup sets a CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us`
    and `cpu.cfs_period_us`); None where it sets none or cannot be read."""
    root = root or CGROUP_ROOT
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # "max 100000" or "400000 100000"
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()  # -1: no quota
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None  # "max"
    return max(1, math.ceil(q / p)) if q > 0 and p > 0 else None


def threads_within_quota(settings: Settings, root: Path | None = None) -> Settings:
    """settings whose model runs on at most the cgroup quota's CPUs, where INFERSTACK_INFERENCE_THREADS
    is left at 0 (the runtime's default: every core it sees) and the quota is below what it sees."""
    if settings.inference_threads > 0:
        return settings
    cpus, visible = quota_cpus(root), len(os.sched_getaffinity(0))
    if cpus is None or cpus >= visible:
        return settings
    log.info("the cgroup's CPU quota allows %d of the %d CPUs this process sees: the model runs on %d "
             "thread(s) (set INFERSTACK_INFERENCE_THREADS to choose)", cpus, visible, cpus)
    return dataclasses.replace(settings, inference_threads=cpus)
