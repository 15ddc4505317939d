"""The benchmarks' own parts that a change to the package can break unseen (nothing else runs
them in CI): the weight-sync stand-ins run the real export and load path."""

from __future__ import annotations

import pytest

from bench.weight_sync import StandInLearner, StandInRollout
from rlaif_ray.config import Config


@pytest.mark.parametrize("flat", [True, False])
def test_weight_sync_stand_ins_serve_the_learners_version(small_config: Config, flat: bool) -> None:
    learner = StandInLearner(small_config, layers=1, dtype="bfloat16", threads=1, flat=flat)
    rollout = StandInRollout(small_config, 0, layers=1, dtype="bfloat16", threads=1)
    assert "rollout-0" in repr(rollout)  # the Ray dashboard's name for the actor
    learner.bump(1)
    message = learner.export_weights()
    assert len(message.buffers) == (1 if flat else len(message.places))
    assert rollout.update_weights(1, message) == 1
    version, checksum = rollout.sample_once()
    assert version == 1 and checksum == pytest.approx(learner.checksum(), rel=1e-9, abs=1e-9)
