"""``RankerWorker``: ranks groups with a backend, retries invalid answers, falls back, counts.

A plain class (no Ray): the ranker actor wraps it, and tests build it directly. An answer is
accepted only when it is a valid ordering of the group's G candidates (checked with
:func:`rlaif_ray.algo.advantages.ranks_from_orderings`); any exception from the backend (invalid
judge text, transport error after the backend's own retries) counts as a failed attempt and is
logged with the group's id. A group gets the configured fallback (:func:`apply_fallback`) after
``1 + cfg.max_retries`` failed attempts, or once it has been ranked for ``cfg.group_deadline_s``
seconds, whatever the backend is doing then:

* ``tie``: every rank (G - 1) / 2, status ``"fallback_tie"`` (zero advantage, the learner skips it);
* ``drop``: ranks None, status ``"dropped"`` (the group is discarded).

A group the backend cannot be shown is not ranked (ranks None; the loop drops it as unranked) and
is counted: ``no_reference`` when the backend ranks against a reference (``ground_truth``) and the
group has none (an error names the group and the backend to use instead), ``bad_video`` when the
backend looks at the video (``needs_video``) and it does not decode here (warned once per video).

Each group is ranked in a thread of its own, at most ``backend.concurrency`` at once. That is what
lets the worker keep its deadline when a backend call hangs: the worker stops waiting for the
group, and the thread finishes its call in the background (bounded by the backend's own timeouts),
starts no further attempt, and its result is ignored. The threads are daemons kept for the next
groups once their group is settled (:class:`_Runners`): starting a thread waits until it holds the
interpreter lock, milliseconds when the process's request threads are busy, at every group.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlaif_ray.algo.advantages import ranks_from_orderings
from rlaif_ray.answers import is_correct
from rlaif_ray.config import DataConfig, ModelConfig, RankerConfig
from rlaif_ray.data.frames import FrameStore
from rlaif_ray.groups import Group
from rlaif_ray.logs import setup_logging
from rlaif_ray.process import configure_cpu
from rlaif_ray.ranker.backends import RankerBackend, RankPrompt, make_backend
from rlaif_ray.ranker.prompting import InvalidOrdering, Ordering
from rlaif_ray.registry import import_plugins
from rlaif_ray.telemetry import Telemetry

log = logging.getLogger(__name__)

# The counters of RankerWorker.stats() and RankerPool.stats(): groups ranked, of which ok or given
# the fallback (fallback_tie + dropped; deadline_expired of them by the deadline); attempts and
# re-asks (retries) of the worker; requests the backend retried itself (transport_retries);
# answers that were no valid ordering (invalid); groups not ranked for want of a reference
# (no_reference) or of a video that decodes (bad_video); tokens an API server reported
# (prompt_tokens, completion_tokens); ranked groups with a reference and both right and wrong
# answers (top1_checked), and of them those whose best-ranked answers are all right
# (top1_agrees): the Oracle's agreement with the labels, where there are labels. ``errors``
# counts failed attempts by exception.
COUNTERS = (
    "groups",
    "ok",
    "attempts",
    "retries",
    "transport_retries",
    "invalid",
    "fallbacks",
    "fallback_tie",
    "dropped",
    "deadline_expired",
    "no_reference",
    "bad_video",
    "prompt_tokens",
    "completion_tokens",
    "top1_checked",
    "top1_agrees",
)


def apply_fallback(group: Group, fallback: str) -> str:
    """Give ``group`` the fallback ``"tie"`` (all ranks equal) or ``"drop"`` (ranks None); returns
    the group's new ``rank_status`` (``"fallback_tie"`` or ``"dropped"``)."""
    if fallback == "tie":
        group.ranks = [(group.size - 1) / 2] * group.size
        group.rank_status = "fallback_tie"
    else:
        group.ranks = None
        group.rank_status = "dropped"
    return group.rank_status


@dataclass(eq=False)
class _Job:
    """One group's ranking in progress: written by its thread, read by the worker once settled."""

    group: Group
    prompt: RankPrompt
    deadline: float  # time.monotonic() at which the group gets the fallback
    cancelled: threading.Event = field(default_factory=threading.Event)
    attempts: int = 0
    ranks: list[float] | None = None
    last_error: str = ""


class _Runners:
    """Daemon threads that run the calls given to :meth:`run`, one each, reused when free; a new
    thread starts only when none is free (a call that hangs keeps its thread)."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._free = 0

    def run(self, call: Callable[[], None]) -> None:
        with self._lock:
            start = self._free == 0
            if start:
                self._threads += 1
            else:
                self._free -= 1
        self._calls.put(call)
        if start:
            threading.Thread(target=self._serve, name="rank", daemon=True).start()

    def busy(self) -> int:
        """Calls given and not finished (an abandoned call included until it returns)."""
        with self._lock:
            return self._threads - self._free

    def _serve(self) -> None:
        while True:
            call = self._calls.get()
            try:
                call()
            except Exception:  # (the calls catch their own errors): keep the thread all the same
                log.exception("ranker: a call on a rank thread raised")
            with self._lock:
                self._free += 1


class RankerWorker:
    """Ranks groups of ``group_size`` answers with ``backend`` (default: ``make_backend(cfg)``).

    For a backend that looks at the video, each group's video is decoded here as the policy samples
    it (``num_frames`` frames, videos over ``max_video_pixels`` per frame refused): the path must be
    readable where the ranker runs.
    """

    def __init__(
        self,
        cfg: RankerConfig,
        group_size: int,
        backend: RankerBackend | None = None,
        num_frames: int = ModelConfig.num_frames,
        max_video_pixels: int | None = DataConfig.max_video_pixels,
        log_level: str | None = None,
        plugins: Sequence[str] = (),
    ) -> None:
        setup_logging(log_level)  # (None: the level the driver exported to the environment)
        configure_cpu(0, cfg.cpu_cores, "ranker")
        import_plugins(plugins)  # the config's ``plugins``, before the backend is looked up
        if cfg.fallback not in ("tie", "drop"):
            raise ValueError(f"ranker.fallback must be 'tie' or 'drop', got {cfg.fallback!r}")
        if cfg.group_deadline_s <= 0:
            raise ValueError(f"ranker.group_deadline_s must be > 0 seconds, got {cfg.group_deadline_s!r}")
        self.cfg = cfg
        self.group_size = group_size
        self.backend = backend if backend is not None else make_backend(cfg)
        # A group is ranked once, its G answers together: a few decoded videos kept suffice (frames
        # stay at the video's own size here, so a large cache of real videos would cost gigabytes).
        self.frames = (
            FrameStore(num_frames, capacity=16, max_pixels=max_video_pixels)
            if self.backend.needs_video
            else None
        )
        self._lock = threading.Lock()
        self._runners = _Runners()
        self._counts: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._rank_s = 0.0
        self.telemetry = Telemetry("ranker")  # tagged with the actor's name, e.g. ranker-0
        self._reported: tuple[Counter[str], Counter[str]] = (Counter(), Counter())

    def rank_group(self, group: Group) -> Group:
        """Fill ``ranks``, ``scores``, ``rank_status``, ``rank_attempts`` and ``rank_s`` of ``group``."""
        return self.rank_groups([group])[0]

    def rank_groups(self, groups: list[Group]) -> list[Group]:
        """Rank several groups (``backend.concurrency`` at once); returns them filled.

        Each group gets up to ``1 + cfg.max_retries`` attempts within ``cfg.group_deadline_s``
        seconds of its first; its ``rank_s`` is the time from this call until it was settled. When
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
            group.correct = (
                None
                if group.reference is None
                else [float(is_correct(c, group.reference)) for c in group.completions]
            )
        start = time.perf_counter()
        settled: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        prompts = {id(group): self._prompt(group) for group in groups}
        shown = [g for g in groups if prompts[id(g)] is not None]
        waiting, running = deque(_Job(g, prompts[id(g)], 0.0) for g in shown), []
        while waiting or running:
            while waiting and len(running) < max(1, self.backend.concurrency):
                running.append(self._start(waiting.popleft(), settled))
            timeout = min(job.deadline for job in running) - time.monotonic()
            try:
                job = settled.get(timeout=max(0.0, timeout))
            except queue.Empty:
                for job in [j for j in running if j.deadline <= time.monotonic()]:
                    running.remove(job)
                    job.cancelled.set()
                    self._expire(job, time.perf_counter() - start)
                continue
            if job in running:  # else its deadline passed first: already settled
                running.remove(job)
                self._settle(job, time.perf_counter() - start)
        for group in shown:
            group.scores = self.backend.scores(prompts[id(group)], group.completions)
        checked = [
            g
            for g in groups
            if g.rank_status == "ok" and g.correct is not None and 0 < sum(g.correct) < g.size
        ]
        agrees = sum(
            all(right for right, rank in zip(g.correct, g.ranks, strict=True) if rank == min(g.ranks))
            for g in checked
        )
        with self._lock:
            self._counts["top1_checked"] += len(checked)
            self._counts["top1_agrees"] += agrees
            self._counts["groups"] += len(groups)
            self._counts["ok"] += sum(g.rank_status == "ok" for g in groups)
            self._counts["attempts"] += sum(g.rank_attempts for g in groups)
            self._counts["retries"] += sum(max(g.rank_attempts - 1, 0) for g in groups)
            self._rank_s += time.perf_counter() - start
        return groups

    def rank_chunk(self, groups: list[Group]) -> tuple[list[Group], dict[str, Any]]:
        """:meth:`rank_groups`, and the counters that grew since the previous ``rank_chunk`` (what the
        pool adds up: a worker's own totals die with its actor)."""
        ranked = self.rank_groups(groups)
        with self._lock:
            counts, errors = self._snapshot()
            last_counts, last_errors = self._reported
            self._reported = (counts, errors)
        grown = counts - last_counts
        for name, key in [
            ("rlaif_groups_ranked", "groups"),
            ("rlaif_ranker_invalid_answers", "invalid"),
            ("rlaif_ranker_retries", "retries"),
            ("rlaif_ranker_fallbacks", "fallbacks"),
        ]:
            self.telemetry.count(name, grown[key])
        for group in ranked:
            self.telemetry.observe("rlaif_ranker_group_latency_s", group.rank_s)
        return ranked, {**dict(grown), "errors": dict(errors - last_errors)}

    def __repr__(self) -> str:
        # Ray reads it once, after __init__, for the dashboard's Actors view and the log prefix.
        backend = getattr(self, "backend", None)
        return f"RankerWorker(ranker, backend {backend.name if backend is not None else 'starting'})"

    def stats(self) -> dict[str, Any]:
        """Counters since construction (see :data:`COUNTERS`), ``errors`` (failed attempts by
        exception type) and ``rank_s`` (wall seconds spent ranking)."""
        with self._lock:
            counts, errors = self._snapshot()
            return {**{key: counts[key] for key in COUNTERS}, "errors": dict(errors), "rank_s": self._rank_s}

    def _snapshot(self) -> tuple[Counter[str], Counter[str]]:
        """Copies of the counters (the backend's transport retries and token counts included); call
        under the lock."""
        counts = Counter(self._counts)
        for key in ("transport_retries", "prompt_tokens", "completion_tokens"):
            counts[key] = getattr(self.backend, key)
        return counts, Counter(self._errors)

    def _prompt(self, group: Group) -> RankPrompt | None:
        """What the backend is shown of ``group``'s prompt, or None (the group is marked unranked and
        counted) when it cannot be shown: no reference for a backend that needs one, or a video that
        does not decode for a backend that looks at it."""
        if self.backend.needs_reference and group.reference is None:
            log.error(
                "ranker: group %s has no reference answer and ranker.backend=%s ranks against the "
                "reference: not ranked (rank prompts nobody labelled with ranker.backend=video_judge)",
                group.group_id,
                self.backend.name,
            )
            return self._unranked(group, "no_reference")
        frames = None
        if self.frames is not None and group.video is not None:
            frames = self.frames.try_get(group.video)  # warned once per video, with the reason
            if frames is None:
                return self._unranked(group, "bad_video")
        return RankPrompt(group.question, group.reference, group.question_type, group.video, frames)

    def _unranked(self, group: Group, status: str) -> None:
        group.ranks, group.rank_status = None, status
        with self._lock:
            self._counts[status] += 1
        return None

    def _start(self, job: _Job, settled: queue.SimpleQueue[_Job]) -> _Job:
        job.deadline = time.monotonic() + self.cfg.group_deadline_s
        self._runners.run(lambda: self._attempt(job, settled))
        return job

    def _attempt(self, job: _Job, settled: queue.SimpleQueue[_Job]) -> None:
        """A group's attempts, in its own thread, until one is valid, none are left or it is cancelled."""
        group, max_attempts = job.group, 1 + self.cfg.max_retries
        try:
            for attempt in range(1, max_attempts + 1):
                if job.cancelled.is_set():
                    return
                job.attempts = attempt
                try:
                    answer = self.backend.rank(job.prompt, group.completions)
                    job.ranks = self._ranks(answer)
                    return
                except Exception as exc:
                    if job.cancelled.is_set():  # settled at its deadline: this late failure is moot
                        return
                    job.last_error = f"{type(exc).__name__}: {exc}"
                    self._count_failure(group, attempt, max_attempts, exc)
        finally:
            settled.put(job)

    def _ranks(self, answer: Ordering) -> list[float]:
        """The ranks of a backend answer, or raise InvalidOrdering."""
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

    def _settle(self, job: _Job, elapsed: float) -> None:
        """Copy a finished job's outcome into its group: its ranks, or the fallback."""
        group = job.group
        group.rank_attempts, group.rank_s = job.attempts, elapsed
        if job.ranks is not None:
            group.ranks, group.rank_status = job.ranks, "ok"
            return
        self._fall_back(
            job, f"has no valid ordering after {job.attempts} attempt(s) (last: {job.last_error})"
        )

    def _expire(self, job: _Job, elapsed: float) -> None:
        """The group's deadline passed: it gets the fallback now, whatever its thread is doing."""
        job.group.rank_attempts, job.group.rank_s = job.attempts, elapsed
        last = f"last failure: {job.last_error}" if job.last_error else "no answer yet"
        self._fall_back(
            job,
            f"passed its deadline of {self.cfg.group_deadline_s:g} s (ranker.group_deadline_s) "
            f"during attempt {job.attempts} ({last})",
            deadline=True,
        )

    def _fall_back(self, job: _Job, reason: str, deadline: bool = False) -> None:
        status = apply_fallback(job.group, self.cfg.fallback)
        log.warning(
            "ranker: group %s %s; %s (ranker.fallback=%s)",
            job.group.group_id,
            reason,
            status,
            self.cfg.fallback,
        )
        with self._lock:
            self._counts["fallbacks"] += 1
            self._counts[status] += 1
            if deadline:
                self._counts["deadline_expired"] += 1
