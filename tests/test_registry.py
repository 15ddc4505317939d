"""Plugins of one's own: an advantage estimator, a ranker backend and a rollout engine registered
in this module are accepted by config validation and run by name through the plain workers that
the actors wrap, with no other edit."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from rlaif_ray.algo.advantages import register_advantage
from rlaif_ray.config import Config, ConfigError, load_config, validate
from rlaif_ray.data.dataset import load_jsonl
from rlaif_ray.groups import Group
from rlaif_ray.learner.worker import LearnerWorker
from rlaif_ray.ranker.backends import RankerBackend, RankPrompt, register_backend
from rlaif_ray.ranker.worker import RankerWorker
from rlaif_ray.registry import ADVANTAGES, RANKER_BACKENDS, REGISTRIES, ROLLOUT_ENGINES, Registry
from rlaif_ray.rollout.engine import HFEngine
from rlaif_ray.rollout.worker import RolloutWorker

CALLS: dict[str, int] = {"estimator": 0, "backend": 0, "engine": 0}


@pytest.fixture
def plugins() -> Iterator[None]:
    """Register the three plugins for one test (as a user's module would, at import)."""

    @register_advantage("test_top_only")
    def top_only(ranks: torch.Tensor) -> torch.Tensor:
        """+1 shared by the best answers, the rest share -1 (zero-sum per group)."""
        CALLS["estimator"] += 1
        best = (ranks == ranks.min(dim=1, keepdim=True).values).to(torch.float64)
        return best / best.sum(1, keepdim=True) - (1 - best) / (1 - best).sum(1, keepdim=True).clamp_min(1)

    @register_backend("test_shortest_first")
    class ShortestFirst(RankerBackend):
        def __init__(self, cfg: object) -> None:
            pass

        def rank(self, prompt: RankPrompt, candidates: list[str]) -> list[int]:
            CALLS["backend"] += 1
            return sorted(range(len(candidates)), key=lambda i: (len(candidates[i]), i))

    @ROLLOUT_ENGINES.register("test_counting_hf")
    class CountingHF(HFEngine):
        def sample(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
            CALLS["engine"] += 1
            return super().sample(*args, **kwargs)

    yield
    for registry, name in [
        (ADVANTAGES, "test_top_only"),
        (RANKER_BACKENDS, "test_shortest_first"),
        (ROLLOUT_ENGINES, "test_counting_hf"),
    ]:
        registry.unregister(name)


def test_each_kind_of_plugin_has_one_registry_that_config_validation_asks() -> None:
    for registry in REGISTRIES:
        assert registry.names(), registry.kind
        key, name = registry.key, "no_such_plugin"
        with pytest.raises(ConfigError, match=f"'{key}' = '{name}': expected a registered {registry.kind}"):
            load_config(None, [f"{key}={name}"])


def test_plugins_registered_here_run_by_name_and_each_worker_says_what_it_serves(
    plugins: None, small_config: Config
) -> None:
    cfg = small_config
    cfg.algo.advantage, cfg.ranker.backend = "test_top_only", "test_shortest_first"
    cfg.rollout.engine = "test_counting_hf"
    cfg.rl.group_size, cfg.rl.prompts_per_step = 3, 4
    validate(cfg)  # what load_config runs: the names are registered
    CALLS.update(dict.fromkeys(CALLS, 0))
    rollout, ranker = RolloutWorker(cfg, cfg.model.path), RankerWorker(cfg.ranker, cfg.rl.group_size)
    groups = ranker.rank_groups(rollout.rollout(load_jsonl(cfg.data.train)[:4], step=1))
    assert [g.rank_status for g in groups] == ["ok"] * 4
    learner = LearnerWorker(cfg, cfg.model.path)
    learner.setup()
    stats = learner.train_step(groups)
    assert CALLS["engine"] >= 1 and CALLS["backend"] == 4 and CALLS["estimator"] >= 1
    assert stats["skipped_step"] == 0.0 and stats["version"] == 1.0
    # What the Ray dashboard and the log prefix show for each actor: its role and what it runs.
    assert repr(rollout) == "RolloutWorker(rollout-0, test_counting_hf)"
    assert repr(ranker) == "RankerWorker(ranker, backend test_shortest_first)"
    assert repr(learner) == "LearnerWorker(learner-0 of 1)"


def test_a_name_is_registered_once_and_a_lazy_plugin_is_imported_when_used() -> None:
    registry = Registry("thing", "section.thing", "json")  # builtins: a module that registers none
    registry.register_lazy("dumps", "json:dumps")
    assert registry.names() == ["dumps"] and registry.get("dumps")([1]) == "[1]"
    with pytest.raises(ValueError, match="thing 'dumps' is already registered"):
        registry.register("dumps")(print)
    with pytest.raises(ValueError, match="section.thing = 'loads': no thing is registered.*dumps"):
        registry.get("loads")


PLUGIN_MODULE = """
from rlaif_ray.ranker.backends import RankerBackend, register_backend


@register_backend("{name}")
class LongestFirst(RankerBackend):
    def __init__(self, cfg):
        pass

    def rank(self, prompt, candidates):
        return sorted(range(len(candidates)), key=lambda i: (-len(candidates[i]), i))
"""


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """(name, folder) of a module of one's own on disk that registers a ranker backend of the same
    name at import, as a user's package would; unregistered and forgotten afterwards."""
    name = f"my_plugins_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(PLUGIN_MODULE.format(name=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, tmp_path
    if name in RANKER_BACKENDS._plugins:
        RANKER_BACKENDS.unregister(name)
    sys.modules.pop(name, None)


def test_the_plugins_key_imports_a_users_module_before_validation(plugin_module: tuple[str, Path]) -> None:
    name, _ = plugin_module
    with pytest.raises(ConfigError, match=f"'ranker.backend' = '{name}': expected a registered ranker"):
        load_config(None, [f"ranker.backend={name}"])
    cfg = load_config(None, [f"plugins=[{name}]", f"ranker.backend={name}"])
    assert cfg.plugins == [name] and name in RANKER_BACKENDS
    with pytest.raises(ConfigError, match="'plugins' = \\['no_such_plugins_module'\\].*cannot be imported"):
        load_config(None, ["plugins=[no_such_plugins_module]"])


def test_a_ranker_actor_imports_the_plugins_in_its_own_process(plugin_module: tuple[str, Path]) -> None:
    """The actor's process has never imported the module: it ranks with the plugin only because it
    imports ``plugins`` as it starts (the module reaches it the way a runtime env ships one)."""
    name, folder = plugin_module
    cfg = load_config(None, [f"plugins=[{name}]", f"ranker.backend={name}", "rl.group_size=3"])
    group = Group(
        group_id="g0",
        example_id="e0",
        video=None,
        question="what colour ?",
        reference=None,
        completions=["a", "ccc", "bb"],
        completion_ids=[[1], [1, 2, 3], [1, 2]],
        logprobs=[[0.0]] * 3,
        weight_version=0,
    )
    ray.init(num_cpus=1, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(folder)}})
    try:
        actor = ray.remote(RankerWorker).remote(cfg.ranker, 3, plugins=cfg.plugins)
        (ranked,) = ray.get(actor.rank_groups.remote([group]))
        without = ray.remote(RankerWorker).remote(cfg.ranker, 3)
        with pytest.raises(
            ray.exceptions.RayActorError,
            match=f"'{name}': no ranker backend is registered under that name.*name the module in 'plugins'",
        ):
            ray.get(without.rank_groups.remote([group]))
    finally:
        ray.shutdown()
    assert ranked.rank_status == "ok" and ranked.ranks == [2.0, 0.0, 1.0]  # longest first
