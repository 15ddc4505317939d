"""One registry per kind of plugin: the single source of the names a config key may take.

Each kind (advantage estimators, KL estimators, loss aggregations, ranker backends, rollout
engines) has one :class:`Registry` here, at the bottom of the package, so that config validation
can ask it without importing the plugins' modules: a registry imports the module that registers
its built-in plugins (by name) the first time it is asked for its names. A plugin of one's own
registers from any module with the same decorator as the built-in ones::

    from rlaif_ray.registry import ADVANTAGES

    @ADVANTAGES.register("top1", takes="ranks")
    def top1(ranks): ...

and is then chosen by name (``algo.advantage=top1``) once the config's ``plugins`` key names the
module (``plugins=[my_pkg.ranking]``): the driver imports it before it validates the config, and
every actor as it starts (:func:`import_plugins`). A plugin whose module is costly to import (vLLM)
is registered by its import path (:meth:`Registry.register_lazy`).
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any


class Registry:
    """The plugins of one kind, by name, each with the traits it was registered with."""

    def __init__(self, kind: str, key: str, builtins: str) -> None:
        self.kind = kind  # e.g. "advantage estimator"
        self.key = key  # the config key that names one, e.g. "algo.advantage"
        self.builtins = builtins  # the module that registers the built-in plugins
        self._plugins: dict[str, Any] = {}  # name -> the plugin, or its "module:attribute" path
        self._traits: dict[str, dict[str, Any]] = {}
        self._loaded = False

    def register(self, name: str, **traits: Any) -> Callable[[Any], Any]:
        """Decorator: register the decorated function or class as ``name``, with ``traits``."""

        def decorator(plugin: Any) -> Any:
            self._add(name, plugin, traits)
            return plugin

        return decorator

    def register_lazy(self, name: str, path: str, **traits: Any) -> None:
        """Register ``name`` as ``"module:attribute"``, imported when it is first used."""
        self._add(name, path, traits)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a test's own plugin, once the test is done)."""
        del self._plugins[name], self._traits[name]

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._plugins)

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def get(self, name: str) -> Any:
        """The plugin registered as ``name``; ValueError naming the config key and every name."""
        if name not in self:
            raise ValueError(
                f"{self.key} = {name!r}: no {self.kind} is registered under that name; "
                f"registered: {', '.join(self.names())} ({PLUGINS_HINT})"
            )
        plugin = self._plugins[name]
        if isinstance(plugin, str):
            module, attribute = plugin.split(":")
            plugin = self._plugins[name] = getattr(importlib.import_module(module), attribute)
        return plugin

    def traits(self, name: str) -> dict[str, Any]:
        """What ``name`` was registered with (e.g. an estimator's ``takes``)."""
        self.get(name)
        return self._traits[name]

    def _add(self, name: str, plugin: Any, traits: dict[str, Any]) -> None:
        if name in self._plugins:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._plugins[name], self._traits[name] = plugin, traits

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.builtins)


PLUGINS_HINT = "a plugin of one's own is registered when its module is imported: name the module in 'plugins'"


def import_plugins(modules: Sequence[str]) -> None:
    """Import ``modules`` (the config's ``plugins``), which register plugins of one's own as they
    are imported. Every process that uses a plugin calls this: the driver and each actor."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(
                f"plugins: module {module!r} cannot be imported in process {os.getpid()} on "
                f"{socket.gethostname()} ({exc}); it must be importable on every node, e.g. from a "
                "package installed there or shipped by the job's runtime env (py_modules, working_dir)"
            ) from exc


ADVANTAGES = Registry("advantage estimator", "algo.advantage", "rlaif_ray.algo.advantages")
KL_ESTIMATORS = Registry("KL estimator", "algo.kl_estimator", "rlaif_ray.algo.losses")
AGGREGATIONS = Registry("loss aggregation", "algo.aggregation", "rlaif_ray.algo.losses")
RANKER_BACKENDS = Registry("ranker backend", "ranker.backend", "rlaif_ray.ranker")
ROLLOUT_ENGINES = Registry("rollout engine", "rollout.engine", "rlaif_ray.rollout.engine")
REGISTRIES = (ADVANTAGES, KL_ESTIMATORS, AGGREGATIONS, RANKER_BACKENDS, ROLLOUT_ENGINES)
