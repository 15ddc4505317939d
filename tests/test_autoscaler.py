"""The autoscaler, tested: the ranker nodes of ``cluster/autoscale.yaml`` come with a burst of
ranking work and go when it is over, on Ray's fake multi-node provider (its "nodes" are processes
on this machine; ``ray.cluster_utils.AutoscalingCluster`` cannot be used: the Ray 2.60 wheel lacks
the ``example.yaml`` it loads).

A head node of the test's own (``ray_head.head_node``: its own ports and temp dir; token auth with
a token of its own) is started with ``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=COPY``,
where COPY is ``cluster/autoscale.yaml`` with its node types and their resources as shipped (the
head's too: ``ray start`` is given them) and only sizes and times changed: a short idle timeout, at
most :data:`MAX_ACTORS` ranker nodes, and the provider told the test's GCS address. This process
connects as the driver and puts a burst of :data:`GROUPS` groups on a :class:`RankerPool`
(``configs/default.yaml``, backend ``openai``) whose judge (``bench/delayed_judge.py`` on
127.0.0.1, which every fake node can reach) answers each request after :data:`JUDGE_DELAY_S`
seconds. Checked:

* no ranker node (a node with the ``ranker`` resource) before the pool exists; while the burst
  runs, the autoscaler adds nodes of the shipped ranker type, no more than the pool has actors;
* the pool's actors run on ranker nodes only, one per node, and actors on at least two different
  nodes ranked groups; no actor retires while the burst runs;
* every group comes back exactly once, ranked by the judge's rule, and the judge answered exactly
  one request per group (no group ranked twice, none lost, no fallback, no restart);
* after the burst the actors retire once idle for ``ranker.idle_grace_s`` (``retire_idle``), down
  to ``ranker.min_actors``; within a deadline the autoscaler removes, as idle, every ranker node
  that no actor holds any more, and keeps the one that still hosts an actor;
* afterwards no process of the cluster is left, and this process's ``RAY_ADDRESS`` and auth
  settings and where a plain ``ray.init()`` would connect (or that it starts a Ray of its own)
  are what they were before, so later tests run as without this one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray._private.authentication_test_utils import reset_auth_token_state
from ray._private.services import canonicalize_bootstrap_address
from ray_head import HeadNode, head_node, processes_of

from bench.delayed_judge import start_delayed_judge
from bench.ranker_scaling import make_groups
from rlaif_ray.algo.advantages import ranks_from_orderings
from rlaif_ray.config import Config, load_config
from rlaif_ray.groups import Group
from rlaif_ray.learner.engine import free_port
from rlaif_ray.ranker import GroundTruthRanker, RankPrompt
from rlaif_ray.ranker.pool import RankerPool

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "cluster" / "autoscale.yaml"
RANKER_NODE_TYPE = "ranker_node"
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

MAX_ACTORS = 3  # ranker.max_actors: one ranker node each
GROUPS = 36  # groups in the burst (group size 4)
JUDGE_DELAY_S = 0.3  # per request; 2 requests in flight per actor
# ranker.idle_grace_s: no actor may retire while the burst runs (here none sat idle for more than
# half a second meanwhile, though the fake provider starts the nodes one after another).
IDLE_GRACE_S = 10.0
IDLE_TIMEOUT_S = 6.0  # the copy's idle_timeout_minutes, in seconds
BURST_DEADLINE_S = 150.0  # nodes started and every group ranked
REMOVAL_DEADLINE_S = 90.0  # idle nodes removed after the actors retired


def autoscaling_config(gcs_address: str) -> dict[str, Any]:
    """``cluster/autoscale.yaml`` with the node types and resources as shipped; a short idle timeout,
    at most ``MAX_ACTORS`` ranker nodes, and the provider pointed at ``gcs_address`` (the fake
    provider starts its nodes against ``<this machine's ip>:6379`` otherwise, which is not the
    test's GCS and may be someone else's)."""
    cluster = yaml.safe_load(SHIPPED.read_text())
    cluster["idle_timeout_minutes"] = IDLE_TIMEOUT_S / 60
    cluster["max_workers"] = MAX_ACTORS
    cluster["available_node_types"][RANKER_NODE_TYPE]["max_workers"] = MAX_ACTORS
    cluster["provider"]["gcs_address"] = gcs_address
    return cluster


def head_start_args(cluster: dict[str, Any]) -> list[str]:
    """``ray start`` flags giving the head node the resources of the config's head node type (the
    fake provider does not start the head: ``ray start`` does, with what it is told)."""
    resources = dict(cluster["available_node_types"][cluster["head_node_type"]]["resources"])
    args = [f"--num-cpus={resources.pop('CPU', 0):g}", f"--num-gpus={resources.pop('GPU', 0):g}"]
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    return args


def ranker_nodes(resource: str) -> dict[str, bool]:
    """Node id -> alive, for the nodes ``ray.nodes()`` lists that advertise the ranker resource (a
    node the fake provider removed drops out of the list)."""
    return {n["NodeID"]: n["Alive"] for n in ray.nodes() if n["Resources"].get(resource, 0) > 0}


def alive(nodes: dict[str, bool]) -> set[str]:
    """The ids of the alive nodes among ``nodes``."""
    return {node for node, up in nodes.items() if up}


def node_of(actor: Any) -> str:
    """The id of the node the actor runs on (asked of the actor itself)."""
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def pool_config(base_url: str) -> Config:
    """The default config with the ``openai`` backend against the judge at ``base_url``."""
    return load_config(
        str(ROOT / "configs" / "default.yaml"),
        [
            "ranker.backend=openai",
            "ranker.openai_frames=0",
            f"ranker.openai_base_url={base_url}",
            "ranker.openai_api_key_env=RLAIF_RAY_TEST_AUTOSCALER_KEY",  # unset: the key "EMPTY"
            "ranker.openai_max_concurrency=2",
            "ranker.min_actors=1",
            f"ranker.max_actors={MAX_ACTORS}",
            "rl.group_size=4",
            f"ranker.idle_grace_s={IDLE_GRACE_S:g}",
        ],
    )


def expected_ranks(group: Group) -> list[float]:
    """The ranks the judge's rule (the ground-truth ranker against the reference) gives ``group``."""
    ordering = GroundTruthRanker().rank(RankPrompt(group.question, group.reference), group.completions)
    return ranks_from_orderings([ordering], group.size)[0].tolist()


@contextlib.contextmanager
def own_token() -> Iterator[dict[str, str]]:
    """Token authentication with a token of the test's own, for this process (the driver) and, through
    the environment returned, the cluster; this process's settings restored on exit.

    The driver and the cluster must agree: a plain ``ray.init()`` of an earlier test turns token mode
    on in this process (``RAY_AUTH_MODE=token`` in ``os.environ``), and such a driver connects to a
    cluster without authentication but cannot create an actor there ("Actor creation cancelled").
    Ray caches the mode and the token in the process: both caches are reset after each change.
    """
    saved = {var: os.environ.get(var) for var in AUTH_VARS}
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(env)
    reset_auth_token_state()
    try:
        yield env
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        reset_auth_token_state()


@contextlib.contextmanager
def fake_cluster(tmp_path: Path, cluster: dict[str, Any], port: int) -> Iterator[HeadNode]:
    """The head node running the autoscaler on ``cluster`` (GCS on ``port``), with this process
    connected to it as the driver; disconnected and stopped on exit."""
    config_path = tmp_path / "autoscale.yaml"
    config_path.write_text(yaml.safe_dump(cluster))
    env = {
        "RAY_FAKE_CLUSTER": "1",  # the fake provider refuses to start without it
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # the autoscaler's loop (default 5 s)
    }
    args = [f"--autoscaling-config={config_path}", *head_start_args(cluster)]
    with own_token() as auth, head_node(*args, env={**env, **auth}, port=port) as head:
        assert head.gcs_address == cluster["provider"]["gcs_address"], head.gcs_address
        ray.init(address=head.gcs_address, log_to_driver=False)
        try:
            yield head
        finally:
            ray.shutdown()


def rank_burst(
    pool: RankerPool, groups: list[Group], head: HeadNode, seen: dict[str, bool]
) -> tuple[list[Group], float]:
    """Submit ``groups`` at once and collect the chunks as they finish, noting every ranker node
    seen meanwhile in ``seen`` (node id -> alive); fails after ``BURST_DEADLINE_S``. Returns the
    ranked groups and how close an idle actor came to retiring meanwhile (seconds to spare)."""
    deadline = time.monotonic() + BURST_DEADLINE_S
    pool.submit(groups)
    ranked: list[Group] = []
    spare = pool.cfg.ranker.idle_grace_s
    while pool.pending:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(ranked)} of {len(groups)} groups ranked after {BURST_DEADLINE_S:.0f}s; ranker "
                f"nodes {seen}\n{head.log_tail('monitor.log')}\n{head.log_tail('monitor.err')}"
            )
        in_flight = pool.in_flight()
        assert in_flight, f"{pool.pending} groups pending and none handed to an actor"
        done, _ = ray.wait(in_flight, num_returns=1, timeout=1.0)
        for ref in done:
            ranked.extend(pool.collect(ref))
        seen.update(ranker_nodes(pool.cfg.ranker.resource))
        if (due := pool.seconds_to_retirement()) is not None:
            spare = min(spare, due)
    return ranked, spare


def check_burst(
    head: HeadNode, cfg: Config, ranker_type: dict[str, Any], judge: Any
) -> tuple[RankerPool, dict[str, str], set[str]]:
    """Rank a burst of groups on a new pool; check the groups, the nodes that came and where the
    actors ran. Returns the pool, actor name -> node id, and every ranker node seen."""
    resource = cfg.ranker.resource
    assert ranker_nodes(resource) == {}, "a ranker node before any ranker actor"
    pool = RankerPool(cfg)
    groups = make_groups(GROUPS, cfg.rl.group_size, "burst", random.Random(0))
    seen: dict[str, bool] = {}
    ranked, spare = rank_burst(pool, groups, head, seen)

    # Every group back exactly once, ranked by the judge's rule, one request each.
    assert sorted(g.group_id for g in ranked) == sorted(g.group_id for g in groups)
    assert all(g.rank_status == "ok" for g in ranked), {g.rank_status for g in ranked}
    assert all(g.ranks == expected_ranks(g) for g in ranked)
    stats = pool.stats()
    assert stats["groups"] == stats["ok"] == GROUPS and stats["restarts"] == stats["fallbacks"] == 0, stats
    assert judge.stats()["answered"] == GROUPS

    # One node of the shipped ranker type per actor, and actors on two nodes or more ranked groups.
    assert pool.size == MAX_ACTORS and pool.scale_downs == 0, (
        f"an actor retired during the burst (closest: {spare:.1f}s to spare); raise IDLE_GRACE_S: {stats}"
    )
    where = {name: node_of(actor) for name, actor in pool.actors.items()}
    ranked_by = {name: ray.get(actor.stats.remote())["groups"] for name, actor in pool.actors.items()}
    assert set(where.values()) <= set(seen) and len(set(where.values())) == len(where), (where, seen)
    assert 2 <= len(seen) <= MAX_ACTORS, seen
    assert len({where[name] for name, n in ranked_by.items() if n > 0}) >= 2, (ranked_by, where)
    assert sum(ranked_by.values()) == GROUPS, ranked_by
    shapes = {
        n["NodeID"]: {key: n["Resources"].get(key) for key in ranker_type["resources"]}
        for n in ray.nodes()
        if n["NodeID"] in where.values()
    }
    assert shapes == dict.fromkeys(where.values(), ranker_type["resources"]), shapes
    return pool, where, set(seen)


def check_idle_nodes_removed(head: HeadNode, pool: RankerPool, where: dict[str, str], seen: set[str]) -> None:
    """The idle actors retire (``RankerPool.retire_idle``, called when ``seconds_to_retirement`` says,
    as the driver does) down to ``ranker.min_actors``; then, within a deadline, the autoscaler
    removes, as idle, every ranker node that no actor holds any more, and keeps the others."""
    rc = pool.cfg.ranker
    deadline = time.monotonic() + rc.idle_grace_s + 30
    retired: list[str] = []
    while (due := pool.seconds_to_retirement()) is not None:
        assert time.monotonic() < deadline, f"{pool.size} actors still there, {due:.1f}s to retirement"
        time.sleep(due)
        retired += pool.retire_idle()
    assert len(retired) == MAX_ACTORS - rc.min_actors and pool.size == rc.min_actors, (retired, pool.stats())
    assert pool.stats()["scale_downs"] == len(retired), pool.stats()
    kept = {where[name] for name in pool.actors}
    deadline = time.monotonic() + IDLE_TIMEOUT_S + REMOVAL_DEADLINE_S
    while alive(nodes := ranker_nodes(pool.cfg.ranker.resource)) != kept:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"ranker nodes {nodes} alive after {REMOVAL_DEADLINE_S:.0f}s; only {kept} hosts an "
                f"actor\n{head.log_tail('monitor.log')}"
            )
        time.sleep(1)
    # Removed by the autoscaler, for being idle (its log line names each node and the reason).
    log = head.log_tail("monitor.log", chars=1_000_000)
    for node in seen - kept:
        assert f"Terminating the node with id {node} " in log and f"{node}. (idle)" in log, node


@pytest.mark.slow
def test_ranker_nodes_come_with_a_burst_and_go_when_idle(tmp_path: Path) -> None:
    assert not ray.is_initialized(), "an earlier test left Ray initialised in this process"
    # Where a plain ray.init() would go (None: it starts a Ray of its own).
    address_before = canonicalize_bootstrap_address(None)
    env_before = {var: os.environ.get(var) for var in ("RAY_ADDRESS", *AUTH_VARS)}
    port = free_port()
    cluster = autoscaling_config(f"{ray.util.get_node_ip_address()}:{port}")
    ranker_type = cluster["available_node_types"][RANKER_NODE_TYPE]
    judge = start_delayed_judge(delay_s=JUDGE_DELAY_S, max_inflight=64)
    try:
        cfg = pool_config(judge.base_url)
        # The shipped ranker node type hosts one ranker actor, and no other node type any.
        resource = cfg.ranker.resource
        assert ranker_type["resources"].get(resource) == 1, ranker_type
        assert ranker_type["resources"]["CPU"] >= cfg.ranker.num_cpus_per_actor, ranker_type
        hosts = [name for name, t in cluster["available_node_types"].items() if t["resources"].get(resource)]
        assert hosts == [RANKER_NODE_TYPE], hosts
        with fake_cluster(tmp_path, cluster, port) as head:
            pool, where, seen = check_burst(head, cfg, ranker_type, judge)
            check_idle_nodes_removed(head, pool, where, seen)
    finally:
        judge.stop()
    # Nothing of the cluster is left, and a later plain ray.init() is not sent to it.
    assert not processes_of(head.temp_dir)
    assert {var: os.environ.get(var) for var in env_before} == env_before
    assert canonicalize_bootstrap_address(None) == address_before
