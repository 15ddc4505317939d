"""The ranker pool on a real local Ray cluster: named actors, growth with backlog, shrinking, restarts."""

from __future__ import annotations

import pytest
import ray

from rlaif_ray.config import Config, load_config
from rlaif_ray.groups import Group
from rlaif_ray.ranker.pool import RankerPool


def make_group(i: int, reference: str = "red") -> Group:
    completions = ["blue", "red", "red circle", "green"]
    return Group(
        group_id=f"g{i}",
        example_id=f"e{i}",
        video="unused.mp4",
        question="what colour ?",
        reference=reference,
        completions=completions,
        completion_ids=[[1]] * 4,
        logprobs=[[-1.0]] * 4,
        weight_version=0,
    )


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, resources={"ranker": 3}, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture
def cfg() -> Config:
    return load_config(
        None,
        [
            "rl.group_size=4",
            "ranker.min_actors=1",
            "ranker.max_actors=3",
            "ranker.scale_up_backlog=2",
            "ranker.num_cpus_per_actor=0.25",
        ],
    )


def test_pool_grows_with_backlog_then_shrinks(local_ray, cfg: Config) -> None:
    pool = RankerPool(cfg)
    assert pool.size == 1 and ray.get_actor("ranker-0") is not None
    groups = [make_group(i) for i in range(12)]
    ranked = pool.rank(groups)
    assert [g.group_id for g in ranked] == [g.group_id for g in groups]  # input order kept
    # "red" (correct) first, then "red circle" (closer), then the two wrong colours tied.
    assert all(g.ranks == [2.5, 0.0, 1.0, 2.5] and g.rank_status == "ok" for g in ranked)
    assert pool.scale_ups >= 1 and pool.size > 1
    pool.rank([make_group(99)])  # a small backlog: back to min_actors
    assert pool.size == 1 and pool.scale_downs >= 1
    assert pool.stats()["groups"] == 13 and pool.stats()["ok"] == 13
    for name in list(pool.actors):
        ray.kill(pool.actors[name])


def test_dead_ranker_is_replaced_and_no_group_lost(local_ray, cfg: Config) -> None:
    cfg.ranker.max_actors = 1
    pool = RankerPool(cfg)
    ray.kill(pool.actors["ranker-0"])
    ranked = pool.rank([make_group(i) for i in range(3)])
    assert len(ranked) == 3 and all(g.ranks is not None for g in ranked)
    assert pool.restarts == 1 and set(pool.actors) == {"ranker-1"}


def test_nonsense_from_backend_is_counted_not_accepted(local_ray, cfg: Config) -> None:
    pool = RankerPool(cfg)
    # A group without a reference cannot be ranked by the ground-truth oracle: retried, then tied.
    ranked = pool.rank([make_group(0, reference=None), make_group(1)])
    assert ranked[0].rank_status == "fallback_tie" and ranked[0].rank_attempts == 1 + cfg.ranker.max_retries
    assert ranked[1].rank_status == "ok"
    assert pool.stats()["fallback_tie"] == 1
