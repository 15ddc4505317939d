"""The ranker pool on a real local Ray cluster: named actors, growth with backlog, shrinking, restarts,
counters that survive the actors, and a judge (a real HTTP server on 127.0.0.1) that hangs."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import ray
from test_ranker_openai import FakeJudgeServer, rank_by_reference

from rlaif_ray.config import Config, load_config
from rlaif_ray.groups import Group
from rlaif_ray.launch import stop_actors
from rlaif_ray.ranker.pool import MAX_ACTOR_DEATHS, RankerPool


def make_group(i: int, reference: str = "red", question: str = "what colour ?") -> Group:
    completions = ["blue", "red", "red circle", "green"]
    return Group(
        group_id=f"g{i}",
        example_id=f"e{i}",
        video="unused.mp4",
        question=question,
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


@pytest.fixture(autouse=True)
def no_ranker_actor_left(local_ray) -> Iterator[None]:
    """Each test's ranker actors die with it: a later pool names its actors ranker-0, ranker-1, ...
    again, and an actor left alive (e.g. one still inside a hung judge call) would hold the name."""
    yield
    leftover = []
    for index in range(32):
        try:
            leftover.append(ray.get_actor(f"ranker-{index}"))
        except ValueError:
            continue
    stop_actors(leftover)


def test_pool_grows_with_backlog_holds_under_steady_load_and_retires_idle_actors(
    local_ray, cfg: Config
) -> None:
    cfg.ranker.idle_grace_s = 1.5
    pool = RankerPool(cfg)
    assert pool.size == 1 and ray.get_actor("ranker-0") is not None
    groups = [make_group(i) for i in range(12)]
    ranked = pool.rank(groups)
    assert [g.group_id for g in ranked] == [g.group_id for g in groups]  # input order kept
    # "red" (correct) first, then "red circle" (closer), then the two wrong colours tied.
    assert all(g.ranks == [2.5, 0.0, 1.0, 2.5] and g.rank_status == "ok" for g in ranked)
    assert pool.scale_ups >= 1 and pool.size == 3
    # A steady backlog, with pauses shorter than the grace period: the pool holds its size, even
    # though it runs empty between calls (it used to shrink whenever it did).
    start, steady = time.monotonic(), 0
    while time.monotonic() - start < 2 * cfg.ranker.idle_grace_s:
        pool.rank([make_group(100 + 6 * steady + i) for i in range(6)])
        steady += 1
        time.sleep(0.3)
    assert pool.size == 3 and pool.scale_downs == 0
    assert pool.retire_idle() == []  # nobody idle long enough yet
    due = pool.seconds_to_retirement()
    assert due is not None and 0 < due <= cfg.ranker.idle_grace_s
    time.sleep(due + 0.1)
    retired = pool.retire_idle()  # longest idle first, down to min_actors
    assert len(retired) == 2 and pool.size == 1 and pool.scale_downs == 2
    assert pool.seconds_to_retirement() is None  # at min_actors: nothing left to retire
    for name in retired:
        with pytest.raises(ValueError):
            ray.get_actor(name)
    assert pool.rank([make_group(99)])[0].ranks is not None  # the one left still ranks
    stats = pool.stats()
    assert stats["groups"] == stats["ok"] == 12 + 6 * steady + 1
    # the ground truth's first place is always a right answer: it agrees with the labels
    assert stats["top1_checked"] == stats["top1_agrees"] == stats["groups"]
    for name in list(pool.actors):
        ray.kill(pool.actors[name])


def test_dead_ranker_is_replaced_and_no_group_lost(local_ray, cfg: Config) -> None:
    cfg.ranker.max_actors = 1
    pool = RankerPool(cfg)
    ray.kill(pool.actors["ranker-0"])
    ranked = pool.rank([make_group(i) for i in range(3)])
    assert len(ranked) == 3 and all(g.ranks is not None for g in ranked)
    assert pool.restarts == 1 and set(pool.actors) == {"ranker-1"}
    stats = pool.stats()
    assert stats["restarts"] == 1 and stats["groups"] == stats["ok"] == 3 and stats["fallbacks"] == 0


def test_encoder_features_stay_with_the_driver_and_come_back_with_the_groups(local_ray, cfg: Config) -> None:
    """A group's ``visual_features`` (for the learner) are not sent to the ranker actors: here
    they are locks, which Ray cannot serialise, so sending them would fail. The ranked groups
    come back with the very same objects."""
    pool = RankerPool(cfg)
    groups = [make_group(i) for i in range(5)]
    features = [threading.Lock() for _ in groups]
    for group, feature in zip(groups, features, strict=True):
        group.visual_features = feature
    ranked = pool.rank(groups)
    assert all(g.rank_status == "ok" for g in ranked)
    assert all(g.visual_features is f for g, f in zip(ranked, features, strict=True))
    for name in list(pool.actors):
        ray.kill(pool.actors[name])


def test_ranker_cpu_cores_pin_every_ranker_actor(local_ray, cfg: Config) -> None:
    """``ranker.cpu_cores`` pins each ranker actor's process (all its threads) to those cores."""
    core = max(os.sched_getaffinity(0))
    cfg.ranker.cpu_cores = [core]
    pool = RankerPool(cfg)
    assert all(g.rank_status == "ok" for g in pool.rank([make_group(i) for i in range(3)]))
    for actor in pool.actors.values():
        masks = ray.get(
            actor.__ray_call__.remote(
                lambda self: {tuple(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
            )
        )
        assert masks == {(core,)}
        ray.kill(actor)


def test_a_group_without_reference_is_counted_not_tied(local_ray, cfg: Config) -> None:
    """The ground-truth oracle cannot rank a group nobody labelled: it comes back unranked (the loop
    drops it as unranked) and counted as no_reference in the pool's stats, never tied."""
    pool = RankerPool(cfg)
    ranked = pool.rank([make_group(0, reference=None), make_group(1)])
    assert ranked[0].rank_status == "no_reference" and ranked[0].ranks is None
    assert ranked[0].rank_attempts == 0 and ranked[1].rank_status == "ok"
    stats = pool.stats()
    assert stats["no_reference"] == 1 and stats["fallbacks"] == 0 and stats["groups"] == 2
    ray.kill(pool.actors["ranker-0"])


def test_failures_of_the_backend_are_counted_in_the_pool(local_ray) -> None:
    """A judge that cannot be reached fails every attempt: retried, then tied; the workers' counters
    reach the pool's stats (and so metrics.jsonl and summary.json)."""
    cfg = judge_config("http://127.0.0.1:9/v1", "ranker.openai_max_retries=0", "ranker.max_retries=2")
    pool = RankerPool(cfg)
    ranked = pool.rank([make_group(0)])
    assert ranked[0].rank_status == "fallback_tie" and ranked[0].rank_attempts == 3
    stats = pool.stats()
    assert stats["fallback_tie"] == stats["fallbacks"] == 1 and stats["dropped"] == 0
    assert stats["groups"] == 1 and stats["ok"] == 0 and stats["attempts"] == 3 and stats["retries"] == 2
    assert stats["errors"] == {"APIConnectionError": 3} and stats["invalid"] == 0
    assert stats["deadline_expired"] == 0 and stats["restarts"] == 0
    ray.kill(pool.actors["ranker-0"])


@pytest.fixture
def hanging_judge() -> Iterator[FakeJudgeServer]:
    """A judge that ranks by the reference, except that it never answers prompts about "poison"."""
    judge = FakeJudgeServer()

    def reply(prompt: str) -> str:
        if "poison" in prompt:
            judge.release.wait(60)
        return rank_by_reference(prompt)

    judge.reply = reply
    judge.thread.start()
    yield judge
    judge.release.set()
    judge.httpd.shutdown()
    judge.httpd.server_close()


def judge_config(base_url: str, *overrides: str) -> Config:
    """One ranker actor with the openai backend against ``base_url``."""
    return load_config(
        None,
        [
            "rl.group_size=4",
            "ranker.min_actors=1",
            "ranker.max_actors=1",
            "ranker.num_cpus_per_actor=0.25",
            "ranker.backend=openai",
            "ranker.openai_frames=0",
            f"ranker.openai_base_url={base_url}",
            "ranker.openai_timeout_s=30",
            "ranker.openai_max_concurrency=2",
            *overrides,
        ],
    )


def poison_calls(judge: FakeJudgeServer) -> int:
    with judge.lock:
        return sum("poison" in body["messages"][-1]["content"] for body in judge.bodies)


def test_an_actor_takes_new_groups_as_its_requests_finish(local_ray) -> None:
    """One openai actor with 2 request slots, 4 groups (two chunks of 2), the first group slow: the
    other three groups all start while it is answered (with a barrier per chunk the second chunk
    would wait for it), and the judge never has more than the 2 requests the actor may send."""
    judge = FakeJudgeServer()
    events: list[tuple[str, bool, float]] = []

    def reply(prompt: str) -> str:
        slow = "slow" in prompt
        events.append(("start", slow, time.monotonic()))
        if slow:
            judge.release.wait(2.0)
        events.append(("end", slow, time.monotonic()))
        return rank_by_reference(prompt)

    judge.reply = reply
    judge.thread.start()
    try:
        pool = RankerPool(judge_config(judge.base_url, "ranker.openai_max_concurrency=2"))
        ranked = pool.rank([make_group(0, question="slow?"), *(make_group(i) for i in range(1, 4))])
        # A long queue goes out a wave (2 groups) at a time, not in shares of the queue.
        pool.submit([make_group(i) for i in range(10, 22)])
        assert [len(chunk) for _, chunk, _ in pool._in_flight.values()] == [2, 2]
        while pool.pending:
            done, _ = ray.wait(pool.in_flight(), num_returns=1)
            ranked_later = pool.collect(done[0])
            assert len(ranked_later) == 2 and all(g.rank_status == "ok" for g in ranked_later)
    finally:
        judge.release.set()
        judge.httpd.shutdown()
    assert all(g.rank_status == "ok" for g in ranked)
    slow_end = next(t for kind, slow, t in events if kind == "end" and slow)
    started_meanwhile = [t for kind, slow, t in events if kind == "start" and not slow and t < slow_end]
    assert len(started_meanwhile) == 3, events
    assert judge.max_in_flight <= 2
    ray.kill(pool.actors["ranker-0"])


def test_hung_judge_meets_the_deadline_and_the_pool_moves_on(local_ray, hanging_judge) -> None:
    # Four connection slots: the two hung requests keep theirs until the client's timeout (30 s).
    config = judge_config(
        hanging_judge.base_url, "ranker.group_deadline_s=1.0", "ranker.openai_max_concurrency=4"
    )
    pool = RankerPool(config)
    groups = [
        make_group(0, question="poison?"),
        make_group(1),
        make_group(2, question="poison!"),
        make_group(3),
    ]
    start = time.perf_counter()
    ranked = pool.rank(groups)
    assert time.perf_counter() - start < 60  # not the 30 s client timeout per request, nor forever
    assert [g.rank_status for g in ranked] == ["fallback_tie", "ok", "fallback_tie", "ok"]
    assert ranked[1].ranks == [2.5, 0.0, 1.0, 2.5]
    stats = pool.stats()
    assert stats["deadline_expired"] == stats["fallbacks"] == 2 and stats["ok"] == 2
    assert stats["restarts"] == 0 and stats["errors"] == {}
    ray.kill(pool.actors["ranker-0"])


def test_a_group_that_kills_its_rankers_gets_the_fallback(local_ray, hanging_judge) -> None:
    """Each ranker actor that asks about the poison group is killed from outside, as a crash would;
    its chunk-mate is ranked alone after the first death, the poison group gets the fallback after
    MAX_ACTOR_DEATHS."""
    pool = RankerPool(judge_config(hanging_judge.base_url))

    def killer() -> None:
        for k in range(MAX_ACTOR_DEATHS):
            deadline = time.monotonic() + 120
            while poison_calls(hanging_judge) <= k and time.monotonic() < deadline:
                time.sleep(0.05)
            if not ray.is_initialized():  # the test ended: never start a Ray of its own
                return
            ray.kill(ray.get_actor(f"ranker-{k}"))

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    ranked = pool.rank([make_group(0, question="poison?"), make_group(1)])
    thread.join(timeout=10)
    assert [g.rank_status for g in ranked] == ["fallback_tie", "ok"]
    assert ranked[0].ranks == [1.5] * 4 and ranked[1].ranks == [2.5, 0.0, 1.0, 2.5]
    assert poison_calls(hanging_judge) == MAX_ACTOR_DEATHS
    stats = pool.stats()
    assert stats["restarts"] == MAX_ACTOR_DEATHS and pool.restarts == MAX_ACTOR_DEATHS
    assert stats["groups"] == 2 and stats["ok"] == 1 and stats["fallbacks"] == stats["fallback_tie"] == 1
    assert set(pool.actors) == {f"ranker-{MAX_ACTOR_DEATHS}"}
    ray.kill(pool.actors[f"ranker-{MAX_ACTOR_DEATHS}"])


def test_a_ranker_that_cannot_start_stops_the_run_with_its_reason(local_ray, tmp_path) -> None:
    missing = tmp_path / "no-such-key"
    pool = RankerPool(judge_config("http://127.0.0.1:9/v1", f"ranker.openai_api_key_file={missing}"))
    with pytest.raises(RuntimeError, match=r"ranker actor ranker-0 could not start") as info:
        pool.rank([make_group(0)])
    assert f"ranker.openai_api_key_file: cannot read {missing}" in str(info.value)
    assert pool.restarts == 0
