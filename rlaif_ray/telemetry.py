"""Live metrics for the Ray dashboard and Prometheus, through ``ray.util.metrics``.

Every metric is declared once, in :data:`METRICS`, with its kind and meaning; every series carries
the tags ``role`` (``rollout``, ``ranker``, ``learner`` or ``driver``) and ``actor`` (the actor it
describes, e.g. ``rollout-0``; ``pool`` for the ranker pool as a whole, ``driver`` for the loop),
plus the extra tags its declaration names. Each Ray node's metrics agent serves them on the node's
metrics export port in Prometheus' text format, where Ray prefixes every name with ``ray_`` and
exports counters with ``_total`` (e.g. ``ray_rlaif_groups_learned_total``) and histograms as
``_bucket``/``_sum``/``_count``; ``cluster/grafana/rlaif_ray.json`` is a Grafana dashboard of them.

Who records what: rollout actors their samples, skipped videos and the weight version they serve;
ranker actors their groups, per-group latency, invalid answers, retries and fallbacks; the ranker
pool (in the driver) its size, queue depth and actor restarts; the driver the rest, once per
update, from the record it writes to ``metrics.jsonl`` (:class:`LoopMetrics`). Outside Ray (a
plain worker built by a test) recording does nothing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    kind: Kind
    description: str
    tags: tuple[str, ...] = ()  # tag keys besides role and actor


# Seconds: ranking a group, and each stage of an update.
SECONDS_BOUNDARIES = [0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0]

METRICS: dict[str, MetricSpec] = {
    "rlaif_groups_sampled": MetricSpec("counter", "Groups of answers sampled by a rollout actor."),
    "rlaif_groups_ranked": MetricSpec("counter", "Groups ordered by a ranker actor (fallbacks included)."),
    "rlaif_groups_learned": MetricSpec(
        "counter", "Groups the learner learned from (those of updates a learner restore undid included)."
    ),
    "rlaif_groups_dropped": MetricSpec(
        "counter", "Groups sampled and never learned, by reason.", ("reason",)
    ),
    "rlaif_ranker_queue_depth": MetricSpec("gauge", "Groups waiting for a ranker actor."),
    "rlaif_ranker_pool_size": MetricSpec("gauge", "Ranker actors in the pool."),
    "rlaif_ranker_group_latency_s": MetricSpec(
        "histogram", "Seconds from a ranker starting on a group until it is ordered (retries included)."
    ),
    "rlaif_ranker_invalid_answers": MetricSpec("counter", "Judge answers that were no valid ordering."),
    "rlaif_ranker_retries": MetricSpec("counter", "Groups asked of the judge again after an invalid answer."),
    "rlaif_ranker_fallbacks": MetricSpec("counter", "Groups given ranker.fallback (tie or drop)."),
    "rlaif_sampled_accuracy": MetricSpec(
        "gauge", "Fraction of the update's sampled answers that are correct."
    ),
    "rlaif_heldout_accuracy": MetricSpec("gauge", "Greedy exact-match accuracy on the held-out split."),
    "rlaif_loss": MetricSpec("gauge", "The update's loss."),
    "rlaif_kl": MetricSpec("gauge", "KL estimate to the reference policy."),
    "rlaif_clip_fraction": MetricSpec("gauge", "Fraction of tokens whose ratio was clipped."),
    "rlaif_grad_norm": MetricSpec("gauge", "Gradient norm before clipping."),
    "rlaif_weight_version": MetricSpec(
        "gauge", "Weight version held: the learner's, or the one a rollout actor serves."
    ),
    "rlaif_rollout_weight_lag": MetricSpec(
        "gauge", "Learner version minus the version of a rollout actor's newest samples, when they arrive."
    ),
    "rlaif_stage_s": MetricSpec(
        "histogram", "Seconds per update in each stage (wait, learn, sync, step).", ("stage",)
    ),
    "rlaif_actor_restarts": MetricSpec("counter", "Actors restarted or replaced after dying."),
    "rlaif_videos_skipped": MetricSpec(
        "counter", "Videos that did not decode (prompts or learner rows skipped)."
    ),
}

_made: dict[str, Any] = {}  # name -> the ray.util.metrics object, made once per process


def _metric(name: str) -> Any:
    if name not in _made:
        from ray.util import metrics

        spec = METRICS[name]
        keys = ("role", "actor", *spec.tags)
        if spec.kind == "counter":
            _made[name] = metrics.Counter(name, spec.description, tag_keys=keys)
        elif spec.kind == "gauge":
            _made[name] = metrics.Gauge(name, spec.description, tag_keys=keys)
        else:
            _made[name] = metrics.Histogram(name, spec.description, SECONDS_BOUNDARIES, tag_keys=keys)
    return _made[name]


class Telemetry:
    """Records the metrics of :data:`METRICS` for one ``role`` and ``actor`` (default: the name of
    the Ray actor it runs in). Each call checks the name, kind and tags against the declaration."""

    def __init__(self, role: str, actor: str | None = None) -> None:
        self.role = role
        self.actor = actor
        self._totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def count(self, name: str, value: float = 1.0, **tags: str) -> None:
        """Add ``value`` (>= 0) to counter ``name``."""
        if value:
            self._record(name, "counter", value, tags)

    def count_to(self, name: str, total: float, **tags: str) -> None:
        """Bring counter ``name`` up to ``total``, a running total kept elsewhere (e.g. the loop's
        group counts): adds what it grew since the last call."""
        key = (name, tuple(sorted(tags.items())))
        self.count(name, total - self._totals.get(key, 0.0), **tags)
        self._totals[key] = total

    def set(self, name: str, value: float, **tags: str) -> None:
        """Set gauge ``name`` to ``value``."""
        self._record(name, "gauge", value, tags)

    def observe(self, name: str, value: float, **tags: str) -> None:
        """Add one observation ``value`` to histogram ``name``."""
        self._record(name, "histogram", value, tags)

    def _record(self, name: str, kind: Kind, value: float, tags: dict[str, str]) -> None:
        spec = METRICS.get(name)
        if spec is None:
            raise KeyError(f"metric {name!r} is not declared in rlaif_ray.telemetry.METRICS")
        if spec.kind != kind:
            raise TypeError(f"metric {name!r} is a {spec.kind}, not a {kind}")
        if set(tags) != set(spec.tags):
            raise ValueError(f"metric {name!r} takes the tags {spec.tags}, got {tuple(tags)}")
        if kind == "counter" and value < 0:
            raise ValueError(f"counter {name!r} cannot decrease (got {value})")
        # Ray is imported only where it already runs: the plain classes (SFT, the workers) are built
        # and used without it, on a machine that may not even have it (bench/gpu_check.py).
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            return
        actor = self.actor or ray.get_runtime_context().get_actor_name() or "driver"
        all_tags = {"role": self.role, "actor": actor, **tags}
        metric = _metric(name)
        if kind == "counter":
            metric.inc(value, tags=all_tags)
        elif kind == "gauge":
            metric.set(value, tags=all_tags)
        else:
            metric.observe(value, tags=all_tags)


class LoopMetrics:
    """The driver's metrics of the training loop, published once per update from the record it
    writes to ``metrics.jsonl`` (see ``rlaif_ray.launch.Trainer.step``)."""

    def __init__(self, learner: str = "learner-0") -> None:
        self.learner = Telemetry("learner", learner)
        self.driver = Telemetry("driver", "driver")
        self.rollout = Telemetry("rollout", "all")

    def publish(self, record: dict[str, Any]) -> None:
        """Groups learned and dropped, restarts, the learner's loss, KL, clip fraction, gradient
        norm and version, sampled accuracy, and the time of each stage."""
        stats, pipeline, faults = record["learner"], record["pipeline"], record["faults"]
        # A restore moves groups from learned to rolled_back; the counter keeps the work done.
        self.learner.count_to("rlaif_groups_learned", pipeline["learned"] + pipeline["rolled_back"])
        for reason in ("stale", "unranked", "rolled_back"):
            self.driver.count_to("rlaif_groups_dropped", pipeline[f"dropped_{reason}"], reason=reason)
        self.learner.set("rlaif_weight_version", record["weight_version"])
        self.learner.count("rlaif_videos_skipped", stats.get("rows_bad_video", 0.0))
        self.learner.count_to("rlaif_actor_restarts", faults["learner_restores"])
        self.rollout.count_to("rlaif_actor_restarts", faults["rollout_restarts"])
        for name, key in [
            ("rlaif_loss", "loss"),
            ("rlaif_kl", "kl"),
            ("rlaif_clip_fraction", "clip_frac"),
            ("rlaif_grad_norm", "grad_norm"),
        ]:
            if key in stats:
                self.learner.set(name, stats[key])
        if record.get("sampled_accuracy") is not None:
            self.driver.set("rlaif_sampled_accuracy", record["sampled_accuracy"])
        for stage in ("wait", "learn", "sync", "step"):
            self.driver.observe("rlaif_stage_s", record["time"][f"{stage}_s"], stage=stage)
