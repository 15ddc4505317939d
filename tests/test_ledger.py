"""The group ledger under random sequences of the loop's events (hypothesis' stateful testing).

A small model of the loop drives :class:`GroupLedger`: rollout draws at the served version or
older, rankings that come back in any order (some dropped by the ranker's fallback), updates that
stand or whose learner dies (a restore rolls back to the last checkpoint), checkpoints, and a job
that stops and resumes from its newest checkpoint. After every event: ``sampled`` equals the sum
of the outcomes plus the live groups, no group is learned twice (the groups learned by updates
that stand are exactly ``learned``), no learned group's lag exceeds the bound, and every update
takes the oldest ranked groups first.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rlaif_ray.groups import Group
from rlaif_ray.ledger import OUTCOMES, GroupLedger, LedgerError


def make_group(group_id: str, version: int) -> Group:
    return Group(group_id, group_id, None, "q", "a", ["a", "b"], [[1], [2]], [[-0.1], [-0.2]], version)


class LoopModel(RuleBasedStateMachine):
    """The loop's events on one ledger; ``standing`` is the model's own record of what is learned."""

    def __init__(self) -> None:
        super().__init__()
        self.bound = 1
        self.ledger = GroupLedger(self.bound)
        self.version = 0  # what the learners hold
        self.job = 0
        self.draws = 0
        self.ranking: list[Group] = []  # with the ranker pool, in no particular order
        self.standing: set[str] = set()  # learned by updates that stand
        self.since_checkpoint: list[str] = []
        self.records: list[dict] = []  # the metrics records' ledger snapshots since the checkpoint
        self.checkpoint: tuple[dict, int, set[str]] | None = None  # snapshot, version, standing

    @rule(n=st.integers(1, 4), behind=st.integers(0, 3))
    def sample(self, n: int, behind: int) -> None:
        """A rollout actor returns a draw sampled ``behind`` versions ago (or by rolled-back weights)."""
        self.draws += 1
        version = max(0, self.version - behind)
        groups = [make_group(f"{self.job}.{self.draws}:{i}", version) for i in range(n)]
        to_rank = self.ledger.sampled(groups, self.draws)
        assert [g.group_id for g in to_rank] == [g.group_id for g in groups if version >= self.ledger.floor]
        self.ranking += to_rank

    @precondition(lambda self: self.ranking)
    @rule(data=st.data(), drop=st.booleans())
    def rank(self, data: st.DataObject, drop: bool) -> None:
        """Some groups come back from the rankers, in any order; ``drop``: the first is unranked."""
        chosen = data.draw(
            st.lists(st.sampled_from(self.ranking), min_size=1, unique_by=lambda g: g.group_id)
        )
        for i, group in enumerate(chosen):
            self.ranking.remove(group)
            group.ranks = None if drop and i == 0 else [0.0, 1.0]
        self.ledger.ranked(chosen)

    @rule(size=st.integers(1, 3), dies=st.booleans())
    def update(self, size: int, dies: bool) -> None:
        oldest = min((g.weight_version for g in self.ranking), default=None)
        waiting = self.ledger.waiting()
        batch = self.ledger.take_batch(self.version, size, oldest)
        if batch is None:
            return
        fresh = [g for g in waiting if self.version - g.weight_version <= self.bound]
        assert [g.group_id for g in batch] == [g.group_id for g in fresh[:size]]  # oldest first
        assert all(self.version - g.weight_version <= self.bound for g in batch)
        if dies:  # the update's learner dies: every learner restored from the last checkpoint
            self.ledger.roll_back(self.version + 1)
            self.standing -= set(self.since_checkpoint)
            self.since_checkpoint = []
            self.version += 1
            return
        assert self.ledger.learned() == len(batch)
        ids = {g.group_id for g in batch}
        assert not ids & self.standing, "a group learned twice"
        self.standing |= ids
        self.since_checkpoint += ids
        self.version += 1
        self.records.append(self.ledger.snapshot())

    @rule()
    def save_checkpoint(self) -> None:
        self.checkpoint = (self.ledger.snapshot(), self.version, set(self.standing))
        self.ledger.checkpointed()
        self.since_checkpoint, self.records = [], []

    @precondition(lambda self: self.checkpoint is not None)
    @rule()
    def stop_and_resume(self) -> None:
        """The job stops (what it had in flight is gone); a new job resumes from the checkpoint."""
        snapshot, version, standing = self.checkpoint
        # The resumed counts are the stopped job's at its last record (what it sampled after that
        # no record holds), else the checkpoint's.
        before = (self.records[-1] if self.records else snapshot)["sampled"]
        self.version = max(version, self.version) + 1
        self.ledger = GroupLedger.resumed(self.bound, snapshot, self.records, floor=self.version)
        assert self.ledger.counts["sampled"] == before  # nothing counted twice
        assert self.ledger.live == 0
        self.standing, self.since_checkpoint, self.records = set(standing), [], []
        self.ranking = []
        self.job += 1

    @invariant()
    def outcomes_add_up(self) -> None:
        counts = self.ledger.counts
        assert counts["sampled"] == sum(counts[k] for k in OUTCOMES) + self.ledger.live
        assert counts["learned"] == len(self.standing)
        assert self.ledger.live == len(self.ranking) + len(self.ledger.waiting())

    def teardown(self) -> None:
        self.ledger.end_run()
        counts = self.ledger.counts
        assert self.ledger.live == 0 and counts["sampled"] == sum(counts[k] for k in OUTCOMES)


LoopModel.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestLedgerUnderRandomEvents = LoopModel.TestCase


def test_a_transition_the_loop_never_makes_raises() -> None:
    ledger = GroupLedger(max_staleness=0)
    group = make_group("1:0", 0)
    ledger.sampled([group], draw=1)
    with pytest.raises(LedgerError, match="sampled twice"):
        ledger.sampled([make_group("1:0", 0)], draw=2)
    with pytest.raises(LedgerError, match="no group was being learned"):
        ledger.learned()
    group.ranks = [0.0, 1.0]
    ledger.ranked([group])
    with pytest.raises(LedgerError, match="should be ranking, but is ready"):
        ledger.ranked([group])
    with pytest.raises(LedgerError, match="above 0"):
        ledger.roll_back(0)


def test_a_stale_group_is_dropped_and_a_last_chance_group_is_waited_for() -> None:
    ledger = GroupLedger(max_staleness=1)
    old, new = make_group("1:0", 0), make_group("2:0", 1)
    ledger.sampled([old], 1)
    ledger.sampled([new], 2)
    new.ranks = [0.0, 1.0]
    ledger.ranked([new])
    # ``old`` (version 0) is still being ranked and the update at version 1 is its last chance.
    assert ledger.take_batch(1, 1, oldest_pending=0) is None
    old.ranks = [0.0, 1.0]
    ledger.ranked([old])
    assert [g.group_id for g in ledger.take_batch(1, 1, oldest_pending=None)] == ["1:0"]
    ledger.learned()
    # At version 3, ``new`` (version 1) is two versions behind: dropped as stale.
    assert ledger.take_batch(3, 1, oldest_pending=None) is None
    assert ledger.counts["dropped_stale"] == 1 and ledger.counts["learned"] == 1
