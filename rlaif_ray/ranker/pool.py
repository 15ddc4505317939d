"""The Oracle-ranker pool: min..max named Ray actors fed from a queue, sized by its backlog.

Each actor (``ranker-0``, ``ranker-1``, ...) wraps a :class:`RankerWorker` and asks for the custom
resource ``ranker.resource`` so that the cluster launcher (``cluster/autoscale.yaml``) adds ranker
nodes when actors are pending and removes them when idle.

Groups stream through it: :meth:`RankerPool.submit` queues them, :meth:`RankerPool.dispatch` hands
each idle actor a chunk of the queue (enough groups to fill its backend's concurrent requests,
``ranker.openai_max_concurrency`` for the ``openai`` backend, and a fair share of a long queue),
and the driver waits on :meth:`RankerPool.in_flight` together with its
other work and passes each finished reference to :meth:`RankerPool.collect`, which returns that
chunk's ranked groups. :meth:`RankerPool.rank` does all of that for one list and returns it in order.
The pool grows by one actor whenever more than ``ranker.scale_up_backlog`` groups per actor wait,
and shrinks back to what its peak backlog needed whenever it runs empty. A dead actor is replaced
and its groups are ranked again, so no group is lost.
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
        self._queue: deque[Group] = deque()
        self._in_flight: dict[Any, tuple[str, list[Group]]] = {}
        self._peak_backlog = 0
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

    @property
    def backlog(self) -> int:
        """Groups queued and not yet handed to an actor."""
        return len(self._queue)

    @property
    def pending(self) -> int:
        """Groups submitted and not yet collected (queued or being ranked)."""
        return self.backlog + sum(len(chunk) for _, chunk in self._in_flight.values())

    def submit(self, groups: list[Group]) -> None:
        """Queue ``groups`` for ranking and hand them to idle actors."""
        self._queue.extend(groups)
        self.dispatch()

    def _chunk_size(self) -> int:
        """Groups per call: what the backend ranks at once, or a share of a long queue spread over
        ``max_actors`` actors (two calls each), whichever is larger."""
        rc = self.cfg.ranker
        concurrent = rc.openai_max_concurrency if rc.backend == "openai" else 1
        return max(concurrent, math.ceil(len(self._queue) / (2 * rc.max_actors)))

    def dispatch(self) -> None:
        """Grow the pool when the backlog is long, then hand queued chunks to idle actors."""
        backlog = self.backlog
        self._peak_backlog = max(self._peak_backlog, backlog)
        while (
            backlog > self.cfg.ranker.scale_up_backlog * self.size and self.size < self.cfg.ranker.max_actors
        ):
            name = self._add_actor()
            self.scale_ups += 1
            log.info("ranker pool: %d groups waiting, added %s (%d actors)", backlog, name, self.size)
        busy = {name for name, _ in self._in_flight.values()}
        for name, actor in list(self.actors.items()):
            if self._queue and name not in busy:
                size = self._chunk_size()
                chunk = [self._queue.popleft() for _ in range(min(size, len(self._queue)))]
                self._in_flight[actor.rank_groups.remote(chunk)] = (name, chunk)

    def in_flight(self) -> list[Any]:
        """The object references of the chunks being ranked now (to ``ray.wait`` on)."""
        return list(self._in_flight)

    def collect(self, ref: Any) -> list[Group]:
        """The ranked groups of the finished chunk ``ref`` ([] when its actor died: the chunk is
        queued again on a replacement actor). Dispatches the next chunks."""
        name, chunk = self._in_flight.pop(ref)
        try:
            ranked = ray.get(ref)
        except RayActorError as exc:
            log.warning(
                "ranker actor %s died (%s); replacing it and re-queueing %d groups", name, exc, len(chunk)
            )
            self.actors.pop(name, None)
            self.restarts += 1
            self._add_actor()
            self._queue.extendleft(reversed(chunk))
            ranked = []
        for group in ranked:
            self.counts["groups"] += 1
            self.counts["attempts"] += group.rank_attempts
            self.counts[group.rank_status] = self.counts.get(group.rank_status, 0) + 1
        if not self.pending:
            self._shrink()
        self.dispatch()
        return ranked

    def rank(self, groups: list[Group]) -> list[Group]:
        """Rank every group and return them in the input order (blocking; group ids must be unique)."""
        position = {g.group_id: i for i, g in enumerate(groups)}
        if len(position) != len(groups):
            raise ValueError("RankerPool.rank needs groups with distinct group_id")
        self.submit(groups)
        results: dict[int, Group] = {}
        while len(results) < len(groups):
            done, _ = ray.wait(self.in_flight(), num_returns=1)
            for group in self.collect(done[0]):
                results[position[group.group_id]] = group
        return [results[i] for i in range(len(groups))]

    def _shrink(self) -> None:
        needed = max(
            self.cfg.ranker.min_actors, math.ceil(self._peak_backlog / self.cfg.ranker.scale_up_backlog)
        )
        self._peak_backlog = 0
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
