"""CPU settings each actor applies to its own process when it starts: torch threads and cores."""

from __future__ import annotations

import os

import torch


def configure_cpu(num_threads: int, cpu_cores: list[int], key: str) -> None:
    """Set this process's torch threads (0: leave them) and pin every thread of it to ``cpu_cores``
    (empty: leave the OS to schedule it anywhere it may run).

    Every existing thread is pinned (Ray's own threads and any pool torch started), and threads
    started later inherit it. ``key`` is the config section (``rollout``, ``learner``) the
    settings came from, named in the error when a core is not one this process may use.
    """
    if cpu_cores:
        allowed = os.sched_getaffinity(0)
        if missing := sorted(set(cpu_cores) - allowed):
            raise ValueError(
                f"config key '{key}.cpu_cores' = {cpu_cores}: cores {missing} are not available "
                f"to this process (it may run on cores {sorted(allowed)})"
            )
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cpu_cores)
            except ProcessLookupError:
                pass  # the thread ended since the listing
    if num_threads:
        torch.set_num_threads(num_threads)
