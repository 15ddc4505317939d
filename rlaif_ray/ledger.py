"""Every sampled group's life in the RL loop, from its sampling to its one outcome.

A plain class without Ray: the driver (:class:`rlaif_ray.launch.Trainer`) tells the ledger what
happened to groups (sampled, ranked, taken into an update, learned, rolled back) and asks it which
groups the next update learns; tests drive it with random sequences of events.

A group is *live* while it is being ranked, ranked and waiting, or in the update being learned,
and then ends in exactly one outcome (:data:`OUTCOMES`). After every transition the ledger checks
``sampled == sum(outcomes) + live`` and raises :class:`LedgerError` on a violation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from rlaif_ray.groups import Group

log = logging.getLogger(__name__)

# What becomes of a sampled group. ``learned``: an update that stands learned it (its
# ``skipped_tied`` part carried no signal); ``dropped_stale``: older than the staleness bound
# allows; ``dropped_unranked``: the ranker's "drop" fallback; ``dropped_rolled_back``: sampled by
# weights that a learner restore undid, or in the update that died; ``rolled_back``: learned by an
# update that a restore (or a resume) undid; ``lost_at_stop``: live when the job stopped (counted
# on resume); ``unlearned_at_end``: live when the run reached its last update.
OUTCOMES = (
    "learned",
    "dropped_stale",
    "dropped_unranked",
    "dropped_rolled_back",
    "rolled_back",
    "lost_at_stop",
    "unlearned_at_end",
)
RANKING, READY, LEARNING = "ranking", "ready", "learning"


class LedgerError(RuntimeError):
    """A transition the loop must never make (a bug in the driver, not a fault of an actor)."""


@dataclass
class _Entry:
    group: Group
    order: tuple[int, int]  # (draw, position in the draw): the sampling order
    state: str


class GroupLedger:
    """The groups of one job: live ones by state, outcomes counted, lags bounded."""

    def __init__(self, max_staleness: int) -> None:
        self.max_staleness = max_staleness
        self.counts: dict[str, int] = {"sampled": 0, **dict.fromkeys(OUTCOMES, 0)}
        # Not outcomes: learned groups whose answers were all tied (no signal), and updates the
        # learner skipped for a non-finite loss or gradient.
        self.skipped_tied = 0
        self.skipped_nonfinite_updates = 0
        self.floor = 0  # groups sampled below this weight version were sampled by rolled-back weights
        self._live: dict[str, _Entry] = {}
        self._seen: set[str] = set()  # every group id this job sampled: none is sampled twice
        self._since_checkpoint: list[int] = []  # groups learned by each update since the last checkpoint

    # ---- what the loop reports

    def sampled(self, groups: list[Group], draw: int) -> list[Group]:
        """Groups a rollout actor returned for sampling request ``draw``; returns those to rank
        (the others were sampled by rolled-back weights and are dropped)."""
        to_rank = []
        for position, group in enumerate(groups):
            if group.group_id in self._seen:
                raise LedgerError(f"group {group.group_id} was sampled twice")
            self._seen.add(group.group_id)
            self.counts["sampled"] += 1
            if group.weight_version < self.floor:
                self.counts["dropped_rolled_back"] += 1
            else:
                self._live[group.group_id] = _Entry(group, (draw, position), RANKING)
                to_rank.append(group)
        self._check()
        return to_rank

    def ranked(self, groups: list[Group]) -> None:
        """Groups back from the ranker pool (``ranks`` None: the "drop" fallback)."""
        for group in groups:
            entry = self._entry(group.group_id, RANKING)
            if group.ranks is None:
                self._end(group.group_id, "dropped_unranked")
            elif group.weight_version < self.floor:
                self._end(group.group_id, "dropped_rolled_back")
            else:
                entry.group, entry.state = group, READY
        self._check()

    def take_batch(self, version: int, size: int, oldest_pending: int | None) -> list[Group] | None:
        """The next update's ``size`` groups, or None while too few are ready.

        Ready groups whose lag (``version`` - the version that sampled them) exceeds the bound are
        dropped first. Then the oldest version first (a group ranked late must not fall behind
        newer ones and out of the bound), then sampling order, so that a run does not depend on
        ranking times. When a group still being sampled or ranked (the oldest of them sampled
        by ``oldest_pending``) has this update as its last chance and a newer ready group would
        take its place, the batch waits for it (None) rather than drop it as stale later.
        """
        for group in self.waiting():
            if version - group.weight_version > self.max_staleness:
                log.warning(
                    "group %s of version %d is too old: dropped", group.group_id, group.weight_version
                )
                self._end(group.group_id, "dropped_stale")
        self._check()
        ready = self.waiting()
        if len(ready) < size:
            return None
        batch = ready[:size]
        last_chance = oldest_pending is not None and version + 1 - oldest_pending > self.max_staleness
        if last_chance and batch[-1].weight_version > oldest_pending:
            return None
        for group in batch:
            self._live[group.group_id].state = LEARNING
        return batch

    def learned(self, skipped_tied: int = 0, skipped_nonfinite: bool = False) -> int:
        """The update of the groups being learned stands; returns how many it learned."""
        done = [gid for gid, e in self._live.items() if e.state == LEARNING]
        if not done:
            raise LedgerError("an update finished, but no group was being learned")
        for gid in done:
            self._end(gid, "learned")
        self._since_checkpoint.append(len(done))
        self.skipped_tied += skipped_tied
        self.skipped_nonfinite_updates += int(skipped_nonfinite)
        self._check()
        return len(done)

    def checkpointed(self) -> None:
        """A checkpoint now holds every update learned so far: a restore no longer undoes them."""
        self._since_checkpoint = []

    def roll_back(self, floor: int) -> tuple[int, int]:
        """The learners were restored from the last checkpoint and serve weight version ``floor``:
        the updates since that checkpoint are undone (their groups ``rolled_back``), the update
        being learned died (``dropped_rolled_back``), and every live group sampled below ``floor``
        is dropped now or when it comes back from the ranker. Returns (updates, groups) undone."""
        if floor <= self.floor:
            raise LedgerError(f"a restore must serve a version above {self.floor}, not {floor}")
        updates, groups = len(self._since_checkpoint), sum(self._since_checkpoint)
        self.counts["learned"] -= groups
        self.counts["rolled_back"] += groups
        self._since_checkpoint = []
        self.floor = floor
        for gid, entry in list(self._live.items()):
            if entry.state == LEARNING or (entry.state == READY and entry.group.weight_version < floor):
                self._end(gid, "dropped_rolled_back")
        self._check()
        return updates, groups

    def end_run(self) -> None:
        """The last update is done: what is still live stays unlearned."""
        for gid in list(self._live):
            self._end(gid, "unlearned_at_end")
        self._check()

    # ---- what the loop asks

    @property
    def live(self) -> int:
        """Groups being ranked, ranked and waiting, or being learned."""
        return len(self._live)

    def waiting(self) -> list[Group]:
        """The ranked groups waiting for an update, in the order updates take them."""
        ready = sorted(
            (e for e in self._live.values() if e.state == READY),
            key=lambda e: (e.group.weight_version, e.order),
        )
        return [e.group for e in ready]

    # ---- checkpoints and resume

    def snapshot(self) -> dict[str, Any]:
        """What a checkpoint or a metrics record keeps: the counts and how many groups are live."""
        return {
            **self.counts,
            "skipped_tied": self.skipped_tied,
            "skipped_nonfinite_updates": self.skipped_nonfinite_updates,
            "live": self.live,
            "since_checkpoint": sum(self._since_checkpoint),
        }

    @classmethod
    def resumed(
        cls, max_staleness: int, at_checkpoint: dict[str, Any], later: list[dict[str, Any]], floor: int
    ) -> GroupLedger:
        """The ledger of a job resumed from the newest checkpoint, whose :meth:`snapshot` is
        ``at_checkpoint``, and serving weight version ``floor``.

        ``later`` are the stopped job's :meth:`snapshot` at each update it recorded after that
        checkpoint. Its counts are taken from the last of them; the groups it learned since the
        checkpoint are rolled back (the learners start from the checkpoint), and what was live
        then is lost with the stopped job. Without later updates, what was live at the checkpoint
        is lost. Nothing live comes back, so nothing is learned twice.
        """
        ledger = cls(max_staleness)
        last = later[-1] if later else at_checkpoint
        ledger.counts.update({k: int(last.get(k, 0)) for k in ledger.counts})
        ledger.skipped_tied = int(at_checkpoint.get("skipped_tied", 0))
        ledger.skipped_nonfinite_updates = int(at_checkpoint.get("skipped_nonfinite_updates", 0))
        undone = int(last["since_checkpoint"]) if later else 0
        ledger.counts["learned"] -= undone
        ledger.counts["rolled_back"] += undone
        ledger.counts["lost_at_stop"] += int(last["live"])
        ledger.floor = floor
        ledger._check()
        return ledger

    # ---- inside

    def _entry(self, group_id: str, state: str) -> _Entry:
        entry = self._live.get(group_id)
        if entry is None or entry.state != state:
            found = "not live" if entry is None else entry.state
            raise LedgerError(f"group {group_id} should be {state}, but is {found}")
        return entry

    def _end(self, group_id: str, outcome: str) -> None:
        del self._live[group_id]
        self.counts[outcome] += 1

    def _check(self) -> None:
        ended = sum(self.counts[k] for k in OUTCOMES)
        if self.counts["sampled"] != ended + self.live or min(self.counts.values()) < 0:
            raise LedgerError(f"sampled != outcomes + live: {self.counts}, live {self.live}")
