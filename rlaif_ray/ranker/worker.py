"""``RankerWorker``: ranks groups with a backend, retries invalid answers, falls back, counts.

A plain class (no Ray): the ranker actor wraps it, and tests build it directly. An answer is
accepted only when it is a valid ordering of the group's G candidates (checked with
:func:`rlaif_ray.algo.advantages.ranks_from_orderings`); any exception from the backend (invalid
judge text, transport error after the backend's own retries) counts as a failed attempt. After
``1 + cfg.max_retries`` failed attempts the group gets the configured fallback:

* ``tie``: every rank (G - 1) / 2, status ``"fallback_tie"`` (zero advantage, the learner skips it);
* ``drop``: ranks None, status ``"dropped"`` (the group is discarded).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

from rlaif_ray.algo.advantages import ranks_from_orderings
from rlaif_ray.config import RankerConfig
from rlaif_ray.groups import Group
from rlaif_ray.logs import setup_logging
from rlaif_ray.ranker.backends import RankerBackend, RankRequest, make_backend
from rlaif_ray.ranker.prompting import InvalidOrdering, Ordering

log = logging.getLogger(__name__)


class RankerWorker:
    """Ranks groups of ``group_size`` answers with ``backend`` (default: ``make_backend(cfg)``)."""

    def __init__(self, cfg: RankerConfig, group_size: int, backend: RankerBackend | None = None) -> None:
        setup_logging()  # the level the driver exported (RankerConfig does not carry it)
        if cfg.fallback not in ("tie", "drop"):
            raise ValueError(f"ranker.fallback must be 'tie' or 'drop', got {cfg.fallback!r}")
        self.cfg = cfg
        self.group_size = group_size
        self.backend = backend if backend is not None else make_backend(cfg)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._rank_s = 0.0

    def rank_group(self, group: Group) -> Group:
        """Fill ``ranks``, ``scores``, ``rank_status``, ``rank_attempts`` and ``rank_s`` of ``group``."""
        return self.rank_groups([group])[0]

    def rank_groups(self, groups: list[Group]) -> list[Group]:
        """Rank several groups (the backend may overlap them, see ``rank_many``); returns them filled.

        Attempts go in rounds: every group still without a valid ordering is asked again, up to
        ``1 + cfg.max_retries`` rounds. A group's ``rank_s`` is the time until it was settled. When
        the reference is known, ``scores`` come from the backend (None if it only ranks), whatever
        the rank status, so that accuracy can be measured on fallback groups too.
        """
        for group in groups:
            if group.size != self.group_size:
                raise ValueError(
                    f"group {group.group_id} has {group.size} answers; this ranker expects {self.group_size}"
                )
        for group in groups:
            group.ranks, group.scores, group.rank_status, group.rank_attempts = None, None, "pending", 0
        start = time.perf_counter()
        max_attempts = 1 + self.cfg.max_retries
        pending = list(groups)
        for attempt in range(1, max_attempts + 1):
            if not pending:
                break
            answers = self.backend.rank_many(
                [RankRequest(g.question, g.reference, g.completions) for g in pending]
            )
            elapsed = time.perf_counter() - start
            failed = []
            for group, answer in zip(pending, answers, strict=True):
                group.rank_attempts = attempt
                try:
                    group.ranks = self._ranks(answer)
                except Exception as exc:
                    self._count_failure(group, attempt, max_attempts, exc)
                    failed.append(group)
                else:
                    group.rank_status = "ok"
                    group.rank_s = elapsed
            pending = failed
        elapsed = time.perf_counter() - start
        for group in pending:
            self._fall_back(group, elapsed)
        for group in groups:
            if group.reference is not None:
                group.scores = self.backend.scores(group.reference, group.completions)
        with self._lock:
            self._counts["groups"] += len(groups)
            self._counts["ok"] += sum(g.rank_status == "ok" for g in groups)
            self._counts["attempts"] += sum(g.rank_attempts for g in groups)
            self._counts["retries"] += sum(g.rank_attempts - 1 for g in groups)
            self._rank_s += elapsed
        return groups

    def stats(self) -> dict[str, Any]:
        """Counters since construction: groups, ok, attempts, retries, invalid, fallbacks, dropped,
        errors (failed attempts by exception type) and rank_s (wall seconds spent ranking)."""
        with self._lock:
            counts = {
                key: self._counts[key]
                for key in ("groups", "ok", "attempts", "retries", "invalid", "fallbacks", "dropped")
            }
            return {**counts, "errors": dict(self._errors), "rank_s": self._rank_s}

    def _ranks(self, answer: Ordering | Exception) -> list[float]:
        """The ranks of a backend answer, or raise: the backend's exception, or InvalidOrdering."""
        if isinstance(answer, Exception):
            raise answer
        try:
            ranks = ranks_from_orderings([answer], self.group_size)
        except ValueError as exc:
            raise InvalidOrdering(str(exc)) from exc
        return [float(r) for r in ranks[0].tolist()]

    def _count_failure(self, group: Group, attempt: int, max_attempts: int, exc: Exception) -> None:
        kind = type(exc).__name__
        log.warning(
            "ranker: group %s attempt %d/%d failed (%s): %s", group.group_id, attempt, max_attempts, kind, exc
        )
        with self._lock:
            self._errors[kind] += 1
            if isinstance(exc, InvalidOrdering):
                self._counts["invalid"] += 1

    def _fall_back(self, group: Group, elapsed: float) -> None:
        group.rank_s = elapsed
        if self.cfg.fallback == "tie":
            group.ranks = [(self.group_size - 1) / 2] * self.group_size
            group.rank_status = "fallback_tie"
            counter = "fallbacks"
        else:
            group.ranks = None
            group.rank_status = "dropped"
            counter = "dropped"
        log.warning(
            "ranker: group %s has no valid ordering after %d attempts; %s",
            group.group_id,
            group.rank_attempts,
            group.rank_status,
        )
        with self._lock:
            self._counts[counter] += 1
