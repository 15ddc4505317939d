"""The GRPO_rank learner: ranked groups -> advantages -> clipped, KL-regularised DeepSpeed update.

``LearnerWorker`` is a plain class (a test builds it without Ray); ``rlaif_ray.launch`` runs one
per learner actor, all of them forming one torch.distributed group. Every learner receives the
same list of ranked groups, computes the same advantages, takes its own contiguous share of the
answers and normalises its loss by the *global* token (or sequence) count, so that N learners
take exactly the step one learner would take on the whole batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlaif_ray.algo.advantages import advantages_for, estimator_takes
from rlaif_ray.algo.losses import grpo_loss, loss_denominator
from rlaif_ray.config import Config
from rlaif_ray.data.frames import FrameStore
from rlaif_ray.groups import Group
from rlaif_ray.learner.engine import (
    build_engine,
    free_port,
    gathered_trainable,
    init_distributed,
    is_collective_failure,
    set_collective_timeout,
    set_micro_batches,
)
from rlaif_ray.logs import setup_logging
from rlaif_ray.models.policy import ADAPTER_DIR, VideoLMPolicy
from rlaif_ray.process import configure_cpu
from rlaif_ray.registry import import_plugins
from rlaif_ray.weights import WeightsMessage

log = logging.getLogger(__name__)


class LearnerCollectiveError(RuntimeError):
    """A learner's collective failed: it timed out, or a peer learner is gone."""


@dataclass
class TrainRow:
    """One sampled answer to learn from."""

    video: str | None
    question: str
    completion_ids: list[int]
    # Per-token log-probs under the version that sampled the answer (the behaviour policy).
    old_logprobs: list[float]
    advantage: float
    weight_version: int = 0
    group_id: str = ""  # the rows of one group follow one another and share its prompt
    # The frozen encoder's output for ``video`` from the rollout (Group.visual_features), if sent.
    visual_features: Any = None
    # Per-token log-probs under the reference policy, from the rollout (Group.ref_logprobs), if sent.
    ref_logprobs: list[float] | None = None


def group_advantages(groups: list[Group], cfg: Config) -> list[list[float]]:
    """Advantages of every answer of every group, by the method named in ``algo.advantage``.

    Groups of different sizes are handled one size at a time (the estimators work on [B, G]).
    """
    out: list[list[float]] = [[] for _ in groups]
    by_size: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_size.setdefault(g.size, []).append(i)
    for idx in by_size.values():
        method = cfg.algo.advantage
        if estimator_takes(method) == "scores":
            missing = [groups[i].group_id for i in idx if groups[i].scores is None]
            if missing:
                raise ValueError(
                    f"algo.advantage {method!r} takes the oracle's scores; groups {missing[:3]} have none"
                )
            adv = advantages_for(
                method, scores=torch.tensor([groups[i].scores for i in idx], dtype=torch.float64)
            )
        else:
            adv = advantages_for(
                method,
                ranks=torch.tensor([groups[i].ranks for i in idx], dtype=torch.float64),
                scale_by_std=cfg.algo.scale_by_std,
            )
        for row, i in zip(adv.tolist(), idx, strict=True):
            out[i] = row
    return out


def build_rows(groups: list[Group], cfg: Config) -> tuple[list[TrainRow], dict[str, float]]:
    """Flatten ranked groups to answers with advantages; drop unranked and (optionally) all-tied groups."""
    usable = [g for g in groups if g.ranks is not None]
    advantages = group_advantages(usable, cfg) if usable else []
    rows: list[TrainRow] = []
    skipped_tied = 0
    for group, adv in zip(usable, advantages, strict=True):
        if cfg.algo.skip_tied_groups and all(a == 0.0 for a in adv):
            skipped_tied += 1
            continue
        refs = group.ref_logprobs or [None] * group.size
        for ids, logp, a, ref in zip(group.completion_ids, group.logprobs, adv, refs, strict=True):
            rows.append(
                TrainRow(
                    group.video,
                    group.question,
                    ids,
                    logp,
                    a,
                    group.weight_version,
                    group.group_id,
                    group.visual_features,
                    ref,
                )
            )
    flat = [a for adv in advantages for a in adv]
    stats = {
        "groups": float(len(groups)),
        "groups_unranked": float(len(groups) - len(usable)),
        "groups_skipped_tied": float(skipped_tied),
        "advantage_abs_mean": sum(abs(a) for a in flat) / len(flat) if flat else 0.0,
        "advantage_max": max(flat) if flat else 0.0,
        "advantage_min": min(flat) if flat else 0.0,
    }
    return rows, stats


def split_groups(rows: list[TrainRow]) -> list[list[TrainRow]]:
    """``rows`` cut into their groups: runs of consecutive rows with the same ``group_id``."""
    groups: list[list[TrainRow]] = []
    for row in rows:
        if groups and groups[-1][0].group_id == row.group_id:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def shard(items: list[Any], rank: int, world_size: int) -> list[Any]:
    """The ``rank``-th of ``world_size`` contiguous, near-equal slices of ``items``."""
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return items[start : start + base + (1 if rank < extra else 0)]


def _pad(rows: list[list[float]], width: int, device: torch.device) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out.to(device)


class LearnerWorker:
    """One rank of the DeepSpeed learner: holds the policy, trains it, exports its weights."""

    def __init__(self, cfg: Config, model_dir: str, rank: int = 0, world_size: int = 1) -> None:
        setup_logging(cfg.log_level)
        import_plugins(cfg.plugins)
        self.cfg = cfg
        self.model_dir = model_dir
        self.rank = rank
        self.world_size = world_size
        self.version = 0
        self.batch_has_video = False  # whether any row of the current update has a video
        self.batch_encodes = False  # whether any row of it has a video to encode here
        self.batch_scores_reference = False  # whether the learner runs the reference pass in it

    def __repr__(self) -> str:
        # Ray reads it once, after __init__, for the dashboard's Actors view and the log prefix: only
        # what never changes.
        return f"LearnerWorker(learner-{self.rank} of {self.world_size})"

    @staticmethod
    def address() -> tuple[str, int]:
        """This node's IP and a free port: rank 0's answer is every rank's rendezvous point."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str = "127.0.0.1", master_port: int | None = None) -> int:
        """Join the process group, load the policy and build the DeepSpeed engine (all ranks at once)."""
        cfg, lc = self.cfg, self.cfg.learner
        configure_cpu(lc.num_threads, lc.cpu_cores, "learner")
        torch.manual_seed(cfg.seed)
        init_distributed(
            lc.backend, self.rank, self.world_size, master_addr, master_port, lc.collective_timeout_s
        )
        self.policy = VideoLMPolicy.from_folder(self.model_dir, cfg.model, seed=cfg.seed)
        # The warm-start adapter becomes the frozen reference of the KL penalty.
        if (Path(self.model_dir) / ADAPTER_DIR).is_dir():
            self.policy.freeze_reference()
        self.store = FrameStore(
            cfg.model.num_frames, self.policy.image_size, max_pixels=cfg.data.max_video_pixels
        )
        # The stand-in features of a share without video (see _visual_features), encoded before
        # DeepSpeed partitions the encoder, so that no pass has to run it for them.
        self.blank_features = self.policy.visual_features(self.policy.preprocess(self.blank_clip())[None])
        self.engine = build_engine(
            self.policy,
            lr=lc.lr,
            warmup_steps=lc.warmup_steps,
            weight_decay=lc.weight_decay,
            zero_stage=lc.zero_stage,
            grad_clip=lc.grad_clip,
            micro_batch_size=lc.micro_batch_size,
            dtype=cfg.model.dtype,
            zero3_persistence_threshold=lc.zero3_persistence_threshold,
        )
        set_collective_timeout(lc.collective_timeout_s)
        # A fixed number of micro-batches per step (DeepSpeed counts accumulation boundaries
        # cumulatively), sized for a full batch; a smaller batch leaves some micro-batches light.
        full_batch = math.ceil(cfg.rl.prompts_per_step * cfg.rl.group_size / self.world_size)
        self.n_micro = math.ceil(full_batch / lc.micro_batch_size)
        set_micro_batches(self.engine, self.n_micro)
        return self.rank

    def train_step(self, groups: list[Group]) -> dict[str, float]:
        """One optimizer step per epoch on the ranked ``groups`` (the same list on every rank).

        The policy runs in eval mode (dropout off) in every pass: the sampler drew the answers
        without dropout, so the importance ratio and the reference must score the same function
        (``model.lora_dropout`` acts in SFT only).

        Answers sampled by an older version than the learner's (the asynchronous loop) are
        corrected as in :func:`rlaif_ray.algo.losses.grpo_loss`: the learner's log-probs at the start
        of this step (``pi_prox``, one extra forward pass without gradient) anchor the clipped
        ratio, and the truncated weight ``min(pi_prox / mu, algo.is_cap)`` corrects for the
        sampler ``mu``. When every answer comes from the learner's own version, ``mu`` is
        ``pi_prox`` and the step is the plain on-policy one.
        """
        with self.collectives(f"update {self.version + 1}"):
            return self._train_step(groups)

    def _train_step(self, groups: list[Group]) -> dict[str, float]:
        start = time.time()
        if self.policy.training:  # eval() walks every module (a few ms a step on a small batch)
            self.engine.eval()
        rows, stats = build_rows(groups, self.cfg)
        # Rows whose video the learner must decode but cannot are dropped and counted (the store
        # warns once per video and counts it by reason); rows that bring their encoder features
        # need no decoding here.
        keep = [r.visual_features is not None or self.store.for_example(r.video)[0] for r in rows]
        if self.world_size > 1:
            # A video may decode on one learner's node and not on another's: every rank keeps the
            # rows every rank can use, so that all shard the same rows and weigh the same total.
            agreed = torch.tensor(keep, dtype=torch.int32, device=self.policy.device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
            keep = [bool(k) for k in agreed.tolist()]
        usable = [r for r, k in zip(rows, keep, strict=True) if k]
        stats["rows_bad_video"] = float(len(rows) - len(usable))
        stats["skipped_videos"] = float(self.store.skipped_videos)
        stats.update({f"skipped_videos_{k}": float(n) for k, n in self.store.skipped_by_reason.items()})
        rows = usable
        self.batch_has_video = any(r.video is not None for r in rows)
        self.batch_encodes = any(r.video is not None and r.visual_features is None for r in rows)
        # Decided for the whole update, alike on every rank (ZeRO-3: every rank runs the same passes).
        self.batch_scores_reference = self.cfg.algo.kl_coef > 0 and any(r.ref_logprobs is None for r in rows)
        stats["rows"] = float(len(rows))
        # Whole groups go to each learner and micro-batch: a group's answers share its prompt.
        groups_of_rows = split_groups(rows)
        if len(groups_of_rows) < self.world_size:
            stats.update({"skipped_step": 1.0, "learn_s": time.time() - start})
            return stats
        algo = self.cfg.algo
        global_count = (
            sum(len(r.completion_ids) for r in rows)
            if loss_denominator(algo.aggregation) == "tokens"
            else len(rows)
        )
        mine = shard(groups_of_rows, self.rank, self.world_size)
        n_micro = self.n_micro
        chunks = [shard(mine, i, n_micro) for i in range(n_micro)]
        totals: dict[str, float] = {}
        real_chunks = sum(1 for c in chunks if c) * self.cfg.learner.epochs_per_batch
        lags = [self.version - r.weight_version for r in rows]
        off_policy = max(lags) > 0
        # pi_prox of each micro-batch (stale rows only): its log-probs in the first epoch, whose
        # weights are this step's starting ones (they change only at the epoch's optimizer step).
        prox: list[torch.Tensor | None] = [None] * n_micro
        stats.update({"lag_max": float(max(lags)), "lag_mean": sum(lags) / len(lags)})
        optimizer = self.engine.basic_optimizer
        applied_before = optimizer.applied
        lr = self.engine.get_lr()[0]  # (this update's first optimizer step's, during a warm-up)
        for _ in range(self.cfg.learner.epochs_per_batch):
            optimizer.skip_next = False  # DeepSpeed may have skipped the last step without calling it
            for i, chunk in enumerate(chunks):
                # An empty share still runs (with zero weight): every rank must reduce gradients.
                micro_stats, prox[i] = self._micro_step(
                    chunk or mine[:1], bool(chunk), global_count, n_micro, off_policy, prox[i]
                )
                if chunk and not math.isfinite(micro_stats["loss"]):
                    optimizer.skip_next = True  # every rank skips this epoch's update
                for key, value in micro_stats.items():
                    if chunk and key == "ratio_max":
                        totals[key] = max(totals.get(key, 0.0), value)
                    elif chunk:
                        totals[key] = totals.get(key, 0.0) + value / real_chunks
                self.engine.step()
        applied = optimizer.applied - applied_before
        stats.update(totals)
        stats["skipped_nonfinite"] = float(self.cfg.learner.epochs_per_batch - applied)
        if not applied:  # a NaN or inf: the weights are untouched, no new version
            log.warning("a NaN or inf in the loss or the gradients: update skipped (weights unchanged)")
            stats.update({"skipped_step": 1.0, "learn_s": time.time() - start})
            return stats
        self.version += 1
        grad_norm = self.engine.get_global_grad_norm()
        stats.update(
            {
                "skipped_step": 0.0,
                "learn_s": time.time() - start,
                "version": float(self.version),
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else -1.0,
            }
        )
        return stats

    def _policy_inputs(self, groups: list[list[TrainRow]]) -> dict[str, Any]:
        """The keyword arguments of ``VideoLMPolicy.answer_logprobs`` for the answers of ``groups``:
        with ``learner.shared_prefix`` one prompt (and video features) per group and the group's
        sizes, else one prompt per answer."""
        rows = [r for group in groups for r in group]
        heads = [group[0] for group in groups] if self.cfg.learner.shared_prefix else rows
        return {
            "prompts": [self.policy.prompt_ids(r.question, video=r.video is not None) for r in heads],
            "answers": [r.completion_ids for r in rows],
            "features": self._visual_features(heads),
            "group_sizes": [len(group) for group in groups] if self.cfg.learner.shared_prefix else None,
            "temperature": self.cfg.rollout.temperature,
        }

    def _micro_step(
        self,
        groups: list[list[TrainRow]],
        real: bool,
        global_count: int,
        n_micro: int,
        off_policy: bool = False,
        prox: torch.Tensor | None = None,
    ) -> tuple[dict[str, float], torch.Tensor | None]:
        """One micro-batch's forward, loss and backward; returns its stats and, for stale rows
        (``off_policy``), ``pi_prox``: ``prox`` when given (a later epoch), else these log-probs."""
        rows = [r for group in groups for r in group]
        inputs = self._policy_inputs(groups)
        algo = self.cfg.algo
        logprobs, mask, entropy = self.engine(None, with_entropy=algo.entropy_coef > 0, **inputs)
        if off_policy and prox is None:
            prox = logprobs.detach()
        width = logprobs.shape[1]
        ref = None
        if self.batch_scores_reference:
            ref, _, _ = self.policy.answer_logprobs(None, reference=True, **inputs)
        elif algo.kl_coef > 0:  # every row came with its reference log-probs from the rollout
            ref = _pad([r.ref_logprobs for r in rows], width, logprobs.device)
        behaviour = _pad([r.old_logprobs for r in rows], width, logprobs.device)
        advantages = torch.tensor([r.advantage for r in rows], device=logprobs.device)
        loss, stats = grpo_loss(
            logprobs,
            behaviour if prox is None else prox,
            ref,
            advantages,
            mask,
            eps_low=algo.eps_low,
            eps_high=algo.eps_high,
            kl_coef=algo.kl_coef,
            kl_estimator=algo.kl_estimator,
            entropy=entropy,
            entropy_coef=algo.entropy_coef,
            aggregation=algo.aggregation,
            behaviour_logprobs=None if prox is None else behaviour,
            is_cap=algo.is_cap,
        )
        local_count = (
            mask.sum().item() if loss_denominator(algo.aggregation) == "tokens" else float(len(rows))
        )
        # grpo_loss averages over this micro-batch; rescale to the global mean. DeepSpeed divides
        # by the micro-batch count and averages over ranks, which the last two factors undo.
        scale = (local_count / global_count) * n_micro * self.world_size if real else 0.0
        self.engine.backward(loss * scale)
        return stats, prox

    def _visual_features(self, rows: list[TrainRow]) -> torch.Tensor | None:
        """Frozen encoder features [V, N, D] of the rows that have a video, in order (text-only rows
        take none); None when no row of the whole update has a video.

        A row brings its video's features from the rollout actor that encoded it
        (:attr:`TrainRow.visual_features`); only the videos that came without them
        (``learner.reencode_videos``) are decoded and encoded here, each distinct video once. The
        reference pass reuses what this returns.

        Every rank runs the same modules in every pass, as ZeRO-3's collective parameter fetches
        require: the encoder runs on every rank when any row of the update needs it (on blank
        frames where a rank's share needs none), and a share with no video in an update that has
        some gets :attr:`blank_features`, which no prompt takes (``VideoLMPolicy._splice`` runs the
        projector on them with weight zero).
        """
        with_video = [r for r in rows if r.video is not None]
        if not with_video and not self.batch_has_video:
            return None
        features = {r.video: r.visual_features for r in with_video if r.visual_features is not None}
        missing = list(dict.fromkeys(r.video for r in with_video if r.video not in features))
        if missing or self.batch_encodes:
            clips = [self.store.get(v) for v in missing] or [self.blank_clip()]
            encoded = self.policy.visual_features(torch.stack([self.policy.preprocess(c) for c in clips]))
            features.update(zip(missing, encoded.unbind(0), strict=False))
        if not with_video:
            return self.blank_features.to(self.policy.device)
        return torch.stack([features[r.video].to(self.policy.device) for r in with_video])

    def blank_clip(self) -> np.ndarray:
        """``model.num_frames`` black frames at the encoder's size."""
        size = self.policy.image_size
        return np.zeros((self.cfg.model.num_frames, size, size, 3), dtype=np.uint8)

    def export_weights(self) -> WeightsMessage | None:
        """The trainable tensors (LoRA + projector) on rank 0, None on the other ranks.

        Views of the live parameters where they are on the CPU (no copy: a Ray call's return value
        is serialised as the call returns, before the next update; a caller in the same process
        that keeps them across an update copies them first); under ZeRO-1/2 they are DeepSpeed's
        flat buffer, which travels as one array. Under ZeRO-3 one copy into one buffer, since the
        gathered parameters are released as the call ends; the gather is a collective: every rank
        must call this at once.
        """
        with self.collectives(f"the export of version {self.version}"), gathered_trainable(self.policy):
            if self.rank != 0:
                return None
            return WeightsMessage.of(self.policy.trainable_tensors(), copy=self.cfg.learner.zero_stage == 3)

    @contextlib.contextmanager
    def collectives(self, what: str) -> Iterator[None]:
        """Turn a collective that failed inside (timed out after ``learner.collective_timeout_s``,
        or lost a peer) into a :class:`LearnerCollectiveError` naming this learner and ``what`` it
        was doing; the loop restores the learners as after a crash."""
        try:
            yield
        except RuntimeError as exc:
            if not is_collective_failure(exc):
                raise
            raise LearnerCollectiveError(
                f"learner-{self.rank}: a collective of {what} failed (learner.collective_timeout_s="
                f"{self.cfg.learner.collective_timeout_s:g}): the learners no longer agree and must be "
                f"restored: {exc}"
            ) from exc

    def save_state(self, folder: str) -> str:
        """Everything a restore needs, under ``folder``: the policy files (rank 0, as :meth:`save`),
        DeepSpeed's checkpoint of the trainable parameters, optimizer and scheduler (each rank
        its own partition; the frozen model is not written: it comes from the warm start), the
        weight version and this rank's RNG states. Every rank must call it at once."""
        self.save(folder)
        self.engine.save_checkpoint(
            str(Path(folder) / "deepspeed"),
            tag="state",
            client_state={"version": self.version},
            save_latest=False,
            exclude_frozen_parameters=True,
        )
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        torch.save(rng, Path(folder) / f"learner_rng_rank{self.rank}.pt")
        return folder

    def load_state(self, folder: str, version: int | None = None) -> int:
        """Restore what :meth:`save_state` wrote (after :meth:`setup`, on every rank at once).

        ``version`` (the driver passes one above every version served so far) replaces the saved
        weight version, so that the next update publishes a version no rollout engine has seen.
        """
        _, client = self.engine.load_checkpoint(
            str(Path(folder) / "deepspeed"), tag="state", load_module_strict=False
        )
        if client is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {folder}/deepspeed")
        rng = torch.load(Path(folder) / f"learner_rng_rank{self.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        self.version = int(client["version"]) if version is None else version
        return self.version

    def set_version(self, version: int) -> int:
        """Publish the next update as ``version + 1`` (learners restored from the warm start)."""
        self.version = version
        return version

    def save(self, folder: str) -> str:
        """Write a checkpoint (peft adapter + projector + policy.json) that every tool here loads.

        Every rank must call it (the ZeRO-3 gather is a collective); rank 0 writes.
        """
        with gathered_trainable(self.policy):
            if self.rank == 0:
                self.policy.save(folder)
        return folder
