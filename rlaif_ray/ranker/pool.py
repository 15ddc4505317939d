"""The Oracle-ranker pool: min..max named Ray actors fed from a queue, sized by its backlog.

Each actor (``ranker-0``, ``ranker-1``, ...) wraps a :class:`RankerWorker` and asks for the custom
resource ``ranker.resource`` so that the cluster launcher (``cluster/autoscale.yaml``) adds ranker
nodes when actors are pending and removes them when idle.

Groups stream through it: :meth:`RankerPool.submit` queues them, :meth:`RankerPool.dispatch` keeps
:data:`CALLS_PER_ACTOR` chunks of the queue with every actor (each exactly one wave of its
backend's concurrent requests, which the backend class declares (``concurrency_for``:
``ranker.openai_max_concurrency`` for the ``openai`` backend), or for a backend that ranks one
group at a time a fair share of a long queue): an actor never waits for the driver between chunks,
and an actor whose backend ranks several groups at once runs its two chunks at once, so its
requests start as earlier ones finish instead of draining at the end of each chunk (the backend
still holds at most ``ranker.openai_max_concurrency`` requests in flight). The driver waits on
:meth:`RankerPool.in_flight` together with its other work and passes each finished reference to
:meth:`RankerPool.collect`, which returns that chunk's ranked groups.
:meth:`RankerPool.rank` does all of that for one list and returns it in order. The pool grows by one
actor whenever more than ``ranker.scale_up_backlog`` groups per actor wait, and retires an actor
that has had nothing to do for ``ranker.idle_grace_s`` seconds (down to ``ranker.min_actors``): a
steady backlog keeps every actor busy and the pool at its size, while between bursts the idle actors
go, and with them the ranker nodes the autoscaler added. Idleness is a matter of time, so the driver
also calls :meth:`RankerPool.retire_idle` and :meth:`RankerPool.kill_stuck` when its wait (bounded
by :meth:`RankerPool.seconds_to_wait`) ends with nothing finished. An actor that finishes no chunk
within ``rl.actor_timeout_s`` plus ``ranker.group_deadline_s`` per group it ranks in turn is
stuck (alive, not answering): it is killed (counted in ``stuck``) and handled as dead. A dead actor is replaced
(counted in ``restarts``) and its groups are ranked again, each in a chunk of its own on an actor
with nothing else to do, so no group is lost and a group that kills its ranker takes no other group
down with it; a group whose ranker died under it :data:`MAX_ACTOR_DEATHS` times gets the fallback
instead, so that it cannot stall the run. An actor that cannot even start (its backend's settings)
stops the run with the reason.

:meth:`RankerPool.stats` adds up the workers' counters (:data:`rlaif_ray.ranker.worker.COUNTERS`:
invalid answers, retries, fallbacks, deadline expiries, ...) chunk by chunk, so they outlive the
actors; ``launch`` writes them per step to ``metrics.jsonl`` and at the end to ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter, deque
from typing import Any

import ray
from ray.exceptions import RayActorError

from rlaif_ray.config import Config
from rlaif_ray.groups import Group
from rlaif_ray.process import ask_whereabouts, kill_for_certain
from rlaif_ray.ranker.backends import backend_class
from rlaif_ray.ranker.worker import COUNTERS, RankerWorker, apply_fallback
from rlaif_ray.telemetry import Telemetry

log = logging.getLogger(__name__)

# A group whose ranker actor died this many times while ranking it gets the fallback.
MAX_ACTOR_DEATHS = 3
# Chunks handed to each actor at once: the next one is there when the first finishes.
CALLS_PER_ACTOR = 2


class RankerPool:
    """Driver-side manager of the ranker actors."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.actors: dict[str, Any] = {}
        self._next_index = 0
        self.scale_ups = 0
        self.scale_downs = 0
        self.restarts = 0
        self.stuck = 0  # actors killed for answering nothing within their deadline
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self._deaths: Counter[str] = Counter()  # group id -> ranker actors that died ranking it
        self._queue: deque[Group] = deque()
        self._suspects: deque[Group] = deque()  # groups whose ranker died: ranked alone, first
        # object reference -> (actor name, chunk, whether the chunk is a suspect ranked alone)
        self._in_flight: dict[Any, tuple[str, list[Group], bool]] = {}
        self._idle_since: dict[str, float] = {}  # actor name -> when it last had nothing to do
        self._busy_since: dict[str, float] = {}  # actor name -> when it last started or finished a chunk
        self._where: dict[str, Any] = {}  # actor name -> its (node, pid), to kill it for certain
        self.telemetry = Telemetry("ranker", "pool")
        for _ in range(cfg.ranker.min_actors):
            self._add_actor()

    def _options(self, name: str) -> dict[str, Any]:
        rc = self.cfg.ranker
        options: dict[str, Any] = {
            "name": name,
            "num_cpus": rc.num_cpus_per_actor,
            "num_gpus": rc.num_gpus_per_actor,
            # a backend of concurrent requests (I/O) runs the actor's chunks at once; another in turn
            "max_concurrency": CALLS_PER_ACTOR if self._requests_per_actor() > 1 else 1,
        }
        if rc.resource:
            options["resources"] = {rc.resource: 1}
        return options

    def _add_actor(self) -> str:
        name = f"ranker-{self._next_index}"
        self._next_index += 1
        actor_cls = ray.remote(RankerWorker).options(**self._options(name))
        self.actors[name] = actor_cls.remote(
            self.cfg.ranker,
            self.cfg.rl.group_size,
            num_frames=self.cfg.model.num_frames,
            max_video_pixels=self.cfg.data.max_video_pixels,
            log_level=self.cfg.log_level,
            plugins=self.cfg.plugins,
        )
        self._where[name] = ask_whereabouts(self.actors[name])
        self._idle_since[name] = time.monotonic()
        return name

    def _remove_actor(self, name: str) -> None:
        self._idle_since.pop(name, None)
        self._busy_since.pop(name, None)
        self._where.pop(name, None)
        ray.kill(self.actors.pop(name))

    def _allowance_s(self, name: str) -> float:
        """How long actor ``name`` may go without finishing a chunk: ``rl.actor_timeout_s`` plus
        ``ranker.group_deadline_s`` for each group of its largest chunk that it ranks in turn."""
        rc = self.cfg.ranker
        largest = max((len(chunk) for n, chunk, _ in self._in_flight.values() if n == name), default=0)
        turns = math.ceil(largest / max(1, self._requests_per_actor()))
        return self.cfg.rl.actor_timeout_s + turns * rc.group_deadline_s

    def seconds_to_deadline(self) -> float | None:
        """Seconds until the first busy actor misses its deadline (0: one has), None if none is busy."""
        now = time.monotonic()
        left = [since + self._allowance_s(name) - now for name, since in self._busy_since.items()]
        return max(0.0, min(left)) if left else None

    def kill_stuck(self) -> list[str]:
        """Kill every actor that has finished no chunk within its deadline (alive but stuck: a
        wedged client, a stopped process); its chunks then fail and :meth:`collect` replaces it
        and ranks them again, as for an actor that died. Returns their names."""
        now = time.monotonic()
        stuck = []
        for name, since in list(self._busy_since.items()):
            refs = [ref for ref, (n, _, _) in self._in_flight.items() if n == name]
            if now - since <= self._allowance_s(name) or not refs:
                continue
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            if not ready:  # (a chunk that finished, or failed, is collected as it comes)
                stuck.append(name)
        for name in stuck:
            groups = [g.group_id for n, chunk, _ in self._in_flight.values() if n == name for g in chunk]
            log.warning(
                "ranker actor %s finished nothing for %.0f s (rl.actor_timeout_s=%g + "
                "ranker.group_deadline_s per group in turn) while ranking groups %s: killed",
                name,
                now - self._busy_since[name],
                self.cfg.rl.actor_timeout_s,
                groups[:4],
            )
            kill_for_certain(self.actors[name], self._where[name])
            del self._busy_since[name]
            self.stuck += 1
        return stuck

    @property
    def size(self) -> int:
        return len(self.actors)

    @property
    def backlog(self) -> int:
        """Groups queued and not yet handed to an actor."""
        return len(self._queue) + len(self._suspects)

    @property
    def pending(self) -> int:
        """Groups submitted and not yet collected (queued or being ranked)."""
        return self.backlog + sum(len(chunk) for _, chunk, _ in self._in_flight.values())

    def oldest_pending_version(self) -> int | None:
        """The oldest weight version among the groups submitted and not yet collected (None if none)."""
        pending = [
            *self._queue,
            *self._suspects,
            *(g for _, chunk, _ in self._in_flight.values() for g in chunk),
        ]
        return min((g.weight_version for g in pending), default=None)

    def submit(self, groups: list[Group]) -> None:
        """Queue ``groups`` for ranking and hand them to idle actors."""
        self._queue.extend(groups)
        self.dispatch()

    def _chunk_size(self) -> int:
        """Groups per call. A backend of concurrent requests: one wave of them (a larger chunk
        holds its actor for several waves, while the others may run dry at the end of a queue).
        A backend that ranks one group at a time (in microseconds, where the call costs more):
        a share of a long queue spread over ``max_actors`` actors, ``CALLS_PER_ACTOR`` calls each."""
        if self._requests_per_actor() > 1:
            return self._requests_per_actor()
        return math.ceil(len(self._queue) / (CALLS_PER_ACTOR * self.cfg.ranker.max_actors))

    def _requests_per_actor(self) -> int:
        """How many groups an actor's backend ranks at once."""
        return backend_class(self.cfg.ranker.backend).concurrency_for(self.cfg.ranker)

    def dispatch(self) -> None:
        """Grow the pool when the backlog is long, then hand queued chunks to the actors, one round
        at a time, until each holds :data:`CALLS_PER_ACTOR` (a suspect group goes alone to an actor
        that holds nothing, and that actor gets nothing more until it is back)."""
        backlog = self.backlog
        while (
            backlog > self.cfg.ranker.scale_up_backlog * self.size and self.size < self.cfg.ranker.max_actors
        ):
            name = self._add_actor()
            self.scale_ups += 1
            log.info("ranker pool: %d groups waiting, added %s (%d actors)", backlog, name, self.size)
        held = Counter(name for name, _, _ in self._in_flight.values())
        alone = {name for name, _, suspect in self._in_flight.values() if suspect}
        for depth in range(1, CALLS_PER_ACTOR + 1):
            for name, actor in list(self.actors.items()):
                if held[name] >= depth or name in alone:
                    continue
                suspect = bool(self._suspects) and not held[name]
                if suspect:
                    chunk = [self._suspects.popleft()]
                    alone.add(name)
                elif self._queue and not self._suspects:  # (with suspects waiting, actors drain)
                    size = self._chunk_size()
                    chunk = [self._queue.popleft() for _ in range(min(size, len(self._queue)))]
                else:
                    continue
                # The encoder features stay here (no backend reads them): collect() puts them back.
                sent = [dataclasses.replace(g, visual_features=None) for g in chunk]
                self._in_flight[actor.rank_chunk.remote(sent)] = (name, chunk, suspect)
                if not held[name]:
                    self._busy_since[name] = time.monotonic()
                held[name] += 1
                self._idle_since.pop(name, None)
        self.telemetry.set("rlaif_ranker_queue_depth", self.backlog)
        self.telemetry.set("rlaif_ranker_pool_size", self.size)

    def in_flight(self) -> list[Any]:
        """The object references of the chunks being ranked now (to ``ray.wait`` on)."""
        return list(self._in_flight)

    def collect(self, ref: Any) -> list[Group]:
        """The ranked groups of the finished chunk ``ref``. When its actor died, the actor is replaced
        and the chunk queued again (only the groups that reached :data:`MAX_ACTOR_DEATHS` come back,
        with the fallback). Dispatches the next chunks."""
        name, chunk, _ = self._in_flight.pop(ref)
        try:
            ranked, counts = ray.get(ref)
        except RayActorError as exc:
            if exc.actor_init_failed:  # a setting, not a fault: every replacement would fail alike
                raise RuntimeError(f"ranker actor {name} could not start its backend: {exc}") from exc
            ranked, counts = self._replace(name, chunk, exc), {}
        else:
            features = {g.group_id: g.visual_features for g in chunk}
            for group in ranked:
                self._deaths.pop(group.group_id, None)
                group.visual_features = features[group.group_id]
        errors = counts.pop("errors", {})
        self.counts.update(counts)
        self.errors.update(errors)
        if name in self.actors and all(n != name for n, _, _ in self._in_flight.values()):
            self._idle_since[name] = time.monotonic()
            self._busy_since.pop(name, None)
        elif name in self.actors:
            self._busy_since[name] = time.monotonic()  # it finished a chunk: it is not stuck
        self.dispatch()
        self.retire_idle()
        return ranked

    def _replace(self, name: str, chunk: list[Group], exc: Exception) -> list[Group]:
        """Replace the dead actor ``name`` (once: its other chunk fails alike); queue its chunk's
        groups again, one chunk each, except the groups it was the :data:`MAX_ACTOR_DEATHS`-th
        death of: those are returned with the fallback."""
        if self.actors.pop(name, None) is not None:
            self._where.pop(name, None)
            self.restarts += 1
            self.telemetry.count("rlaif_actor_restarts")
            self._add_actor()
        again, given_up = [], []
        for group in chunk:
            self._deaths[group.group_id] += 1
            (given_up if self._deaths[group.group_id] >= MAX_ACTOR_DEATHS else again).append(group)
        log.warning(
            "ranker actor %s died (%s); replaced it (restart %d) and re-queued %d groups",
            name,
            exc,
            self.restarts,
            len(again),
        )
        self._suspects.extend(again)
        fallback = self.cfg.ranker.fallback
        for group in given_up:
            del self._deaths[group.group_id]
            status = apply_fallback(group, fallback)
            log.warning(
                "ranker: group %s was being ranked by %d ranker actors that died; %s (ranker.fallback=%s)",
                group.group_id,
                MAX_ACTOR_DEATHS,
                status,
                fallback,
            )
            self.counts.update({"groups": 1, "fallbacks": 1, status: 1})
        return given_up

    def rank(self, groups: list[Group]) -> list[Group]:
        """Rank every group and return them in the input order (blocking; group ids must be unique)."""
        position = {g.group_id: i for i, g in enumerate(groups)}
        if len(position) != len(groups):
            raise ValueError("RankerPool.rank needs groups with distinct group_id")
        self.submit(groups)
        results: dict[int, Group] = {}
        while len(results) < len(groups):
            done, _ = ray.wait(self.in_flight(), num_returns=1, timeout=self.seconds_to_wait())
            if not done:
                self.kill_stuck()
                self.retire_idle()
                continue
            for group in self.collect(done[0]):
                results[position[group.group_id]] = group
        return [results[i] for i in range(len(groups))]

    def seconds_to_wait(self) -> float | None:
        """How long a driver waiting on :meth:`in_flight` may wait before it must call
        :meth:`kill_stuck` and :meth:`retire_idle` (None: until a chunk finishes)."""
        due = [t for t in (self.seconds_to_retirement(), self.seconds_to_deadline()) if t is not None]
        return min(due) if due else None

    def seconds_to_retirement(self) -> float | None:
        """Seconds until the next idle actor is due to retire (0 if one is due now), or None when
        none can retire (the pool is at ``ranker.min_actors``): how long a waiting driver may wait
        before it calls :meth:`retire_idle`."""
        if self.size <= self.cfg.ranker.min_actors or not self._idle_since or self.backlog:
            return None
        due = min(self._idle_since.values()) + self.cfg.ranker.idle_grace_s
        return max(0.0, due - time.monotonic())

    def retire_idle(self) -> list[str]:
        """Remove the actors idle for at least ``ranker.idle_grace_s`` seconds, longest idle first,
        keeping ``ranker.min_actors``; returns their names. Nothing retires while groups wait."""
        if self.backlog:
            return []
        now = time.monotonic()
        due = [n for n, since in self._idle_since.items() if now - since >= self.cfg.ranker.idle_grace_s]
        retired = []
        for name in sorted(due, key=lambda n: (self._idle_since[n], -int(n.split("-")[1]))):
            if self.size <= self.cfg.ranker.min_actors:
                break
            idle_s = now - self._idle_since[name]
            self._remove_actor(name)
            self.scale_downs += 1
            retired.append(name)
            log.info("ranker pool: %s idle for %.0f s, retired (%d actors)", name, idle_s, self.size)
        if retired:
            self.telemetry.set("rlaif_ranker_pool_size", self.size)
        return retired

    def stats(self) -> dict[str, Any]:
        """Pool size, scaling events, ranker actor restarts, and what happened to the groups ranked
        so far: :data:`rlaif_ray.ranker.worker.COUNTERS` and ``errors`` (failed attempts by kind)."""
        return {
            "actors": self.size,
            "scale_ups": self.scale_ups,
            "scale_downs": self.scale_downs,
            "restarts": self.restarts,
            "stuck": self.stuck,
            **{key: self.counts[key] for key in COUNTERS},
            "errors": dict(self.errors),
        }
