"""CPU settings each actor applies to its own process when it starts: torch threads and cores."""

from __future__ import annotations

import os
import signal
from typing import Any

import torch


def configure_cpu(num_threads: int, cpu_cores: list[int], key: str) -> None:
    """Set this process's torch threads (0: leave them) and pin every thread of it to ``cpu_cores``
    (empty: leave the OS to schedule it anywhere it may run).

    Every existing thread is pinned (Ray's own threads and any pool torch started), and threads
    started later inherit it. ``key`` is the config section (``rollout``, ``learner``, ``ranker``) the
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


def whereabouts() -> tuple[str, int]:
    """(Ray node id, process id) of the calling process: what :func:`kill_for_certain` needs."""
    import ray

    return ray.get_runtime_context().get_node_id(), os.getpid()


def ask_whereabouts(actor: Any) -> Any:
    """A reference to ``actor``'s :func:`whereabouts` (answered after its ``__init__``)."""
    return actor.__ray_call__.remote(lambda _: whereabouts())


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it exited after all


def kill_for_certain(actor: Any, where: Any, no_restart: bool = True) -> None:
    """``ray.kill(actor, no_restart=no_restart)``, then SIGKILL to its process from a task on its
    node, where ``where`` is the reference :func:`ask_whereabouts` gave for the process to kill
    (skipped if it never answered). Ray's kill asks the worker to exit and force-kills it only when
    that request hangs; when the request fails at once (Ray 2.60, a stopped process it had no
    connection to yet) the process lives on, holding its resources, and a replacement or restart
    that needs them never starts."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.kill(actor, no_restart=no_restart)
    ready, _ = ray.wait([where], timeout=0)
    if not ready:
        return
    node, pid = ray.get(ready[0])
    strategy = NodeAffinitySchedulingStrategy(node, soft=False)
    ray.remote(_sigkill).options(num_cpus=0, scheduling_strategy=strategy).remote(pid)
