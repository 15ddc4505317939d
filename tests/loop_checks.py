"""Checks of a real run's ``metrics.jsonl`` that hold on any machine.

A run's trajectory (which answers are sampled, which groups end all tied) depends on the
processor's floating point, so these checks never pin it: they assert what the loop guarantees
whatever the trajectory, reading from the records which steps updated.
"""

from __future__ import annotations

from typing import Any


def updated(record: dict[str, Any]) -> bool:
    """Whether the step's update was applied (the learner skips one whose groups are all tied,
    or whose loss or gradients are not finite, and publishes no version for it)."""
    return not record["learner"].get("skipped_step")


def assert_versions_follow_updates(records: list[dict[str, Any]], first_version: int = 0) -> int:
    """At staleness 0 without faults: the weight version rises by one on exactly the steps whose
    update was applied, each step samples with the version the step before it left, and most
    steps update (at least half: a run of two steps may skip one). Returns the final version."""
    version = first_version
    for record in records:
        assert record["rollout_versions"] == [version], (record["step"], record["rollout_versions"], version)
        version += int(updated(record))
        assert record["weight_version"] == version, (record["step"], record["weight_version"], version)
    applied = sum(updated(r) for r in records)
    assert 2 * applied >= len(records), f"only {applied} of {len(records)} steps updated the weights"
    return version
