"""The cluster configs in cluster/ match Ray's launcher schema and the actors they must host.

Pure file checks (no Ray runtime): every cluster-launcher YAML validates against the schema Ray
ships (``ray/autoscaler/ray-schema.json``), and every node type (launcher) or worker group
(KubeRay) of a role advertises at least the resources one actor of that role asks for under the
config that goes with the file, with room for all of them at its maximum size. Roles are read
from names: ``rollout_node`` / ``learner_node`` / ``ranker_node`` in launcher configs, the group
names ``rollout`` / ``learner`` / ``ranker`` in the KubeRay manifest.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from rlaif_ray.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SCHEMA_PATH = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"

ROLES = ("rollout", "learner", "ranker")
LAUNCHER_ROLE = {"rollout_node": "rollout", "learner_node": "learner", "ranker_node": "ranker"}
KUBERAY_ROLE = {"rollout": "rollout", "learner": "learner", "ranker": "ranker"}

# cluster file -> (the config whose actors it hosts, the roles it must have node types for).
# autoscale.yaml only adds ranker nodes; the rest runs on the head there.
LAUNCHER_FILES = {
    "autoscale.yaml": ("configs/default.yaml", ("ranker",)),
    "aws.yaml": ("configs/paper_7b.yaml", ROLES),
}
KUBERAY_FILES = {"kuberay.yaml": ("configs/paper_7b.yaml", ROLES)}
NOT_LAUNCHER_FILES = {"runtime_env.yaml"}  # ray job submit --runtime-env


@dataclass
class NodeShape:
    """What one node (or pod) of a type advertises to Ray, and how many the autoscaler may start."""

    name: str
    resources: dict[str, float]
    max_count: int


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def actor_asks(cfg: Config, role: str) -> dict[str, float]:
    """The resources one actor of ``role`` asks Ray for (as launch.py and ranker/pool.py ask)."""
    if role == "rollout":
        asks = {"CPU": cfg.rollout.num_cpus_per_actor, "GPU": cfg.rollout.num_gpus_per_actor}
    elif role == "learner":
        asks = {"CPU": cfg.learner.num_cpus_per_actor, "GPU": cfg.learner.num_gpus_per_actor}
    elif role == "ranker":
        asks = {"CPU": cfg.ranker.num_cpus_per_actor}
        if cfg.ranker.resource:
            asks[cfg.ranker.resource] = 1.0
    else:
        raise ValueError(f"unknown role {role!r}")
    return {key: float(value) for key, value in asks.items() if value > 0}


def actor_count(cfg: Config, role: str) -> int:
    """How many actors of ``role`` the config may run at once."""
    return {
        "rollout": cfg.rollout.num_actors,
        "learner": cfg.learner.num_actors,
        "ranker": cfg.ranker.max_actors,
    }[role]


def role_problems(
    where: str,
    shapes: dict[str, NodeShape],
    roles: dict[str, str],
    cfg: Config,
    cfg_name: str,
    required: tuple[str, ...],
    noun: str = "node type",
) -> list[str]:
    """Why the node types in ``shapes`` cannot host the config's actors (empty when they can).

    ``where`` names the file, ``roles`` maps node type names to roles, ``required`` lists the roles
    that must have a node type, ``noun`` is what the file calls one ("worker group" in KubeRay).
    """
    problems: list[str] = []
    ranker_resource = cfg.ranker.resource
    for role in required:
        if not any(roles.get(name) == role for name in shapes):
            wanted = [name for name, r in roles.items() if r == role]
            problems.append(f"{where}: no {noun} for the {role} actors (expected one named {wanted})")
    for name, shape in shapes.items():
        role = roles.get(name)
        if ranker_resource and role != "ranker" and shape.resources.get(ranker_resource, 0) > 0:
            problems.append(
                f"{where}: {noun} '{name}' advertises the ranker resource '{ranker_resource}', so "
                f"ranker actors could land there; only the ranker node type may"
            )
        if role is None:
            continue
        asks = actor_asks(cfg, role)
        missing = [
            f"{key} (has {shape.resources.get(key, 0):g}, one {role} actor asks {need:g})"
            for key, need in asks.items()
            if shape.resources.get(key, 0) < need
        ]
        if missing:
            problems.append(
                f"{where}: {noun} '{name}' cannot host one {role} actor under {cfg_name}: "
                f"missing {', '.join(missing)}"
            )
            continue
        per_node = min(math.floor(shape.resources[key] / need + 1e-9) for key, need in asks.items())
        capacity = per_node * shape.max_count
        wanted = actor_count(cfg, role)
        if capacity < wanted:
            problems.append(
                f"{where}: {noun} '{name}' holds at most {capacity} {role} actors "
                f"({per_node} per node x max {shape.max_count} nodes); {cfg_name} runs {wanted}"
            )
    return problems


# --------------------------------------------------------------------------- cluster launcher
def schema_problems(where: str, cluster: Any) -> list[str]:
    """Every violation of Ray's cluster-launcher schema, plus the launcher's own cross-field checks."""
    schema = json.loads(SCHEMA_PATH.read_text())
    validator = jsonschema.Draft7Validator(schema)
    problems = [
        f"{where}: {'/'.join(str(p) for p in err.absolute_path) or '<top>'}: {err.message}"
        for err in sorted(validator.iter_errors(cluster), key=lambda e: list(map(str, e.absolute_path)))
    ]
    if problems or not isinstance(cluster, dict):
        return problems
    node_types = cluster.get("available_node_types", {})
    if node_types and cluster.get("head_node_type") not in node_types:
        problems.append(f"{where}: head_node_type {cluster.get('head_node_type')!r} is not a node type")
    min_sum = sum(t.get("min_workers", 0) for t in node_types.values())
    if min_sum > cluster.get("max_workers", 2):
        problems.append(f"{where}: max_workers is below the sum of min_workers ({min_sum})")
    for name, node_type in node_types.items():
        if node_type.get("min_workers", 0) > node_type.get("max_workers", cluster.get("max_workers", 2)):
            problems.append(f"{where}: node type '{name}' has min_workers above max_workers")
    return problems


def launcher_shapes(cluster: dict[str, Any]) -> dict[str, NodeShape]:
    """Node type name -> what it advertises; the head counts as one node."""
    shapes = {}
    for name, node_type in cluster.get("available_node_types", {}).items():
        if name == cluster.get("head_node_type"):
            count = 1
        else:
            count = node_type.get("max_workers", cluster.get("max_workers", 2))
        shapes[name] = NodeShape(
            name, {k: float(v) for k, v in node_type.get("resources", {}).items()}, count
        )
    return shapes


def launcher_problems(
    where: str, cluster: dict[str, Any], cfg_name: str, required: tuple[str, ...]
) -> list[str]:
    """Schema violations and role mismatches of one cluster-launcher config."""
    problems = schema_problems(where, cluster)
    if problems:
        return problems
    cfg = load_config(ROOT / cfg_name)
    for name, role in LAUNCHER_ROLE.items():
        node_type = cluster["available_node_types"].get(name)
        if node_type is None:
            continue
        if role == "ranker" and not {"min_workers", "max_workers"} <= node_type.keys():
            problems.append(
                f"{where}: node type '{name}' must set its own min_workers and max_workers so that "
                f"the ranker tier scales on its own"
            )
        asks = actor_asks(cfg, role)
        undeclared = [key for key in asks if key not in node_type.get("resources", {})]
        if undeclared:
            problems.append(f"{where}: node type '{name}' does not declare {undeclared} in its resources")
    return problems + role_problems(where, launcher_shapes(cluster), LAUNCHER_ROLE, cfg, cfg_name, required)


# --------------------------------------------------------------------------- KubeRay
def k8s_quantity(value: Any) -> float:
    """A Kubernetes quantity as a number: 4, "4", "500m", "2.5" (memory suffixes are not needed here)."""
    text = str(value).strip()
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def kuberay_custom_resources(text: str | None) -> dict[str, float]:
    """rayStartParams ``resources``: KubeRay's quoted form '"{\\"ranker\\": 1}"' (or plain JSON)."""
    if not text:
        return {}
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return {k: float(v) for k, v in json.loads(text.replace('\\"', '"')).items()}


def kuberay_group_shape(group: dict[str, Any], name: str) -> NodeShape:
    """What one pod of a head or worker group advertises to Ray.

    Like KubeRay: the first container is the Ray container; rayStartParams num-cpus / num-gpus win
    over its limits (cpu, nvidia.com/gpu); custom resources come from rayStartParams resources.
    """
    params = group.get("rayStartParams") or {}
    containers = group["template"]["spec"]["containers"]
    limits = (containers[0].get("resources") or {}).get("limits") or {}
    resources: dict[str, float] = {}
    cpu = params.get("num-cpus", limits.get("cpu"))
    if cpu is not None:
        resources["CPU"] = float(math.floor(k8s_quantity(cpu)))
    gpu = params.get("num-gpus", limits.get("nvidia.com/gpu"))
    if gpu is not None:
        resources["GPU"] = k8s_quantity(gpu)
    resources.update(kuberay_custom_resources(params.get("resources")))
    return NodeShape(name, resources, int(group.get("maxReplicas", group.get("replicas", 1))))


def kuberay_problems(
    where: str, manifest: dict[str, Any], cfg_name: str, required: tuple[str, ...]
) -> list[str]:
    """Shape and role mismatches of one KubeRay RayCluster manifest."""
    problems = []
    if manifest.get("apiVersion") != "ray.io/v1" or manifest.get("kind") != "RayCluster":
        problems.append(f"{where}: expected apiVersion ray.io/v1, kind RayCluster")
    spec = manifest.get("spec") or {}
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{where}: spec.enableInTreeAutoscaling must be true")
    if "headGroupSpec" not in spec:
        problems.append(f"{where}: spec.headGroupSpec is missing")
    groups = spec.get("workerGroupSpecs") or []
    shapes: dict[str, NodeShape] = {}
    if "headGroupSpec" in spec:
        shapes["<head>"] = kuberay_group_shape(spec["headGroupSpec"], "<head>")
    for group in groups:
        name = group.get("groupName", "<unnamed>")
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas")
        if hi is None or lo > hi:
            problems.append(f"{where}: worker group '{name}' needs minReplicas <= maxReplicas")
        shapes[name] = kuberay_group_shape(group, name)
    cfg = load_config(ROOT / cfg_name)
    return problems + role_problems(where, shapes, KUBERAY_ROLE, cfg, cfg_name, required, "worker group")


# --------------------------------------------------------------------------- tests
def test_every_launcher_config_in_cluster_is_checked():
    """A new cluster-launcher YAML in cluster/ must be added to LAUNCHER_FILES (or KUBERAY_FILES)."""
    present = {p.name for p in CLUSTER.glob("*.yaml")}
    assert present - NOT_LAUNCHER_FILES == set(LAUNCHER_FILES) | set(KUBERAY_FILES), present


@pytest.mark.parametrize("name", sorted(LAUNCHER_FILES))
def test_launcher_config_matches_ray_schema(name: str):
    problems = schema_problems(f"cluster/{name}", _load_yaml(CLUSTER / name))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(LAUNCHER_FILES))
def test_launcher_node_types_fit_their_actors(name: str):
    cfg_name, required = LAUNCHER_FILES[name]
    problems = launcher_problems(f"cluster/{name}", _load_yaml(CLUSTER / name), cfg_name, required)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(KUBERAY_FILES))
def test_kuberay_worker_groups_fit_their_actors(name: str):
    cfg_name, required = KUBERAY_FILES[name]
    problems = kuberay_problems(f"cluster/{name}", _load_yaml(CLUSTER / name), cfg_name, required)
    assert not problems, "\n".join(problems)


def test_aws_head_runs_no_actors_and_ranker_tier_scales_alone():
    """The head advertises no CPU/GPU to actors; only ranker_node has the ranker resource."""
    cluster = _load_yaml(CLUSTER / "aws.yaml")
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    assert [name for name, t in types.items() if t["resources"].get("ranker")] == ["ranker_node"]
    assert (
        types["ranker_node"]["max_workers"] >= load_config(ROOT / "configs/paper_7b.yaml").ranker.max_actors
    )


def test_kuberay_ranker_resource_is_parsed_from_the_documented_form():
    assert kuberay_custom_resources('"{\\"ranker\\": 1}"') == {"ranker": 1.0}
    assert kuberay_custom_resources('{"ranker": 2, "x": 1}') == {"ranker": 2.0, "x": 1.0}
    assert k8s_quantity("500m") == 0.5 and k8s_quantity(4) == 4.0


# --------------------------------------------------------------------------- the checks can fail
def _aws() -> dict[str, Any]:
    return copy.deepcopy(_load_yaml(CLUSTER / "aws.yaml"))


def test_checker_rejects_a_ranker_node_without_the_ranker_resource():
    cluster = _aws()
    del cluster["available_node_types"]["ranker_node"]["resources"]["ranker"]
    problems = launcher_problems("cluster/aws.yaml", cluster, "configs/paper_7b.yaml", ROLES)
    text = "\n".join(problems)
    assert "cluster/aws.yaml: node type 'ranker_node' cannot host one ranker actor" in text
    assert "ranker (has 0, one ranker actor asks 1)" in text
    assert "does not declare ['ranker']" in text


def test_checker_rejects_a_rollout_node_without_a_gpu_and_a_too_small_learner_tier():
    cluster = _aws()
    cluster["available_node_types"]["rollout_node"]["resources"] = {"CPU": 4}
    cluster["available_node_types"]["learner_node"]["resources"] = {"CPU": 16, "GPU": 4}
    text = "\n".join(launcher_problems("cluster/aws.yaml", cluster, "configs/paper_7b.yaml", ROLES))
    assert "node type 'rollout_node' cannot host one rollout actor" in text and "GPU (has 0" in text
    assert "node type 'learner_node' holds at most 2 learner actors" in text


def test_checker_rejects_a_missing_role_and_a_stray_ranker_resource():
    cluster = _aws()
    del cluster["available_node_types"]["learner_node"]
    cluster["available_node_types"]["rollout_node"]["resources"]["ranker"] = 1
    text = "\n".join(launcher_problems("cluster/aws.yaml", cluster, "configs/paper_7b.yaml", ROLES))
    assert "no node type for the learner actors" in text
    assert "node type 'rollout_node' advertises the ranker resource" in text


def test_schema_check_rejects_unknown_keys_and_bad_values():
    cluster = _aws()
    cluster["available_node_types"]["ranker_node"]["resource"] = {"ranker": 1}  # typo
    cluster["available_node_types"]["learner_node"]["resources"]["GPU"] = "four"
    problems = schema_problems("cluster/aws.yaml", cluster)
    text = "\n".join(problems)
    assert "available_node_types/ranker_node" in text and "'resource' was unexpected" in text
    assert "available_node_types/learner_node/resources/GPU" in text


def test_kuberay_checker_rejects_a_ranker_group_without_the_ranker_resource():
    manifest = copy.deepcopy(_load_yaml(CLUSTER / "kuberay.yaml"))
    ranker = next(g for g in manifest["spec"]["workerGroupSpecs"] if g["groupName"] == "ranker")
    del ranker["rayStartParams"]["resources"]
    learner = next(g for g in manifest["spec"]["workerGroupSpecs"] if g["groupName"] == "learner")
    del learner["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    text = "\n".join(kuberay_problems("cluster/kuberay.yaml", manifest, "configs/paper_7b.yaml", ROLES))
    assert "cluster/kuberay.yaml: worker group 'ranker' cannot host one ranker actor" in text
    assert "ranker (has 0, one ranker actor asks 1)" in text
    assert "worker group 'learner' cannot host one learner actor" in text and "GPU (has 0" in text
