"""The Oracle-ranker pool: min..max named Ray actors fed from a queue, sized by its backlog.

Each actor (``ranker-0``, ``ranker-1``, ...) wraps a :class:`RankerWorker` and asks for the custom
resource ``ranker.resource`` so that the cluster launcher (``cluster/autoscale.yaml``) adds ranker
nodes when actors are pending and removes them when idle. The pool grows by one actor whenever
more than ``ranker.scale_up_backlog`` groups per actor wait, and shrinks back to
``ranker.min_actors`` after a call whose backlog never needed the extra actors. A dead actor is
replaced and its groups are ranked again, so no group is lost.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any

import ray
from ray.exceptions import RayActorError

from rlaif_ray.config import Config
from rlaif_ray.groups import Group
from rlaif_ray.ranker.worker import RankerWorker

log = logging.getLogger(__name__)


class RankerPool:
    """Driver-side manager of the ranker actors."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.actors: dict[str, Any] = {}
        self._next_index = 0
        self.scale_ups = 0
        self.scale_downs = 0
        self.restarts = 0
        self.counts: dict[str, int] = {"groups": 0, "attempts": 0, "ok": 0, "fallback_tie": 0, "dropped": 0}
        for _ in range(cfg.ranker.min_actors):
            self._add_actor()

    def _options(self, name: str) -> dict[str, Any]:
        rc = self.cfg.ranker
        options: dict[str, Any] = {"name": name, "num_cpus": rc.num_cpus_per_actor, "max_concurrency": 1}
        if rc.resource:
            options["resources"] = {rc.resource: 1}
        return options

    def _add_actor(self) -> str:
        name = f"ranker-{self._next_index}"
        self._next_index += 1
        actor_cls = ray.remote(RankerWorker).options(**self._options(name))
        self.actors[name] = actor_cls.remote(self.cfg.ranker, self.cfg.rl.group_size)
        return name

    def _remove_actor(self, name: str) -> None:
        ray.kill(self.actors.pop(name))

    @property
    def size(self) -> int:
        return len(self.actors)

    def rank(self, groups: list[Group]) -> list[Group]:
        """Rank every group (returned in the input order); grows the pool while the queue is long."""
        if not groups:
            return []
        chunk = max(1, math.ceil(len(groups) / (2 * self.cfg.ranker.max_actors)))
        queue = deque(range(i, min(i + chunk, len(groups))) for i in range(0, len(groups), chunk))
        results: dict[int, Group] = {}
        in_flight: dict[Any, tuple[str, range]] = {}
        busy: set[str] = set()
        peak_backlog = 0
        while queue or in_flight:
            backlog = sum(len(r) for r in queue)
            peak_backlog = max(peak_backlog, backlog)
            if (
                backlog > self.cfg.ranker.scale_up_backlog * self.size
                and self.size < self.cfg.ranker.max_actors
            ):
                name = self._add_actor()
                self.scale_ups += 1
                log.info("ranker pool: %d groups waiting, added %s (%d actors)", backlog, name, self.size)
            for name, actor in list(self.actors.items()):
                if queue and name not in busy:
                    rows = queue.popleft()
                    ref = actor.rank_groups.remote([groups[i] for i in rows])
                    in_flight[ref] = (name, rows)
                    busy.add(name)
            done, _ = ray.wait(list(in_flight), num_returns=1)
            name, rows = in_flight.pop(done[0])
            busy.discard(name)
            try:
                for i, group in zip(rows, ray.get(done[0]), strict=True):
                    results[i] = group
            except RayActorError as exc:
                log.warning(
                    "ranker actor %s died (%s); replacing it and re-queueing %d groups", name, exc, len(rows)
                )
                self.actors.pop(name, None)
                self.restarts += 1
                self._add_actor()
                queue.appendleft(rows)
        self._shrink(peak_backlog)
        ranked = [results[i] for i in range(len(groups))]
        for group in ranked:
            self.counts["groups"] += 1
            self.counts["attempts"] += group.rank_attempts
            self.counts[group.rank_status] = self.counts.get(group.rank_status, 0) + 1
        return ranked

    def _shrink(self, peak_backlog: int) -> None:
        needed = max(self.cfg.ranker.min_actors, math.ceil(peak_backlog / self.cfg.ranker.scale_up_backlog))
        while self.size > needed:
            name = sorted(self.actors, key=lambda n: int(n.split("-")[1]))[-1]
            self._remove_actor(name)
            self.scale_downs += 1
            log.info("ranker pool: idle, removed %s (%d actors)", name, self.size)

    def stats(self) -> dict[str, Any]:
        """Pool size, scaling events and what happened to the groups ranked so far."""
        return {
            "actors": self.size,
            "scale_ups": self.scale_ups,
            "scale_downs": self.scale_downs,
            "restarts": self.restarts,
            **self.counts,
        }
